"""Hugging Face drop-in: ``apply(model)`` runs a transformers causal LM on unimm's kernels.

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Gemma2ForCausalLM`` (tested with
transformers 5.24; written for >= 4.48). After ``apply(model)``:

  * **Loss.** ``model(..., labels=labels)`` runs the base model, then
    ``unimm.kernels.linear_cross_entropy`` on the final hidden states and ``lm_head.weight``
    (Gemma-2's ``final_logit_softcapping`` as ``softcap``), so the ``B x S x V`` logits are never
    formed. Labels are shifted as transformers does (``labels[..., 1:]``, or ``shift_labels=``),
    ``ignore_index`` (default -100) is skipped, ``num_items_in_batch`` turns the mean into
    sum / num_items_in_batch. The output is a ``CausalLMOutputWithPast`` whose ``logits`` is
    **None**. A batch whose labels are all ignored has loss 0 (transformers: NaN). Without
    labels, forward is the model's own and returns logits as before.
  * **Attention.** Every layer calls ``unimm.kernels.attention`` through transformers'
    attention interface (implementation ``"unimm"``). The mask of a call is one
    ``AttentionMask`` built once per forward:
      - ``attention_mask=None``: causal; packed sequences given by ``position_ids`` that restart
        (as transformers detects them) see only their own document;
      - a 2-D padding mask ``[B, past + S]`` of 0/1 whose ones form one run per row (right or
        left padding): row i sees the kept keys up to itself;
      - an ``unimm.kernels.AttentionMask`` ``[B, S]`` (prefix-LM, packed documents with
        bidirectional image spans, ...): used as given; not with a filled KV cache.
    Sliding-window layers (Gemma-2, Qwen2) also drop keys ``window`` or more positions before
    the query; Gemma-2's attention soft-cap is passed on. KV caches from ``generate()`` work,
    sliding-window caches that keep only recent keys included.

Limits: attention dropout must be 0; ``output_attentions`` gives no weights (None); 4-D masks
are refused (they are not one key interval per row); ``generate()`` with a *static* cache
builds its masks before the model sees the padding mask, so padded batches need the default
dynamic cache there.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from unimm.kernels import AttentionMask, attention, linear_cross_entropy

IMPLEMENTATION = "unimm"
SUPPORTED_CLASSES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma2ForCausalLM")


# ---------------------------------------------------------------------------------------------
# apply
# ---------------------------------------------------------------------------------------------

def apply(model):
    """Makes ``model`` (a transformers Llama / Qwen2 / Gemma-2 causal LM) compute its attention
    with ``unimm.kernels.attention`` and its training loss with ``linear_cross_entropy``.

    Patches this instance only (its forward and its base model's forward) and switches its
    attention implementation to ``"unimm"``; parameters and checkpoints are untouched. Calling it
    again is a no-op. Returns ``model``.
    """
    import transformers

    supported = tuple(getattr(transformers, name) for name in SUPPORTED_CLASSES)
    if not isinstance(model, supported):
        raise TypeError(f"apply() supports {', '.join(SUPPORTED_CLASSES)}; got {type(model).__name__}")
    if getattr(model, "_unimm_applied", False):
        return model
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"unimm attention needs config.head_dim to be a power of two in [16, 256], got {head_dim}")
    if getattr(config, "attention_dropout", 0.0):
        raise ValueError(f"unimm attention has no dropout; config.attention_dropout must be 0, got {config.attention_dropout}")

    _register_attention()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(IMPLEMENTATION)
    else:  # transformers < 5
        config._attn_implementation = IMPLEMENTATION
    model.model.forward = types.MethodType(_base_model_forward, model.model)
    model.forward = types.MethodType(_causal_lm_forward, model)
    model._unimm_applied = True
    return model


def _register_attention() -> None:
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.50: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        ALL_ATTENTION_FUNCTIONS[IMPLEMENTATION] = _attention_forward
    else:
        AttentionInterface.register(IMPLEMENTATION, _attention_forward)


# ---------------------------------------------------------------------------------------------
# Patched forwards
# ---------------------------------------------------------------------------------------------

def _base_model_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                        **kwargs):
    """The base model's forward, with the call's mask turned into key intervals once and handed
    to every attention layer as the ``unimm_mask`` keyword (transformers passes extra keywords
    down to the attention function); transformers' own mask building then sees None. Every other
    keyword (the KV cache among them, under whichever name this transformers uses) passes through
    untouched."""
    original = type(self).forward
    if self.config._attn_implementation != IMPLEMENTATION:  # switched back after apply()
        return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        inputs_embeds=inputs_embeds, **kwargs)
    tokens = input_ids if input_ids is not None else inputs_embeds
    if tokens is None:
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    batch, seq_len = tokens.shape[:2]
    cache = _given_cache(kwargs)
    past_len = cache.get_seq_length() if cache is not None else 0
    intervals = _call_intervals(attention_mask, position_ids, past_len, batch, seq_len, tokens.device)
    return original(self, input_ids=input_ids, attention_mask=None, position_ids=position_ids,
                    inputs_embeds=inputs_embeds, unimm_mask=intervals, **kwargs)


# transformers >= 5.24 names the KV cache ``cache`` (``past_key_values`` deprecated); before, only
# ``past_key_values``. The cache is read under whichever name the caller used, never by version.
_CACHE_NAMES = ("cache", "past_key_values")


def _given_cache(kwargs: dict):
    """The KV cache a forward call was given, under either name; None when there is none."""
    caches = [kwargs[name] for name in _CACHE_NAMES if kwargs.get(name) is not None]
    return caches[0] if caches else None


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                       labels=None, **kwargs):
    """With labels: base model + fused linear cross-entropy, ``logits=None``. Without: unchanged."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    logits_to_keep = kwargs.pop("logits_to_keep", 0)
    if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
        raise ValueError("logits_to_keep cannot be combined with labels: the loss covers every position")
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, **kwargs)
    loss = causal_lm_loss(self, outputs.last_hidden_state, labels, **kwargs)
    # the output's cache field is named as this transformers names it (``cache`` or ``past_key_values``)
    cache_field = next(name for name in _CACHE_NAMES if name in CausalLMOutputWithPast.__dataclass_fields__)
    output = CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=outputs.hidden_states,
                                    attentions=outputs.attentions, **{cache_field: getattr(outputs, cache_field)})
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
    with torch.autocast(device_type, enabled=False):  # the kernel accumulates in fp32 itself
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), weight, shift_labels.to(hidden.device).reshape(-1), bias=bias,
            ignore_index=ignore_index, reduction="mean" if num_items_in_batch is None else "sum",
            softcap=getattr(model.config, "final_logit_softcapping", None))
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

