"""Attention calls that a vendor kernel computes exactly: the ``"vendor"`` backend of ``attention``.

docs/ARCHITECTURE.md, "Dispatch": where a kernel someone else ships computes the same thing and
is installed, a CUDA call goes to it. Two layouts qualify, recognised from the mask's ``layout``
(what its builder knew, never read back from the device):
  * no mask, or ``AttentionMask.causal`` without cached keys, over exactly ``S`` keys -> torch's
    ``scaled_dot_product_attention`` (``is_causal``; torch picks cuDNN or FlashAttention), GQA
    through ``enable_gqa``;
  * ``AttentionMask.from_spans`` without bidirectional spans or padding (packed causal
    documents), over exactly ``S`` keys -> FlashAttention's ``flash_attn_varlen_func`` (the
    ``flash_attn`` package, or flash-attn-4's ``flash_attn.cute``) when importable. Its first
    call with a mask reads the document boundaries back once (``AttentionMask.documents``).
Both need fp16 / bf16, no softcap, and every key a row cannot see to be seen by a later row (the
key count equals ``S``): those kernels multiply a zero probability by the keys of their diagonal
tile, so a key nobody sees (a static cache's unused tail) could reach a row as ``0 * NaN``; with
``S`` keys no such key exists. Everything else (intervals with bidirectional spans, windows,
prefill after a cache, softcap, any hand-built mask) is unimm's own Triton kernel.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F

from unimm.kernels.masks import AttentionMask

SDPA = "sdpa"
FLASH_VARLEN = "flash_attn_varlen"
_DTYPES = (torch.float16, torch.bfloat16)
# torch >= 2.5 broadcasts kv heads inside SDPA; older torch gets repeated k / v
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


@functools.lru_cache(maxsize=None)
def flash_varlen() -> tuple[object | None, str]:
    """FlashAttention's varlen function and where it came from, or (None, why not)."""
    errors = []
    for module in ("flash_attn.cute", "flash_attn"):  # flash-attn-4 first: the Hopper / Blackwell one
        try:
            found = importlib.import_module(module)
        except Exception as error:  # a broken install (missing CUDA libs) is "not installed" here
            errors.append(f"{module}: {type(error).__name__}")
            continue
        function = getattr(found, "flash_attn_varlen_func", None)
        if function is not None:
            return function, f"{module} {getattr(found, '__version__', '')}".strip()
    return None, "FlashAttention is not installed (" + "; ".join(errors) + ")"


def kernel_for(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask | None, softcap: float | None) -> tuple[
        str | None, str | None]:
    """(the vendor kernel that computes this call, None) or (None, why none does). Reads no data."""
    seq_len, num_keys = q.shape[1], k.shape[1]
    if softcap is not None:
        return None, "no vendor kernel applies a softcap"
    if q.dtype not in _DTYPES:
        return None, f"vendor kernels take float16 / bfloat16, not {q.dtype}"
    if mask is None:
        return SDPA, None
    if mask.layout is None:
        return None, "the mask is not plain causal or packed causal documents (its builder says so)"
    if num_keys != seq_len:
        return None, f"the mask's layout needs as many keys as queries ({seq_len}), got {num_keys}"
    if mask.layout == "causal":
        return SDPA, None
    function, origin = flash_varlen()
    return (FLASH_VARLEN, None) if function is not None else (None, origin)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None, kernel: str,
              scale: float) -> torch.Tensor:
    """Run ``kernel`` (from ``kernel_for``); differentiable through the vendor's own backward. In
    q's dtype whatever an enclosing autocast says, as unimm's own kernel."""
    with torch.autocast(q.device.type, enabled=False):
        return _run(q, k, v, mask, kernel, scale)


def _run(q, k, v, mask, kernel, scale) -> torch.Tensor:
    if kernel == SDPA:
        return _sdpa(q, k, v, causal=mask is not None, scale=scale)
    batch, seq_len, q_heads, head_dim = q.shape
    cu_seqlens, longest = mask.documents()
    function, _ = flash_varlen()
    flat = [t.reshape(batch * seq_len, t.shape[2], head_dim) for t in (q, k, v)]
    result = function(*flat, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=longest,
                      max_seqlen_k=longest, softmax_scale=scale, causal=True)
    out = result[0] if isinstance(result, tuple) else result  # flash-attn-4 also returns the lse
    return out.reshape(batch, seq_len, q_heads, head_dim)


def _sdpa(q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
    group = q.shape[2] // k.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D] views, no copies
    options = {}
    if group > 1 and _SDPA_GQA:
        options["enable_gqa"] = True
    elif group > 1:
        k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **options).transpose(1, 2)


def served_layouts() -> dict[str, str]:
    """Each mask layout -> the backend a CUDA fp16 / bf16 call without softcap gets (``unimm info``)."""
    function, origin = flash_varlen()
    return {
        "no mask": f"vendor: torch SDPA (torch {torch.__version__})",
        "causal (AttentionMask.causal, no cache)": f"vendor: torch SDPA (torch {torch.__version__})",
        "packed causal documents (from_spans, no spans / padding)":
            f"vendor: flash_attn_varlen_func ({origin})" if function is not None else f"triton ({origin})",
        "every other mask, softcap, float32": "triton (unimm)",
    }
