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

Generation uses ``KVCache``: static per-layer key/value buffers plus per-row lengths that the
caller advances, so one decode step has static shapes, no host sync, and can be captured in
a CUDA graph. Decode steps of full-attention layers run ``decode_attention`` over the cache;
sliding-window layers (and chunks of several tokens) run ``attention`` with interval masks.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os

import torch
import torch.nn.functional as F
from torch import nn

from unimm.kernels import AttentionMask, attention, decode_attention, linear_cross_entropy
from unimm.models import hf_checkpoint
from unimm.models.hf_checkpoint import FULL, ROPE_KEYS, SLIDING

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "chameleon")
_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclasses.dataclass
class DecoderConfig:
    """Everything the decoder needs; ``from_hf`` reads it from a Hugging Face config."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...}; None: plain RoPE
    rope_local_theta: float | None = None  # sliding layers' own (plain) RoPE base; None: as full layers
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v
    output_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    activation: str = "silu"
    embed_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # FULL / SLIDING per layer; empty: all full
    query_scale: float | None = None  # score scale; None: head_dim ** -0.5
    swin_norm: bool = False  # Chameleon: norm the attention and MLP outputs instead of their inputs
    image_token_id: int | None = None  # the prompt's image placeholder (Chameleon's <image>, Gemma-3's)
    image_code_ids: tuple[int, ...] = dataclasses.field(default=(), repr=False)  # [c]: vocabulary id of VQ code c
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        self.layer_types = tuple(self.layer_types) or (FULL,) * self.num_layers
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {FULL, SLIDING}:
            raise ValueError(f"layer_types must be {self.num_layers} entries of {FULL!r} / {SLIDING!r}, "
                             f"got {self.layer_types}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be an int >= 1 or None, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_KEYS or any(key not in self.rope_scaling for key in ROPE_KEYS[kind]):
                raise ValueError(f"rope_scaling must be None or a 'linear' / 'llama3' dict with keys "
                                 f"{ROPE_KEYS}, got {self.rope_scaling}")
        if self.swin_norm and self.family != "chameleon":
            raise ValueError(f"swin_norm is Chameleon's; family is {self.family!r}")
        self.image_code_ids = tuple(self.image_code_ids)
        ids = [*self.image_code_ids, *([] if self.image_token_id is None else [self.image_token_id])]
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids) or \
                len(set(self.image_code_ids)) != len(self.image_code_ids):
            raise ValueError(f"image_token_id and image_code_ids must be distinct ids in [0, {self.vocab_size})")
        if self.query_scale is None:
            self.query_scale = self.head_dim**-0.5

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window?"""
        return tuple(kind == SLIDING and self.sliding_window is not None for kind in self.layer_types)

    @property
    def unit_offset_norms(self) -> bool:
        """Gemma's RMSNorms scale by ``1 + w`` in fp32 (weights stored around 0)."""
        return self.family in ("gemma2", "gemma3")

    @property
    def qk_norm(self) -> str | None:
        """The norm over each q and k head before RoPE: "rms" (Qwen3, Gemma-3), "layer"
        (Chameleon's per-head LayerNorm) or None."""
        return {"qwen3": "rms", "gemma3": "rms", "chameleon": "layer"}.get(self.family)

    @property
    def block(self) -> str:
        """Where a layer's norms sit: "pre" (``x + f(norm(x))``), "sandwich" (Gemma:
        ``x + norm(f(norm(x)))``) or "swin" (Chameleon's swin_norm: ``x + norm(f(x))``)."""
        return "sandwich" if self.unit_offset_norms else "swin" if self.swin_norm else "pre"

    @property
    def image_code_range(self) -> tuple[int, int] | None:
        """``(lo, hi)`` when the image codes are the consecutive ids ``lo + c`` (as in Chameleon's
        vocabulary): the ``vocab_range`` of ``generate`` / ``loss`` for image tokens; else None."""
        ids = self.image_code_ids
        if not ids or ids != tuple(range(ids[0], ids[0] + len(ids))):
            return None
        return ids[0], ids[0] + len(ids)

    @classmethod
    def from_hf(cls, hf_config) -> DecoderConfig:
        """From a ``config.json`` dict or a transformers ``PretrainedConfig`` (duck-typed:
        anything with ``to_dict()``); ``unimm.models.hf_checkpoint.decoder_fields`` reads it."""
        if isinstance(hf_config, dict):
            cfg = dict(hf_config)
        elif callable(getattr(hf_config, "to_dict", None)):
            cfg = hf_config.to_dict()
        else:
            raise TypeError(f"hf_config must be a dict or a PretrainedConfig, got {type(hf_config).__name__}")
        return cls(**hf_checkpoint.decoder_fields(cfg))