class _CallIntervals:
    """One forward call's mask in absolute key positions: query row i, at absolute position
    ``past_len + i``, sees keys ``[kv_start, kv_end)`` of the ``past_len + S`` the call knows.
    ``for_layer`` adapts it to one layer's keys (sliding window, cache that dropped old keys)
    and caches the result, so layers sharing a shape share one mask (and its tile bounds)."""

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
        start = torch.maximum(self.mask.kv_start, positions - (sliding_window - 1)) - dropped
        end = torch.maximum(self.mask.kv_end - dropped, start)
        return AttentionMask(start.clamp_min(0).contiguous(), end.clamp_min(0).contiguous(), self.total_keys - dropped)


def _call_intervals(attention_mask, position_ids, past_len: int, batch: int, seq_len: int,
                    device: torch.device) -> _CallIntervals:
    if isinstance(attention_mask, dict):  # masks prepared by generate(): None for unknown implementations
        if any(value is not None for value in attention_mask.values()):
            raise ValueError("the 'unimm' attention cannot use prepared 4-D masks; pass a 2-D padding mask")
        attention_mask = None
    if isinstance(attention_mask, AttentionMask):
        if past_len:
            raise ValueError("an AttentionMask covers the keys of one call; it cannot be combined with a "
                             f"filled KV cache ({past_len} cached tokens)")
        if attention_mask.shape != (batch, seq_len) or attention_mask.device != device:
            raise ValueError(f"attention_mask (an AttentionMask) must be [batch, seq] = [{batch}, {seq_len}] on "
                             f"{device}, got {list(attention_mask.shape)} on {attention_mask.device}")
        return _CallIntervals(attention_mask, 0)
    if isinstance(attention_mask, torch.Tensor):
        if attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a 2-D padding mask [batch, past + seq] or an unimm AttentionMask; "
                             f"got a {attention_mask.dim()}-D tensor (4-D masks are not one key interval per row)")
        if tuple(attention_mask.shape) != (batch, past_len + seq_len):
            raise ValueError(f"attention_mask must be [batch, past + seq] = [{batch}, {past_len + seq_len}], "
                             f"got {list(attention_mask.shape)}")
        return _CallIntervals(padding_intervals(attention_mask.to(device), seq_len, past_len), past_len)
    if attention_mask is not None:
        raise TypeError(f"attention_mask must be None, a 2-D tensor or an unimm AttentionMask, "
                        f"got {type(attention_mask).__name__}")
    if position_ids is not None and past_len == 0:
        documents = packed_documents(position_ids.to(device).expand(batch, seq_len))
        if documents is not None:
            return _CallIntervals(AttentionMask.from_spans(documents, torch.zeros_like(documents)), 0)
    return _CallIntervals(AttentionMask.causal(batch, seq_len, past_len=past_len, device=device), past_len)


def padding_intervals(attention_mask: torch.Tensor, seq_len: int, past_len: int = 0) -> AttentionMask:
    """Causal attention under a 2-D padding mask ``[B, past_len + seq_len]`` (1: a real token):
    query row i (absolute position ``past_len + i``) sees the kept keys ``j <= past_len + i``.
    Each row's ones must be one contiguous run (right or left padding); rows before the run see
    nothing."""
    keep = attention_mask.bool()
    batch, total = keep.shape
    count = keep.sum(1)
    first = keep.int().argmax(1)  # 0 for a row of zeros
    last = total - keep.flip(1).int().argmax(1)
    split = (count > 0) & (count != last - first)
    if split.any():
        row = int(split.nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row}: its ones must form one contiguous run (right or left padding)")
    causal_end = torch.arange(past_len + 1, past_len + seq_len + 1, device=keep.device)
    start = torch.where(count > 0, first, 0)[:, None].expand(batch, seq_len)
    end = torch.maximum(torch.minimum(causal_end[None, :], torch.where(count > 0, last, 0)[:, None]), start)
    return AttentionMask(start.to(torch.int32).contiguous(), end.to(torch.int32).contiguous(), past_len + seq_len)


def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document ids ``[B, S]`` of sequences packed into one row, found where ``position_ids``
    do not step by one (as transformers finds them); None when every row holds one sequence."""
    steps = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    documents = (steps != 1).cumsum(-1)
    if (documents[:, -1] == 0).all():
        return None
    return documents


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
