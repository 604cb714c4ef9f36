"""Hugging Face drop-in: ``apply(model)`` runs a transformers decoder LM on unimm's kernels.

Supported classes: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``, ``Gemma3ForConditionalGeneration`` (its language
model; the SigLIP vision tower keeps its own attention) and ``ChameleonForConditionalGeneration``.
Tested with transformers 4.52.1 (the oldest release in which all of them route attention through
transformers' attention interface) and 5.24.0. The arguments are read as the installed
transformers passes them (its forward signatures, the KV cache as ``cache=`` or
``past_key_values=``, ``cache_position`` where it is passed, masks it prepared), never by
version number. After ``apply(model)``:

  * **Loss.** ``model(..., labels=labels)`` runs the base model, then
    ``unimm.kernels.linear_cross_entropy`` on the final hidden states and ``lm_head.weight``
    (``final_logit_softcapping`` as ``softcap`` where the model's own forward applies it: the
    Gemma-2/3 causal LMs, not Gemma-3's ConditionalGeneration; Chameleon's image tokens left out
    of the softmax, as its forward does by setting their logits to the minimum), so the
    ``B x S x V`` logits are never formed. Labels are shifted as transformers does (``labels[..., 1:]``, or
    ``shift_labels=``), ``ignore_index`` (default -100) is skipped, ``num_items_in_batch`` turns
    the mean into sum / num_items_in_batch. The output is a ``CausalLMOutputWithPast`` whose
    ``logits`` is **None**. A batch whose labels are all ignored has loss 0 (transformers: NaN).
    Without labels, forward is the model's own and returns logits as before.
  * **Attention.** Every decoder layer calls ``unimm.kernels.attention`` through transformers'
    attention interface (implementation ``"unimm"``). The mask of a call is one
    ``AttentionMask`` built once per forward:
      - ``attention_mask=None``: causal; packed sequences given by ``position_ids`` that restart
        (in a call without cached tokens) see only their own document;
      - a 2-D padding mask ``[B, past + S]`` of 0/1 whose ones form one run per row (right or
        left padding): row i sees the kept keys up to itself;
      - a 4-D mask ``[B, 1, S, K]`` (bool, or additive float: 0 visible, <= -1e3 masked) whose
        visible keys form one or two runs per row, such as the masks transformers 4.x prepares in
        ``generate()`` for static and hybrid caches, or attention sinks plus a sliding window:
        used as given, column j = key position j;
      - an ``unimm.kernels.AttentionMask`` ``[B, S]`` of one or two intervals per row
        (prefix-LM, packed documents with bidirectional image spans, a shared prompt with packed
        completions, ...): used as given; not with a filled KV cache.
    Gemma-3's ``token_type_ids`` (1: image token) make each contiguous run of image tokens a
    bidirectional span inside causal text (``AttentionMask.from_spans``, combined with the
    padding mask): each image sees all of itself, not later images, as transformers does.
    Sliding-window layers (Gemma-2/3, Qwen2/3) also drop keys ``window`` or more positions
    before the query; Gemma's attention soft-cap is passed on. KV caches from ``generate()``
    work: dynamic ones, and the static / hybrid caches whose masks transformers prepares as 4-D
    tensors (4.x), sliding-window layers that keep only recent keys included. On transformers
    4.x the dense mask the base model would build for the layers (and never read) is skipped.

Limits: attention dropout must be 0; ``output_attentions`` gives no weights (None); masks whose
rows need more than two key intervals are refused; Gemma-3's ``use_bidirectional_attention``
(EmbeddingGemma) is refused. Windows follow each attention module's ``sliding_window`` (as
flash-attention and transformers 5.x do; 4.x's eager / SDPA masks window every Qwen2/3 layer
when ``use_sliding_window`` is set). transformers 5.x prepares no mask for an attention implementation
it does not know, so ``generate()`` with a *static* cache there loses the padding mask: padded
batches need the default dynamic cache.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import torch.nn.functional as F

from unimm.kernels import AttentionMask, attention, linear_cross_entropy
from unimm.kernels._common import check_head_dim
from unimm.kernels.masks import packed_documents, span_ids_of_runs

IMPLEMENTATION = "unimm"
SUPPORTED_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Gemma2ForCausalLM",
                     "Gemma3ForCausalLM", "Gemma3ForConditionalGeneration", "ChameleonForConditionalGeneration")


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------

def apply(model):
    """Makes ``model`` (one of ``SUPPORTED_CLASSES``) compute its decoder's attention with
    ``unimm.kernels.attention`` and its training loss with ``linear_cross_entropy``.

    Patches this instance only (its forward and its base model's forward) and switches its
    language model's attention implementation to ``"unimm"`` (a vision tower keeps its own);
    parameters and checkpoints are untouched. Calling it again is a no-op. Returns ``model``.
    """
    import transformers

    supported = tuple(cls for cls in (getattr(transformers, name, None) for name in SUPPORTED_CLASSES) if cls)
    if not isinstance(model, supported):
        raise TypeError(f"apply() supports {', '.join(SUPPORTED_CLASSES)}; got {type(model).__name__}")
    if getattr(model, "_unimm_applied", False):
        return model
    decoder = _decoder(model.model)
    config = decoder.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    check_head_dim(head_dim, "unimm attention's config.head_dim")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError("unimm attention has no dropout; config.attention_dropout must be 0, "
                         f"got {config.attention_dropout}")
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("apply() runs causal language models; config.use_bidirectional_attention is not supported")

    _register_attention()
    _use_implementation(model, decoder)
    for module in {id(m): m for m in (model.model, decoder)}.values():
        if hasattr(type(module), "_update_causal_mask"):  # transformers 4.x builds dense masks here
            module._update_causal_mask = types.MethodType(_update_causal_mask, module)
    model.model.forward = types.MethodType(_with_signature(_base_model_forward, type(model.model).forward), model.model)
    model.forward = types.MethodType(_with_signature(_causal_lm_forward, type(model).forward), model)
    model._unimm_applied = True
    return model


def _with_signature(function, original):
    """``function`` under ``original``'s name and signature: ``generate()`` checks its keyword
    arguments against the forward's signature."""
    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return function(self, *args, **kwargs)
    return forward


def _decoder(base_model):
    """The module holding the decoder layers: the base model itself, or the language model of a
    multimodal base model (Gemma-3's)."""
    language_model = getattr(base_model, "language_model", None)
    if isinstance(language_model, torch.nn.Module) and hasattr(language_model, "layers"):
        return language_model
    return base_model


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, _attention_forward)