def rope_inv_freq(config: DecoderConfig, local: bool = False) -> torch.Tensor:
    """fp32 ``[head_dim / 2]`` rotary frequencies, with linear or llama3 scaling (as transformers);
    ``local``: the sliding layers' plain frequencies of base ``rope_local_theta``."""
    dim = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None or local:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly between
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def _rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(cos, sin) ``[B, S, 1, D / 2]`` in ``dtype`` for int positions ``[B, S]``."""
    angles = positions[..., None].float() * inv_freq
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout of Hugging Face checkpoints; x ``[B, S, H, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class KVCache:
    """Static key/value buffers for generation: per layer ``k[i], v[i]`` ``[B, max_len, Hkv, D]``
    and ``lens`` int32 ``[B]``, the number of valid cached tokens of each row.

    The decoder writes a chunk of S tokens into rows ``[lens[b], lens[b] + S)`` and never changes
    ``lens``: the caller advances it in place (``cache.lens += 1``, or per row), so a decode step
    is static in shape and CUDA-graph capturable.

    Lengths must stay in ``[0, max_len]``. Assigning them (``cache.lens = [5, 9]``, or
    ``set_lens``) checks them: values on the host are read for free, a CUDA tensor once (a setup
    step, not a decode step). An in-place update (``+=``, ``copy_``, ``fill_``) is not checked
    when it happens; the decoder checks lengths where it can read them without a device sync
    (CPU caches, and every chunk of more than one token), and elsewhere (a CUDA decode step)
    never writes outside a row's ``max_len`` slots (see ``Decoder.forward``).
    """

    def __init__(self, config: DecoderConfig, batch_size: int, max_len: int, *, device, dtype: torch.dtype):
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self._lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        # set by an owner that keeps 0 <= lens < max_len at every decode step by construction
        # (the generation engine sizes max_len for its whole budget): its steps skip the range guard
        self._lens_in_range = False

    @property
    def lens(self) -> torch.Tensor:
        """int32 ``[B]``: cached tokens per row. The tensor is the cache's own (CUDA graphs read
        it by address): assignment copies into it."""
        return self._lens

    @lens.setter
    def lens(self, value) -> None:
        if value is self._lens:  # ``cache.lens += n`` already updated the buffer in place: no read back
            return
        self.set_lens(value)

    @property
    def batch_size(self) -> int:
        return self._lens.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def set_lens(self, lens) -> None:
        """Sets every row's cached length: an int, ``batch_size`` ints, or an integer tensor
        ``[batch_size]`` (on any device: a CUDA tensor is read back once), each in
        ``[0, max_len]``; copied into ``lens`` in place."""
        if isinstance(lens, torch.Tensor):
            if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
                raise TypeError(f"cache lengths must be integers, got a {lens.dtype} tensor")
            if lens.dim() > 1 or (lens.dim() == 1 and lens.shape[0] != self.batch_size):
                raise ValueError(f"cache lengths must be one per row, [{self.batch_size}], got shape "
                                 f"{tuple(lens.shape)}")
            values = lens.detach().to("cpu", torch.int64).expand(self.batch_size)
            _check_lens(values, self.max_len, 0)
        else:
            items = [lens] * self.batch_size if _is_int(lens) else lens
            if not isinstance(items, (list, tuple)) or not all(_is_int(v) for v in items):
                raise TypeError(f"cache lengths must be an int, a list of ints or an integer tensor, got {lens!r}")
            if len(items) != self.batch_size:
                raise ValueError(f"cache lengths must be one per row ({self.batch_size}), got {len(items)}")
            bad = next((row for row, v in enumerate(items) if not 0 <= v <= self.max_len), None)
            if bad is not None:
                raise ValueError(f"cache.lens must be in [0, {self.max_len}] (the cache's capacity max_len), row "
                                 f"{bad} has {items[bad]}")
            values = torch.tensor([int(v) for v in items], dtype=torch.int64)
        self._lens.copy_(values.to(torch.int32))

    def reset(self) -> None:
        """Forget every cached token (the buffers are overwritten as new tokens arrive)."""
        self._lens.zero_()


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor) or value.is_floating_point() or value.is_complex() or \
            value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(value, 'dtype', type(value).__name__)}")


def _on_host(tensor: torch.Tensor) -> bool:
    """Can the host read ``tensor`` without a device sync? (The hook tests patch to take the CUDA
    code paths on a CPU.)"""
    return tensor.device.type == "cpu"


def _check_lens(lens: torch.Tensor, max_len: int, new_tokens: int) -> int:
    """Host-side check of cache lengths before ``new_tokens`` more land: ``0 <= lens`` and
    ``lens + new_tokens <= max_len`` (the cache's capacity); returns the longest. ``lens`` must be
    readable (see ``_on_host``) or the caller accepts one device read."""
    if lens.numel() == 0:
        return 0
    low, high = torch.stack(torch.aminmax(lens)).tolist()  # one read
    if low < 0 or (new_tokens == 0 and high > max_len):
        row = int(torch.argmin(lens)) if low < 0 else int(torch.argmax(lens))
        raise ValueError(f"cache.lens must be in [0, {max_len}] (the cache's capacity max_len), row {row} has "
                         f"{low if low < 0 else high}")
    if high + new_tokens > max_len:
        row = int(torch.argmax(lens))
        raise ValueError(f"cache overflow: row {row} holds {high} tokens, + {new_tokens} new > the cache's capacity "
                         f"max_len={max_len}")
    return high


@dataclasses.dataclass
class _Step:
    """What every layer of one forward shares: rotary tables, masks and where k/v go in the cache."""

    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [B, S, 1, D/2] in the model dtype
    local_rope: tuple[torch.Tensor, torch.Tensor]  # the sliding layers' (Gemma-3's local base); else rope
    mask: AttentionMask
    window_mask: AttentionMask | None
    cache: KVCache | None = None
    cache_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch rows, cache rows); None: [:, :S]
    decode_lens: torch.Tensor | None = None  # a causal one-token step: lens + 1, for decode_attention
    row_ok: torch.Tensor | None = None  # bool [B] when lens were not checked on the host: rows in range


class RMSNorm(nn.Module):
    """RMS norm in fp32. Llama / Qwen / Chameleon scale by ``w`` after casting back to the input
    dtype; Gemma (``unit_offset``) scales by ``1 + w`` in fp32, then casts (weights stored around 0)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """Chameleon's q / k norm: a LayerNorm over each head's ``head_dim`` (eps 1e-5) with its own
    scale and shift per head, ``weight`` and ``bias`` ``[heads, head_dim]``."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, heads, head_dim]
        return F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.weight + self.bias


def _head_norm(config: DecoderConfig, heads: int) -> nn.Module:
    if config.qk_norm == "rms":
        return RMSNorm(config.head_dim, config.rms_norm_eps, unit_offset=config.unit_offset_norms)
    return HeadLayerNorm(heads, config.head_dim) if config.qk_norm == "layer" else nn.Identity()


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.sliding = layer_idx, config.sliding[layer_idx]
        self.local_rope = config.layer_types[layer_idx] == SLIDING
        self.head_dim, self.scale, self.softcap = config.head_dim, config.query_scale, config.attn_softcap
        hidden = config.hidden_size
        q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, hidden, bias=config.output_bias)
        self.q_norm = _head_norm(config, config.num_heads)  # Identity unless config.qk_norm
        self.k_norm = _head_norm(config, config.num_kv_heads)

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        cos, sin = step.local_rope if self.local_rope else step.rope
        q = _rotate(self.q_norm(self.q_proj(x).view(batch, seq_len, -1, self.head_dim)), cos, sin)
        k = _rotate(self.k_norm(self.k_proj(x).view(batch, seq_len, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim)
        if step.cache is not None:
            k_cache, v_cache = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
            if step.cache_index is None:  # empty cache: store, then attend over the fresh keys only
                k_cache[:, :seq_len] = k
                v_cache[:, :seq_len] = v
            else:  # rows [lens[b], lens[b] + S): a scatter, no host sync
                if step.row_ok is not None:  # a row whose length is out of range rewrites what its slot holds
                    keep = step.row_ok[:, None, None, None]
                    k = torch.where(keep, k, k_cache[step.cache_index])
                    v = torch.where(keep, v, v_cache[step.cache_index])
                k_cache.index_put_(step.cache_index, k)
                v_cache.index_put_(step.cache_index, v)
                k, v = k_cache, v_cache
        if step.decode_lens is not None and not self.sliding:
            out = decode_attention(q[:, 0], k, v, step.decode_lens, scale=self.scale, softcap=self.softcap)[:, None]
        else:
            out = attention(q, k, v, step.window_mask if self.sliding else step.mask, scale=self.scale,
                            softcap=self.softcap)
        return self.o_proj(out.reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU, or GeGLU for Gemma)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.activation]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One block; ``config.block`` places its norms: pre-norm (Llama, Qwen, Chameleon), sandwich
    norms (Gemma: each branch's input and output) or swin norms (Chameleon's swin_norm: each
    branch's output only; Hugging Face's names kept: ``input_layernorm`` follows attention)."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.block = config.block
        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.unit_offset_norms)
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()  # pre-norm: the MLP's pre-norm (Hugging Face's name)
        if self.block == "sandwich":
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x: torch.Tensor, step: _Step) -> torch.Tensor:
        if self.block == "pre":
            x = x + self.self_attn(self.input_layernorm(x), step)
            return x + self.mlp(self.post_attention_layernorm(x))
        if self.block == "swin":
            x = x + self.input_layernorm(self.self_attn(x, step))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), step))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


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

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``lm_head(hidden)``, soft-capped ``c tanh(x / c)`` when the config has a final soft-cap.
        Every id keeps its logit: transformers' Chameleon sets the image codes' to the dtype's
        minimum (text only); here ``config.image_code_ids`` / ``image_code_range`` tell them."""
        logits = self.lm_head(hidden)
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor, **ce_options) -> torch.Tensor:
        """Cross-entropy of ``logits(hidden)`` against ``targets`` ``[B, S]`` without forming the
        logits: ``linear_cross_entropy`` with the final soft-cap; ``ce_options`` (ignore_index,
        reduction, token_weights, vocab_range, label_smoothing, z_loss, ...) pass through."""
        return linear_cross_entropy(hidden, self.lm_head.weight, targets, softcap=self.config.final_softcap,
                                    **ce_options)

    # ---- generation -----------------------------------------------------------------------

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                 generator: torch.Generator | None = None, prompt_lens=None, attention_mask=None, pad_id: int = 0,
                 vocab_range: tuple[int, int] | None = None, max_len: int | None = None,
                 cuda_graphs: bool = True) -> torch.Tensor:
        """Token ids ``[B, S + n]``: the prompts followed by up to ``max_new_tokens`` new tokens
        (``n`` steps were run: fewer when every row stopped early), as transformers' ``generate``.

        Prefill writes a static ``KVCache``; each decode step is one ``[B, 1]`` forward captured
        in a CUDA graph on GPU (``cuda_graphs=False``: eager; CPU is always eager), then
        ``sample_tokens`` (``unimm.models.generate``).

        Args:
            input_ids: int ``[B, S]`` prompts, right-padded when ragged (padding ids are ignored);
                prompt ids must be in ``[0, vocab_size)`` (checked once per call, on any device).
            max_new_tokens: tokens to generate per row (>= 0).
            temperature: 0 is greedy (argmax, lowest id on ties); otherwise sampling, with
            top_k, top_p: the usual truncations (``sample_tokens``).
            stop_tokens: an id or ids; a row that samples one stops (the stop token is kept) and
                is padded with ``pad_id`` after it.
            generator: a ``torch.Generator`` on the model's device: equal seeds, equal tokens.
            prompt_lens: int ``[B]`` lengths of right-padded prompts; or
            attention_mask: ``[B, S]`` of 1 (prompt) then 0 (padding), transformers style.
            pad_id: written after a row's last token.
            vocab_range: ``(lo, hi)``: sample ids in ``[lo, hi)`` only (e.g. an image-code block).
            max_len: the cache length; default (and minimum) ``S + max_new_tokens``.
            cuda_graphs: capture the decode step in a CUDA graph when on a GPU.

        Row b holds its prompt (``prompt_lens[b]`` tokens), its new tokens right after it, then
        ``pad_id``; the result is on the model's device.
        """
        from unimm.models.generate import generate_ids
        return generate_ids(self, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_tokens=stop_tokens, generator=generator, prompt_lens=prompt_lens,
                            attention_mask=attention_mask, pad_id=pad_id, vocab_range=vocab_range, max_len=max_len,
                            cuda_graphs=cuda_graphs)

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

    def _prepare(self, x: torch.Tensor, positions, mask, cache) -> _Step:
        self._check_inputs(x, positions, mask, cache)
        batch, seq_len, _ = x.shape
        device = x.device
        lens = None  # set when the chunk lands after cached tokens
        row_ok = None  # set when the lengths could not be checked on the host
        if cache is not None:
            lens = cache.lens
            if seq_len > 1 or _on_host(lens):  # host data, or a prefill / extend: not captured, one read is fine
                longest = _check_lens(lens, cache.max_len, seq_len)
                if seq_len > 1 and longest == 0:
                    lens = None  # an empty cache: the chunk's own mask as is
            elif not cache._lens_in_range:  # a device decode step: no read back; a row out of range
                row_ok = (lens >= 0) & (lens < cache.max_len)  # writes nothing and comes out NaN
                lens = lens.clamp(0, cache.max_len - 1)

        key_index = torch.arange(seq_len, dtype=torch.int32, device=device).expand(batch, seq_len)
        if lens is None:
            base = mask if mask is not None else AttentionMask.causal(batch, seq_len, device=device)
        else:
            shift = lens[:, None]
            if mask is None:
                start, end = torch.zeros_like(key_index), key_index + 1 + shift
            else:
                end = mask.kv_end + shift
                start = torch.where(mask.kv_start > 0, mask.kv_start + shift, 0)
                start = torch.where(mask.kv_end <= mask.kv_start, end, start)  # empty rows stay empty
            key_index = key_index + shift
            base = AttentionMask(start.to(torch.int32), end.to(torch.int32), cache.max_len)
        window = None
        if any(self.config.sliding):  # each row's interval cut to the last sliding_window keys
            start = torch.maximum(base.kv_start, key_index - (self.config.sliding_window - 1))
            window = AttentionMask(torch.minimum(start, base.kv_end).to(torch.int32), base.kv_end, base.num_keys)

        if positions is None:
            positions = key_index
        if device not in self._inv_freq:
            full = local = rope_inv_freq(self.config).to(device)
            if self.config.rope_local_theta is not None:
                local = rope_inv_freq(self.config, local=True).to(device)
            self._inv_freq[device] = full, local
        full, local = self._inv_freq[device]
        rope = _rope_table(positions, full, x.dtype)
        local_rope = rope if local is full else _rope_table(positions, local, x.dtype)

        cache_index = None
        if lens is not None:
            rows = torch.arange(batch, device=device)[:, None].expand(batch, seq_len)
            cache_index = (rows, key_index.long())
        decode_lens = lens + 1 if lens is not None and seq_len == 1 and mask is None else None
        return _Step(rope, local_rope, base, window, cache, cache_index, decode_lens, row_ok)

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

