"""A thin decoder-only transformer for Llama, Qwen2 / Qwen3, Gemma-2 / Gemma-3 and Chameleon
checkpoints (gpt-fast style).

``Decoder.from_pretrained(path)`` reads a local Hugging Face directory (``config.json`` plus one
or sharded safetensors files; ``unimm.models.hf_checkpoint``) into modules named like Hugging
Face's, so parameter names map one to one. Attention runs through ``unimm.kernels.attention``
under interval masks and the loss through ``unimm.kernels.linear_cross_entropy``; everything
else is plain PyTorch.

The families differ only in data held by ``DecoderConfig``:
  * Llama: RMSNorm ``w * x``, SwiGLU MLP, RoPE with optional "linear" or "llama3" frequency
    scaling (optional biases: ``attention_bias``, ``mlp_bias``).
  * Qwen2: Llama with a bias on q, k and v (sliding layers when ``use_sliding_window``).
  * Qwen3: Llama with an RMSNorm over each q and k head before RoPE (``qk_norm``).
  * Gemma-2: embeddings times sqrt(hidden) rounded to the model dtype, RMSNorm ``(1 + w) x``
    computed in fp32, sandwich norms around attention and MLP, GeGLU (tanh gelu), attention
    score soft-cap, final logit soft-cap, sliding-window layers (``layer_types``), scores
    scaled by ``query_pre_attn_scalar ** -0.5``.
  * Gemma-3: Gemma-2 with a ``(1 + w)`` RMSNorm over each q and k head, 5 local : 1 global
    layers, and the local layers' own RoPE base (``rope_local_theta``; the global layers take
    ``rope_theta`` and the scaling); soft-caps only when configured.
  * Chameleon: Llama with a LayerNorm over each q and k head (per-head scale and shift, eps
    1e-5); with ``swin_norm`` the norms move onto the branch outputs, ``x + norm(f(x))``.
    ``image_code_ids`` / ``image_token_id`` say which vocabulary ids are VQ image codes.

Generation uses ``KVCache`` (``unimm.models.kv_cache``): static per-layer key/value buffers plus
per-row lengths that the caller advances, so one decode step has static shapes, no host sync, and
can be captured in a CUDA graph. Decode steps of full-attention layers run ``decode_attention``
over the cache; sliding-window layers (and chunks of several tokens) run ``attention`` with
interval masks. ``Decoder.generate`` forwards to ``unimm.models.generation.generate_ids``.

The layers live in ``unimm.models.layers``, ``DecoderConfig`` in ``unimm.models.config``.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from unimm.kernels import AttentionMask, linear_cross_entropy
from unimm.models import hf_checkpoint
from unimm.models.config import DecoderConfig
from unimm.models.generation import generate_ids
from unimm.models.kv_cache import KVCache, check_lens
from unimm.models.layers import DecoderLayer, ForwardContext, RMSNorm, rope_inv_freq, rope_table


def _check_int_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() or \
            value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(value, 'dtype', type(value).__name__)}")


def _on_host(tensor: torch.Tensor) -> bool:
    """Can the host read ``tensor`` without a device sync? (The hook tests patch to take the CUDA
    code paths on a CPU.)"""
    return tensor.device.type == "cpu"


class Decoder(nn.Module):
    """Llama / Qwen / Gemma / Chameleon decoder: ``decoder(...)`` gives the final-normed hidden
    states, ``logits`` and ``loss`` apply the (tied or separate) ``lm_head``."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.unit_offset_norms)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self._inv_freq: dict[torch.device, tuple] = {}  # per device (full, local); not buffers: never cast to bf16
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=config.initializer_range)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---- construction ---------------------------------------------------------------------

    @classmethod
    def from_config(cls, hf_config) -> Decoder:
        """A randomly initialised decoder for a Hugging Face config (dict or PretrainedConfig)."""
        return cls(hf_config if isinstance(hf_config, DecoderConfig) else DecoderConfig.from_hf(hf_config))

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, *, device=None) -> Decoder:
        """Loads a local Hugging Face checkpoint directory: ``config.json`` and ``model.safetensors``
        or ``model.safetensors.index.json`` + shards (``unimm.models.hf_checkpoint``). Each tensor
        is read once, straight onto ``device`` (default CPU), and cast to ``dtype`` there (default:
        the checkpoint's embedding dtype); the model is built on the meta device, so nothing is
        allocated twice. A file that cannot be read raises a ValueError naming it."""
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
        path = os.fspath(path)
        hf_config = hf_checkpoint.read_config(path)
        try:
            config = DecoderConfig.from_hf(hf_config)
        except ValueError as err:
            raise ValueError(f"{os.path.join(path, 'config.json')}: {err}") from None
        state = hf_checkpoint.read_state(path, dtype, "cpu" if device is None else str(torch.device(device)))
        if dtype is None and "embed_tokens.weight" in state:  # one dtype for the model: the embedding's
            dtype = state["embed_tokens.weight"].dtype
            state = {name: t if t.dtype == dtype else t.to(dtype) for name, t in state.items()}
        with torch.device("meta"):
            model = cls(config)
        if config.tie_word_embeddings and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"checkpoint {path} does not match the {config.family} config: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")
        wrong = [f"{name} {list(state[name].shape)} (config: {list(t.shape)})" for name, t in expected.items()
                 if state[name].shape != t.shape]
        if wrong:
            raise ValueError(f"checkpoint {path} does not match its config.json: {', '.join(wrong[:4])}")
        model.load_state_dict(state, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    # ---- forward --------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, mask: AttentionMask | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Hidden states ``[B, S, hidden]`` after the final norm.

        Args:
            input_ids: int ``[B, S]`` token ids; or
            inputs_embeds: ``[B, S, hidden]`` in ``embed_tokens``' space (unscaled, model dtype).
                Both paths are multiplied by ``embed_scale`` (Gemma), so
                ``inputs_embeds=decoder.embed_tokens(ids)`` equals ``input_ids=ids``.
            positions: int ``[B, S]`` RoPE positions; default ``arange(S)`` (plus ``cache.lens``
                when the cache already holds tokens).
            mask: ``AttentionMask`` ``[B, S]`` over this chunk's keys; None: causal. Sliding-window
                layers intersect each row's interval with its window.
            cache: a ``KVCache``; k/v go to rows ``[lens[b], lens[b] + S)``. When the cache already
                holds tokens, a row's interval ``[s, e)`` becomes ``[s + lens, e + lens)``, and an
                interval that starts at the chunk's first key also sees every cached key:
                ``[0, e + lens)`` (so causal or prefix-LM chunk masks continue the cached sequence).
                Lengths must satisfy ``0 <= lens`` and ``lens + S <= max_len`` (the cache's
                capacity): a ValueError otherwise, checked on the host for a CPU cache and, with one
                device read, for any chunk of S > 1 tokens (prefill, extend). A CUDA decode step
                (S == 1) reads nothing back (it may be inside a CUDA graph): a row whose length is
                outside ``[0, max_len)`` writes nothing to the cache and gets NaN hidden states.

        An empty chunk (S == 0, or B == 0) gives an empty ``[B, S, hidden]`` and writes nothing.

        Ids outside ``[0, vocab_size)`` raise a ValueError naming ``input_ids`` when they are on
        the CPU. On a GPU they are not read back (no host sync per training or decode step): such a
        token embeds as NaN, so exactly the outputs that depend on it come out NaN.
        ``Decoder.generate`` checks its prompts once per call; ``pack`` checks ids on the host.
        """
        x = self._embed(input_ids, inputs_embeds)
        if x.shape[0] == 0 or x.shape[1] == 0:
            self._check_inputs(x, positions, mask, cache)
            return self.norm(x)
        step = self._prepare(x, positions, mask, cache)
        for layer in self.layers:
            x = layer(x, step)
        x = self.norm(x)
        if step.row_ok is not None:
            x = x.masked_fill(~step.row_ok[:, None, None], float("nan"))
        return x

    def logits(self, hidden: torch.Tensor, vocab_range: tuple[int, int] | None = None) -> torch.Tensor:
        """``lm_head(hidden)``, soft-capped ``c tanh(x / c)`` when the config has a final soft-cap;
        with ``vocab_range=(lo, hi)`` the logits of ids ``[lo, hi)`` only (column j is id ``lo + j``).
        The one place unimm forms soft-capped logits (``UnifiedModel.logits`` and generation call
        it). Every id keeps its logit: transformers' Chameleon sets the image codes' to the dtype's
        minimum (text only); here ``config.image_code_ids`` / ``image_code_range`` tell them."""
        if vocab_range is None:
            logits = self.lm_head(hidden)
        else:
            logits = F.linear(hidden, self.lm_head.weight[vocab_range[0]:vocab_range[1]])
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, **ce_options) -> torch.Tensor:
        """Cross-entropy of ``logits(hidden)`` against ``targets`` ``[B, S]`` without forming the
        logits: ``linear_cross_entropy`` with the final soft-cap; ``ce_options`` (ignore_index,
        reduction, token_weights, vocab_range, label_smoothing, z_loss, ...) pass through."""
        return linear_cross_entropy(hidden, self.lm_head.weight, targets, softcap=self.config.final_softcap,
                                    **ce_options)

    # ---- generation -----------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """Token ids ``[B, S + n]``: the prompts followed by up to ``max_new_tokens`` new tokens, as
        transformers' ``generate``. ``unimm.models.generation.generate_ids(self, input_ids,
        max_new_tokens, **options)``, which documents the options (sampling, stop tokens, ragged
        prompts, cache length, CUDA graphs)."""
        return generate_ids(self, input_ids, max_new_tokens, **options)

    # ---- helpers --------------------------------------------------------------------------

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``embed_tokens(input_ids)`` (unscaled) for int ids of any shape. Ids outside
        ``[0, vocab_size)``: a ValueError naming ``input_ids`` when they are on the CPU; NaN
        embeddings on a GPU (nothing is read back; see ``forward``)."""
        vocab = self.config.vocab_size
        _check_int_tensor("input_ids", input_ids)
        if _on_host(input_ids):
            if input_ids.numel():
                low, high = torch.stack(torch.aminmax(input_ids)).tolist()
                if low < 0 or high >= vocab:
                    raise ValueError(f"input_ids must be in [0, {vocab}) (the vocabulary size is {vocab}), got values "
                                     f"in [{low}, {high}]")
            return self.embed_tokens(input_ids)
        bad = (input_ids < 0) | (input_ids >= vocab)
        return self.embed_tokens(input_ids.clamp(0, vocab - 1)).masked_fill(bad[..., None], float("nan"))

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        weight = self.embed_tokens.weight
        if input_ids is not None:
            _check_int_tensor("input_ids", input_ids)
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
            x = self.embed_ids(input_ids)
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dtype != weight.dtype:
                raise TypeError(f"inputs_embeds must be a {weight.dtype} tensor (the model dtype), got "
                                f"{getattr(inputs_embeds, 'dtype', type(inputs_embeds))}")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ValueError(f"inputs_embeds must be [batch, seq, {self.config.hidden_size}], got shape "
                                 f"{tuple(inputs_embeds.shape)}")
            x = inputs_embeds
        if self.config.embed_scale is not None:  # rounded to the model dtype first, as Gemma does
            x = x * torch.tensor(self.config.embed_scale, dtype=x.dtype).item()
        return x

    def _check_inputs(self, x: torch.Tensor, positions, mask, cache) -> None:
        """Argument checks that read nothing from the device."""
        batch, seq_len, _ = x.shape
        device = x.device
        if cache is not None:
            self._check_cache(cache, x)
        if mask is not None:
            if not isinstance(mask, AttentionMask):
                raise TypeError(f"mask must be an AttentionMask or None, got {type(mask).__name__}")
            if mask.shape != (batch, seq_len) or mask.device != device:
                raise ValueError(f"mask must be [batch, seq] = [{batch}, {seq_len}] on {device}, got "
                                 f"{list(mask.shape)} on {mask.device}")
            if mask.num_keys > seq_len:
                raise ValueError(f"mask lets rows see up to {mask.num_keys} keys but the chunk has {seq_len}")
        if positions is not None:
            _check_int_tensor("positions", positions)
            if positions.shape != (batch, seq_len) or positions.device != device:
                raise ValueError(f"positions must be [batch, seq] = [{batch}, {seq_len}] on {device}, got "
                                 f"{list(positions.shape)} on {positions.device}")

    def _prepare(self, x: torch.Tensor, positions, mask, cache) -> ForwardContext:
        self._check_inputs(x, positions, mask, cache)
        batch, seq_len, _ = x.shape
        device = x.device
        lens = None  # set when the chunk lands after cached tokens
        row_ok = None  # set when the lengths could not be checked on the host
        if cache is not None:
            lens = cache.lens
            if seq_len > 1 or _on_host(lens):  # host data, or a prefill / extend: not captured, one read is fine
                longest = check_lens(lens, cache.max_len, seq_len)
                if seq_len > 1 and longest == 0:
                    lens = None  # an empty cache: the chunk's own mask as is
            elif not cache._lens_in_range:  # a device decode step: no read back; a row out of range
                row_ok = (lens >= 0) & (lens < cache.max_len)  # writes nothing and comes out NaN
                lens = lens.clamp(0, cache.max_len - 1)

        key_index = torch.arange(seq_len, dtype=torch.int32, device=device).expand(batch, seq_len)
        if lens is None:
            base = mask if mask is not None else AttentionMask.causal(batch, seq_len, device=device)
        else:  # the chunk continues each row's cached tokens: its key j is cache row lens[b] + j
            base = AttentionMask.causal_after(lens, seq_len, cache.max_len) if mask is None else \
                mask.continued(lens, cache.max_len)
            key_index = key_index + lens[:, None]
        window = None
        if any(self.config.sliding):  # each row's interval cut to the last sliding_window keys
            window = base.windowed(self.config.sliding_window, key_index)

        if positions is None:
            positions = key_index
        if device not in self._inv_freq:
            full = local = rope_inv_freq(self.config).to(device)
            if self.config.rope_local_theta is not None:
                local = rope_inv_freq(self.config, local=True).to(device)
            self._inv_freq[device] = full, local
        full, local = self._inv_freq[device]
        rope = rope_table(positions, full, x.dtype)
        local_rope = rope if local is full else rope_table(positions, local, x.dtype)

        cache_index = None
        if lens is not None:
            rows = torch.arange(batch, device=device)[:, None].expand(batch, seq_len)
            cache_index = (rows, key_index.long())
        decode_lens = lens + 1 if lens is not None and seq_len == 1 and mask is None else None
        return ForwardContext(rope, local_rope, base, window, cache, cache_index, decode_lens, row_ok)

    def _check_cache(self, cache, x: torch.Tensor) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        want = (x.shape[0], cache.max_len, self.config.num_kv_heads, self.config.head_dim)
        if len(cache.k) != self.config.num_layers or tuple(cache.k[0].shape) != want:
            raise ValueError(f"cache must hold {self.config.num_layers} layers of {list(want)}, got "
                             f"{len(cache.k)} of {list(cache.k[0].shape)}")
        if cache.k[0].dtype != x.dtype or cache.k[0].device != x.device:
            raise ValueError(f"cache must be {x.dtype} on {x.device} like the model, got {cache.k[0].dtype} on "
                             f"{cache.k[0].device}")