def _use_implementation(model, decoder) -> None:
    """Switches the language model (and only it: not a vision tower) to the unimm attention, on
    every config object that says which attention the language model runs or its masks are
    built for (older transformers deep-copy a sub-config into the language model)."""
    text_config = model.config.get_text_config()
    if hasattr(model, "set_attn_implementation"):  # newer transformers: validated, dispatched to submodules
        if text_config is model.config:
            model.set_attn_implementation(IMPLEMENTATION)
        else:
            key = next(name for name in getattr(model.config, "sub_configs", {})
                       if getattr(model.config, name, None) is text_config)
            model.set_attn_implementation({key: IMPLEMENTATION})
    for config in (text_config, decoder.config):
        if config._attn_implementation != IMPLEMENTATION:
            config._attn_implementation = IMPLEMENTATION


def _active(base_model) -> bool:
    """Whether the model still runs the unimm attention (it may have been switched back)."""
    return _decoder(base_model).config._attn_implementation == IMPLEMENTATION


def _update_causal_mask(self, attention_mask=None, *args, **kwargs):
    """transformers 4.x's dense ``[B, 1, S, K]`` mask builder, skipped inside a unimm forward
    (which hands the layers ``attention_mask=None``): the layers never read it. Masks it builds
    from a real mask (``generate()`` preparing one for a static cache) are built as before."""
    if attention_mask is None and _active(self):
        return None
    return type(self)._update_causal_mask(self, attention_mask, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Patched forwards
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _signature(function) -> inspect.Signature:
    return inspect.signature(function)


def _arguments(function, module, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name, positional ones named by ``function``'s own signature (the
    installed transformers' forward), its ``**kwargs`` merged in."""
    signature = _signature(function)
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                                    inspect.Parameter.POSITIONAL_OR_KEYWORD):
        raise TypeError(f"cannot read the arguments of {type(module).__name__}.forward{signature}: "
                        "its signature does not start with self")
    named = dict(signature.bind_partial(module, *args, **kwargs).arguments)
    named.pop(parameters[0].name)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(named.pop(name, {}))
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL and named.get(name):
            raise TypeError(f"{type(module).__name__}.forward got unexpected positional arguments")
    return named


def _base_model_forward(self, *args, **kwargs):
    """The base model's forward, with the call's mask turned into key intervals once and handed
    to every attention layer as the ``unimm_mask`` keyword (transformers passes extra keywords
    down to the attention function); transformers' own mask building then sees None. Every other
    argument (the KV cache among them, under whichever name this transformers uses) passes
    through untouched."""
    original = type(self).forward
    if not _active(self):  # switched back after apply()
        return original(self, *args, **kwargs)
    named = _arguments(original, self, args, kwargs)
    tokens = named.get("input_ids")
    if tokens is None:
        tokens = named.get("inputs_embeds")
    if tokens is None:
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    batch, seq_len = tokens.shape[:2]
    # the model's own mask inputs: token_type_ids only where this forward takes them (Gemma-3)
    token_type_ids = named.get("token_type_ids") if "token_type_ids" in _signature(original).parameters else None
    intervals = _call_intervals(named.get("attention_mask"), named.get("position_ids"), token_type_ids,
                                _past_length(named), batch, seq_len, tokens.device)
    named["attention_mask"] = None
    if token_type_ids is not None:
        named["token_type_ids"] = None  # its bidirectional spans are in the intervals
    return original(self, unimm_mask=intervals, **named)


# transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` deprecated); before, only
# ``past_key_values``. The cache is read under whichever name the caller used, never by version.
_CACHE_NAMES = ("cache", "past_key_values")


def _given_cache(kwargs: dict):
    """The KV cache a forward call was given, under either name; None when there is none."""
    caches = [kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None]
    return caches[0] if caches else None


def _past_length(named: dict) -> int:
    """Tokens before this call: ``cache_position[0]`` where the caller passes it (transformers
    4.x builds its own masks from it; a hybrid cache's length is not the position there), else
    the cache's length."""
    cache_position = named.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return int(cache_position.reshape(-1)[0])
    cache = _given_cache(named)
    return int(cache.get_seq_length()) if cache is not None else 0


_LOSS_KEYWORDS = ("num_items_in_batch", "ignore_index", "shift_labels")


def _causal_lm_forward(self, *args, **kwargs):
    """With labels: base model + fused linear cross-entropy, ``logits=None``. Without: unchanged."""
    original = type(self).forward
    named = _arguments(original, self, args, kwargs)
    labels = named.pop("labels", None)
    if labels is None:
        return original(self, *args, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = named.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    logits_to_keep = named.pop("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("logits_to_keep cannot be combined with labels: the loss covers every position")
    loss_options = {name: named.pop(name) for name in _LOSS_KEYWORDS if name in named}
    outputs = self.model(**named)
    loss = causal_lm_loss(self, outputs.last_hidden_state, labels, **loss_options)
    # the output's cache field is named as this transformers names it (``cache`` or ``past_key_values``)
    cache_field = next(name for name in _CACHE_NAMES if name in CausalLMOutputWithPast.__dataclass_fields__)
    output = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=getattr(outputs, "hidden_states", None),
                                    attentions=getattr(outputs, "attentions", None),
                                    **{cache_field: getattr(outputs, cache_field, None)})
    return output if return_dict else output.to_tuple()


def causal_lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor, *, num_items_in_batch=None,
                   ignore_index: int = -100, shift_labels: torch.Tensor | None = None, **_) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``) of ``model``'s head on ``hidden
    [B, S, D]``, through ``linear_cross_entropy``: position t predicts ``labels[t + 1]`` (or
    ``shift_labels[t]``); the last position predicts nothing."""
    if shift_labels is None:
        # shift by padding, not by slicing hidden: no copy of the hidden states
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    weight, bias = model.lm_head.weight, model.lm_head.bias
    device_type = hidden.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is not None:  # what lm_head would have computed in
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    excluded = _excluded_logits(model, weight)
    if excluded is not None:
        bias = excluded if bias is None else bias + excluded
    with torch.autocast(device_type, enabled=False):  # the kernel accumulates in fp32 itself
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.to(hidden.device).reshape(-1), bias=bias,
            ignore_index=ignore_index, reduction="mean" if num_items_in_batch is None else "sum",
            softcap=_final_softcap(model))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _final_softcap(model) -> float | None:
    """The final-logit soft-cap the causal LM's own forward applies: its config's
    ``final_logit_softcapping`` (Gemma-2/3), where the config is the text model's own; a
    multimodal wrapper (Gemma-3 with a vision tower) applies none."""
    config = model.config
    if config.get_text_config() is not config:
        return None
    return getattr(config, "final_logit_softcapping", None)


def _excluded_logits(model, weight: torch.Tensor) -> torch.Tensor | None:
    """Chameleon's forward sets the logits of its image tokens to the dtype's minimum before the
    loss: they weigh nothing in the softmax. The same as a bias ``[V]`` holding a huge negative
    value there, the dtype's minimum or, where that is larger, the fp32 minimum over 2V (the
    kernels sum the logits of a row in fp32: it stays finite). None for the other models."""
    mapping = getattr(model.model, "vocabulary_mapping", None)
    image_tokens = getattr(mapping, "image_tokens", None)
    if not image_tokens:
        return None
    vocab = weight.shape[0]
    low = max(torch.finfo(weight.dtype).min, torch.finfo(torch.float32).min / (2 * vocab))
    bias = torch.zeros(vocab, dtype=weight.dtype, device=weight.device)
    bias[torch.as_tensor(list(image_tokens), device=weight.device)] = low
    return bias


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

class _CallIntervals:
    """One forward call's mask in absolute key positions: query row i, at absolute position
    ``past_len + i``, sees keys ``[kv_start, kv_end)`` of the ``past_len + S`` the call knows.
    ``for_layer`` adapts it to one layer's keys (sliding window, cache that dropped old keys,
    static cache with unwritten slots after them) and caches the result, so layers sharing a
    shape share one mask (and its tile bounds)."""

    def __init__(self, mask: AttentionMask, past_len: int):
        self.mask = mask
        self.past_len = past_len
        self.total_keys = past_len + mask.shape[1]
        self._layers: dict[tuple[int, int | None], AttentionMask] = {}

    def for_layer(self, num_keys: int, sliding_window: int | None) -> AttentionMask:
        key = (num_keys, sliding_window)
        if key not in self._layers:
            self._layers[key] = self._build(num_keys, sliding_window)
        return self._layers[key]

    def _build(self, num_keys: int, sliding_window: int | None) -> AttentionMask:
        # a sliding-window cache returns only its recent keys: local key 0 is absolute `dropped`
        dropped = max(self.total_keys - num_keys, 0)
        if sliding_window is None:
            if dropped:
                raise ValueError(f"the attention layer got {num_keys} keys but its mask needs {self.total_keys}")
            return self.mask
        positions = torch.arange(self.past_len, self.total_keys, device=self.mask.device, dtype=torch.int32)
        return self.mask.windowed(sliding_window, positions).dropping(dropped)


def _call_intervals(attention_mask, position_ids, token_type_ids, past_len: int, batch: int, seq_len: int,
                    device: torch.device) -> _CallIntervals:
    if isinstance(attention_mask, dict):  # masks prepared by generate(): None for unknown implementations
        if any(value is not None for value in attention_mask.values()):
            raise ValueError("the 'unimm' attention takes one mask (2-D, 4-D or an AttentionMask), not a mask per "
                             "layer type: it applies sliding windows per layer itself")
        attention_mask = None
    if isinstance(attention_mask, AttentionMask):
        if past_len:
            raise ValueError("an AttentionMask covers the keys of one call; it cannot be combined with a "
                             f"filled KV cache ({past_len} cached tokens)")
        if attention_mask.shape != (batch, seq_len) or attention_mask.device != device:
            raise ValueError(f"attention_mask (an AttentionMask) must be [batch, seq] = [{batch}, {seq_len}] on "
                             f"{device}, got {list(attention_mask.shape)} on {attention_mask.device}")
        if _image_spans(token_type_ids, past_len, batch, seq_len, device) is not None:
            raise ValueError("pass either an AttentionMask or token_type_ids, not both: put the image spans into "
                             "the AttentionMask (AttentionMask.from_spans)")
        return _CallIntervals(attention_mask, 0)
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4:
        # a mask transformers (or the caller) prepared: it holds any image spans already
        return _CallIntervals(AttentionMask.from_dense(attention_mask.to(device), seq_len, past_len), past_len)
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a 2-D padding mask [batch, past + seq], a 4-D mask or an unimm "
                             f"AttentionMask; got a {attention_mask.dim()}-D tensor")
        if tuple(attention_mask.shape) != (batch, past_len + seq_len):
            raise ValueError(f"attention_mask must be [batch, past + seq] = [{batch}, {past_len + seq_len}], "
                             f"got {list(attention_mask.shape)}")
    elif attention_mask is not None:
        raise TypeError(f"attention_mask must be None, a 2-D or 4-D tensor or an unimm AttentionMask, "
                        f"got {type(attention_mask).__name__}")

    spans = _image_spans(token_type_ids, past_len, batch, seq_len, device)
    documents = None
    if attention_mask is None and position_ids is not None and past_len == 0:
        documents = packed_documents(position_ids.to(device).expand(batch, seq_len))
    if spans is None and documents is None:
        if attention_mask is None:
            return _CallIntervals(AttentionMask.causal(batch, seq_len, past_len=past_len, device=device), past_len)
        return _CallIntervals(AttentionMask.from_padding(attention_mask.to(device), seq_len, past_len), past_len)
    if spans is None:
        spans = torch.zeros_like(documents)
    if documents is None:
        documents = torch.zeros_like(spans)
    # over every key the call knows, then this call's rows: [doc start, max(i + 1, span end))
    known = AttentionMask.from_spans(documents, spans)
    mask = AttentionMask(known.kv_start[:, past_len:], known.kv_end[:, past_len:], past_len + seq_len)
    if attention_mask is not None:
        mask = mask.within_padding(attention_mask.to(device))
    return _CallIntervals(mask, past_len)


def _image_spans(token_type_ids, past_len: int, batch: int, seq_len: int, device) -> torch.Tensor | None:
    """Span ids ``[B, past + S]`` (0: text, k > 0: the k-th run of image tokens, type 1) from
    ``token_type_ids``, or None when there are none to apply. A single query token gains nothing
    from a span (every key of its image is before it), so decoding steps (given the prompt's
    ids by transformers 4.x's generate) ignore them."""
    if token_type_ids is None or seq_len == 1:
        return None
    if tuple(token_type_ids.shape) != (batch, past_len + seq_len):
        raise ValueError(f"token_type_ids must be [batch, past + seq] = [{batch}, {past_len + seq_len}], "
                         f"got {list(token_type_ids.shape)}")
    return span_ids_of_runs(token_type_ids.to(device) == 1)


# ---------------------------------------------------------------------------------------------
# The attention function transformers calls
# ---------------------------------------------------------------------------------------------

def _attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                       scaling: float | None = None, dropout: float = 0.0, softcap: float | None = None,
                       sliding_window: int | None = None, unimm_mask: _CallIntervals | None = None, **kwargs):
    """transformers' attention-function signature: ``query [B, Hq, S, D]``, ``key / value
    [B, Hkv, Skv, D]`` -> ``(out [B, S, Hq, D], None)``. The mask comes as ``unimm_mask`` from the
    base model forward that ``apply`` patched (transformers' own ``attention_mask`` is None)."""
    if unimm_mask is None:
        raise RuntimeError("the 'unimm' attention implementation needs the model forward patched by "
                           "unimm.integrations.transformers.apply(model); it got no unimm mask")
    if dropout:
        raise ValueError(f"unimm attention has no dropout; got dropout={dropout} (set config.attention_dropout = 0)")
    mask = unimm_mask.for_layer(key.shape[2], sliding_window)
    device_type = query.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is not None:  # RoPE in fp32 leaves q, k fp32 and v in the autocast dtype: SDPA's policy
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    with torch.autocast(device_type, enabled=False):
        out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
                        scale=scaling, softcap=softcap)
    return out, None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on this device type, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
