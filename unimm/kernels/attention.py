"""Attention under one-interval-per-row masks (causal, prefix-LM, packed docs with bidirectional
image spans, sliding windows), forward and backward, in Triton; two-interval masks (sinks plus a
window, a shared prompt, image blocks) run the same kernels once per interval, merged
(``unimm.kernels._attention_intervals``).

Public: ``attention(q, k, v, mask=None, *, scale=None, softcap=None)`` with ``q [B, S, Hq, D]``,
``k, v [B, Skv, Hkv, D]`` (GQA / MQA when Hkv divides Hq) and an ``AttentionMask``; its meaning
is ``unimm.kernels.reference.attention``.

Kernels (flash-attention 2 structure, fp32 statistics):
  * ``_attn_fwd_kernel``: one program per (query tile, batch x head). It loads its rows'
    intervals and visits only the key tiles in ``[min kv_start, max kv_end)``: tiles wholly
    outside every row's interval are never loaded. Tiles inside ``[max kv_start, min kv_end)``
    are visible to every row and skip the mask arithmetic. Saves the log-sum-exp (base 2).
  * ``_attn_bwd_dq_kernel``: the same walk, accumulating dQ.
  * ``_attn_bwd_dkdv_kernel``: one program per (key tile, batch x kv head); it walks the query
    tiles ``mask.tile_bounds`` says may see it, for every query head of its group, in one
    pipelined loop (GQA sums land in registers, no atomics), accumulating dK and dV. Its tiles
    are transposed, keys x query rows (flash-attention 2's order: S^T = K Q^T, dV += P^T dO,
    dP^T = V dO^T, dK += dS^T Q), so the keys are the M of all four dots.
  * ``_key_flags_kernel`` (before the forward and the backward) flags the keys whose k or v
    row holds a NaN or an infinity, and ``_attn_bwd_prep_kernel`` (before the backward) makes
    delta = dO . O and flags the rows whose results are NaN: see "non-finite inputs" in
    ``unimm.kernels._attention_triton``, which holds the kernels. Each of the three main kernels
    is launched twice, for the programs that meet no flagged row (the unchanged loop) and for the
    others (flagged rows loaded as zeros).
Tiles (``_config``). Every key tile a query tile sees costs the forward 2 dots (4 M N D FLOPs)
for 4 N D bytes of K and V (bf16), so M FLOPs per byte; dQ 3 dots, 1.5 M; dK/dV 4 dots for
4 M D bytes of Q and dO, 2 N. Those bytes come from L2 at best, and the larger the tile side
the operands are re-read along, the fewer: on sm_90a, whose wgmma takes M in 64-row warpgroup
slices, the forward and dQ take 128 query rows (128 and 192 FLOPs/byte; dQ was 64 x 32, 96)
and dK/dV 128 keys (256; was 32 x 64, 128, with two of its dots on mma.sync), at D <= 128 (64
keys for the padded 72-96, which spill at 128). sm_80 takes what fits its registers. D = 256:
dQ 128 x 32; dK/dV's two [keys, 256] fp32 accumulators would spill, so on sm_90a each program
writes one half of the head dim (``OUT_D``) of 128 keys, on wgmma: its scores and dP still take
all 256 dims, computed once per half, so 12 M N D FLOPs per tile pair instead of 8 (mma.sync on
sm_80's 16 x 32 tiles instead). The forward's softmax does not
overlap its MMAs: on sm_90a, neither triton 3.6 nor 3.9 leaves a wgmma in flight across the
softmax (``wgmma.wait_group 0`` in the loop), whether the loop asks for warp specialisation
(``tl.range(warp_specialize=True)``: the same code) or issues the next tile's scores first by
hand (which also spills on sm_80).
This module checks the arguments, dispatches, and launches the kernels from custom ops with their
autograd. On CUDA, a call a vendor kernel computes exactly (no mask or plain causal -> SDPA;
packed causal documents -> FlashAttention varlen, when installed) goes to it first
(``unimm.kernels._attention_vendor`` says which layouts and why); ``attention_backend`` says
which kernel a call gets, and ``UNIMM_BACKEND=triton`` always runs unimm's own.

Masks change from batch to batch without recompiling: intervals are data, not code. Mask values
outside ``[0, Skv]`` are clamped to it, here and in the reference alike (never read back).
"""

from __future__ import annotations

import functools
import math

import torch

from unimm.kernels import _attention_intervals as two_intervals
from unimm.kernels import _attention_vendor as vendor
from unimm.kernels import dispatch
from unimm.kernels._common import (
    cdiv,
    check_head_dim,
    check_tensors,
    device_guard,
    dot_precision,
    is_real,
    padded_head_dim,
    unserved_dtype,
)
from unimm.kernels.masks import AttentionMask
from unimm.kernels.reference import attention as reference

try:
    from unimm.kernels import _attention_triton as kernels
except ImportError:  # no triton: the Triton backend is then not live (dispatch says why)
    kernels = None

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None, *,
              scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Softmax attention where query row i of batch b sees keys ``[kv_start[b, i], kv_end[b, i])``
    (and ``[kv_start2[b, i], kv_end2[b, i])`` under a two-interval mask).

    Args:
        q: ``[B, S, Hq, D]``; k, v: ``[B, Skv, Hkv, D]`` with ``Hq % Hkv == 0``; one dtype
            (float16, bfloat16; float32 too, mainly for CPU tests); D a multiple of 8 in [16, 256]
            (SigLIP's 72, Phi-2's 80, Phi-3's 96 included: the kernels pad D to the next power of
            two in registers, not by copying q, k, v).
        mask: an ``AttentionMask`` of shape ``[B, S]`` needing at most Skv keys; None: every key.
            Interval bounds outside ``[0, Skv]`` (only a hand-built mask has them) are clamped
            to it on every backend: checking them would read the mask back from the device.
        scale: score scale (a finite number), default ``D ** -0.5``.
        softcap: Gemma-2's ``c tanh(s / c)`` on the scores, c a finite number > 0.

    Returns:
        ``[B, S, Hq, D]`` in q's dtype. Rows that see no key are 0, with 0 gradients.

    Non-finite inputs propagate to exactly the results that depend on them, by row: a row whose
    q, or a key or value it sees, holds a NaN or an infinity outputs NaN; in backward such a
    row, or one whose upstream gradient is not finite, gets a NaN dQ, every key it sees a NaN
    dK, and a NaN dV too unless only values were non-finite (they do not change the
    probabilities dV is made of). Keys, values and rows outside an interval, padding included,
    contribute exactly nothing, whatever they hold. One exception, under automatic dispatch on
    CUDA: the calls a vendor kernel serves (no mask; plain causal or packed causal documents over
    exactly S keys, so no key is hidden from every row: no cache tail, no padding) follow the
    vendor's rule, where a non-finite k or v can also reach the earlier rows of its diagonal tile
    (``0 * NaN``); ``UNIMM_BACKEND=triton`` keeps the exact rule there too.
    """
    _check_args(q, k, v, mask, scale, softcap)
    batch, seq_len, q_heads, head_dim = q.shape
    num_keys = k.shape[1]
    scale = head_dim**-0.5 if scale is None else float(scale)
    backend, vendor_kernel = _select(q, k, mask, softcap)
    if backend == "vendor" and q.numel() and num_keys:
        return vendor.attention(q, k, v, mask, vendor_kernel, scale)
    if mask is None:
        end = torch.full((batch, seq_len), num_keys, dtype=torch.int32, device=q.device)
        mask = AttentionMask(torch.zeros_like(end), end, num_keys)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))  # kernels read rows of D
    if backend in ("reference", "vendor") or q.numel() == 0 or num_keys == 0:
        with torch.autocast(q.device.type, enabled=False):  # compute in fp32, not an enclosing autocast's dtype
            return reference.attention(q, k, v, mask, scale=scale, softcap=softcap,
                                       compute_dtype=torch.promote_types(q.dtype, torch.float32))
    config = _config(head_dim, q.dtype, dispatch.TRITON_INTERPRET)
    if mask.kv_start2 is not None:  # two intervals per row: the kernels below once per interval, merged
        parts = [(part.kv_start, part.kv_end, *part.tile_bounds(config["dkdv"]["BLOCK_M"], config["dkdv"]["BLOCK_N"],
                                                                num_keys)) for part in mask.parts()]
        return two_intervals.attention(q, k, v, parts, scale, float(softcap) if softcap is not None else None,
                                       _attention_op, _attention_backward_op)
    first, last = mask.tile_bounds(config["dkdv"]["BLOCK_M"], config["dkdv"]["BLOCK_N"], num_keys)
    out, _ = _attention_op(q, k, v, mask.kv_start, mask.kv_end, first, last, scale,
                           float(softcap) if softcap is not None else None)
    return out


def attention_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None = None, *,
                      softcap: float | None = None) -> str:
    """Which kernel ``attention(q, k, v, mask, softcap=softcap)`` runs: ``"reference"``,
    ``"triton"`` (unimm's own), or the vendor kernel (``"sdpa"``, ``"flash_attn_varlen"``). Reads
    no data; the benchmark and ``unimm info`` report it."""
    _check_args(q, k, v, mask, None, softcap)
    backend, vendor_kernel = _select(q, k, mask, softcap)
    return vendor_kernel if backend == "vendor" else backend


def _select(q, k, mask, softcap) -> tuple[str, str | None]:
    """(dispatch's backend, the vendor kernel when it is "vendor")."""
    vendor_kernel, why_not = vendor.kernel_for(q, k, mask, softcap)
    backend = dispatch.select("attention", q.device, implemented=("vendor", "triton"),
                              unsupported={"vendor": why_not, "triton": unserved_dtype(q.dtype, _KERNEL_DTYPES)})
    return backend, vendor_kernel


def _check_args(q, k, v, mask, scale, softcap) -> None:
    check_tensors({"q": q}, floating=True, dims=4, layout="[batch, seq, heads, head_dim]")
    check_tensors({"k": k, "v": v}, like=("q", q), floating=True, same_dtype=True, dims=4,
                  layout="[batch, seq, heads, head_dim]")
    batch, seq_len, q_heads, head_dim = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must be [{batch}, Skv, Hkv, {head_dim}] to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    kv_heads = k.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q's heads ({q_heads}) must be a multiple of k/v's heads ({kv_heads})")
    check_head_dim(head_dim)
    if mask is not None:
        if not isinstance(mask, AttentionMask):
            raise TypeError(f"mask must be an AttentionMask or None, got {type(mask).__name__}")
        if mask.shape != (batch, seq_len):
            raise ValueError(f"mask must be for [batch, seq] = [{batch}, {seq_len}], got {list(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask is on {mask.device} but q is on {q.device}")
        if mask.num_keys > k.shape[1]:
            raise ValueError(f"mask lets rows see up to {mask.num_keys} keys but k has {k.shape[1]}")
    for name, value, positive in (("scale", scale, False), ("softcap", softcap, True)):
        if value is None:
            continue
        if not is_real(value):
            raise TypeError(f"{name} must be a real number (or None), got {type(value).__name__}")
        if not math.isfinite(value) or (positive and not value > 0):
            raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''} (or None), got {value!r}")


def _config(head_dim: int, dtype: torch.dtype, interpret: bool, arch: int | None = None) -> dict:
    """Tiles per kernel for a GPU of compute capability ``arch`` (major * 10 + minor; None: the
    oldest GPU of this process, so that every call agrees, forward and backward alike).

    tests/triton_aot.py compiles them for sm_90a and sm_80 under each supported triton (3.6 and
    3.9): no spills, shared memory within the chip. Hopper's wgmma takes M in 64-row slices (one
    per warpgroup), so on sm_90a the forward and dQ tiles have 128 query rows (64 at D = 256's
    forward) and dK/dV's 128 keys (its dots' M; at D = 256, for half the head dim per program: the
    docstring of this module); sm_80's mma.sync takes any 16 rows, and its tiles are those that fit
    its registers. BLOCK_M is always query rows and BLOCK_N keys (``AttentionMask.tile_bounds``
    plans the dK/dV walk from them); dK/dV's ``OUT_D`` is the head-dim columns a program writes.
    A head dim padded to its power of two (``padded_head_dim``) takes that power's tiles, except the
    forward's pipeline (2 stages, as its [keys, D] load masks spill the 3-stage one on sm_80) and
    Hopper's dK/dV (64 keys: 128 spill by 8 bytes under triton 3.9).
    """
    padded = padded_head_dim(head_dim) != head_dim
    head_dim = padded_head_dim(head_dim)
    config = _tiles(head_dim, padded, dtype, interpret, arch)
    config["dkdv"] = dict(config["dkdv"])
    config["dkdv"].setdefault("OUT_D", head_dim)  # dK/dV columns per program: all, but for split heads
    return config


def _tiles(head_dim: int, padded: bool, dtype: torch.dtype, interpret: bool, arch: int | None) -> dict:
    """``_config``'s tiles for a power-of-two ``head_dim`` (``padded``: the caller's is smaller)."""
    if interpret:
        tiles = dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
        return dict(fwd=tiles, dq=tiles, dkdv=tiles)
    tiles = lambda m, n, warps, stages: dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
    if dtype == torch.float32:  # a CPU-test dtype that still has to run on GPUs: small and safe
        return dict(fwd=tiles(32, 32, 4, 2), dq=tiles(32, 32, 4, 2), dkdv=tiles(32, 32, 8, 2))
    hopper = (arch if arch is not None else _oldest_arch()) >= 90
    if head_dim <= 64:
        return dict(fwd=tiles(128, 64, 4, 2 if padded else 3),
                    dq=tiles(128, 64, 8, 3) if hopper else tiles(128, 32, 8, 3),
                    dkdv=tiles(64, 128, 8, 3) if hopper else tiles(32, 128, 8, 2))
    if head_dim == 128:  # dK/dV: 64 query rows x 128 keys spill, and so do 32 x 128 with padded loads
        hopper_dkdv = tiles(32, 64, 8, 3) if padded else tiles(32, 128, 8, 2)
        return dict(fwd=tiles(128, 64, 8, 2 if padded else 3),
                    dq=tiles(128, 64, 8, 3) if hopper else tiles(64, 32, 4, 3),
                    dkdv=hopper_dkdv if hopper else tiles(32, 64, 8, 2))
    # D = 256 (Gemma): dK/dV's two [keys, 256] fp32 accumulators would take 128 registers a thread
    # at 64 keys and spill under triton 3.9. On Hopper each program writes half of the head dim
    # (OUT_D = 128) for 128 keys, on wgmma; sm_80 keeps 32 keys on mma.sync. dQ's 128 rows fit.
    return dict(fwd=tiles(64, 64, 8, 2), dq=tiles(128, 32, 8, 2) if hopper else tiles(64, 32, 8, 2),
                dkdv=dict(tiles(16, 128, 8, 2), OUT_D=128) if hopper else tiles(16, 32, 8, 2))


@functools.lru_cache(maxsize=None)
def _oldest_arch() -> int:
    """The lowest compute capability (major * 10 + minor) among this process's GPUs; one value per
    process, so the tiles (and the mask's tile bounds built from them) never depend on which
    device is current. 90 when torch sees none."""
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return 90
    return min(major * 10 + minor for major, minor in
               (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())))


# ---------------------------------------------------------------------------------------------
# Ops (opaque to torch.compile) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("unimm::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                  tile_first: torch.Tensor, tile_last: torch.Tensor, scale: float,
                  softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, Hq, D], lse2 [B, Hq, S] fp32: log2-sum-exp2 of the scaled scores, +inf for
    rows that see nothing)."""
    batch, seq_len, q_heads, head_dim = q.shape
    out = torch.empty_like(q)
    lse2 = torch.empty(batch, q_heads, seq_len, dtype=torch.float32, device=q.device)
    tiles = _config(head_dim, q.dtype, dispatch.TRITON_INTERPRET)["fwd"]
    grid = (cdiv(seq_len, tiles["BLOCK_M"]), batch * q_heads)
    with device_guard(q.device):
        flags, counts = _key_flags(k, v)
        for safe in (False, True):  # each program runs in one of the two (see "non-finite inputs")
            kernels._attn_fwd_kernel[grid](
                q, k, v, out, lse2, kv_start, kv_end, flags, counts, seq_len, k.shape[1], q_heads,
                q_heads // k.shape[2], *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                kv_start.stride(0), scale, softcap if softcap is not None else 1.0,
                HAS_SOFTCAP=softcap is not None, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
                PRECISION=dot_precision(q.dtype), SAFE=safe, **tiles,
            )
    return out, lse2


@_attention_op.register_fake
def _(q, k, v, kv_start, kv_end, tile_first, tile_last, scale, softcap):
    batch, seq_len, q_heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, q_heads, seq_len), dtype=torch.float32)


def _key_flags(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys hold a non-finite k or v entry: int32 flags ``[B, Hkv, 3, Skv]`` (see
    ``_key_flags_kernel``), and running counts ``[B, Hkv, 2, Skv]`` along the keys of those whose
    k or v row does (plane 0) and of those whose k row does (plane 1)."""
    batch, num_keys, kv_heads, head_dim = k.shape
    flags = torch.empty(batch, kv_heads, 3, num_keys, dtype=torch.int32, device=k.device)
    block = 16 if dispatch.TRITON_INTERPRET else max(8, 2048 // padded_head_dim(head_dim))
    kernels._key_flags_kernel[(cdiv(num_keys, block), batch * kv_heads)](
        k, v, flags, num_keys, kv_heads, *k.stride()[:3], *v.stride()[:3], HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim), BLOCK=block,
        num_warps=1 if dispatch.TRITON_INTERPRET else 4)
    return flags, flags[:, :, 1:].cumsum(-1, dtype=torch.int32)


@torch.library.custom_op("unimm::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse2: torch.Tensor, kv_start: torch.Tensor, kv_end: torch.Tensor,
                           tile_first: torch.Tensor, tile_last: torch.Tensor, scale: float,
                           softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, seq_len, q_heads, head_dim = q.shape
    num_keys, kv_heads = k.shape[1], k.shape[2]
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    # per query row (see _attn_bwd_prep_kernel): delta = dO . O, fp32 [B, Hq, S], and flags; per
    # kv head and poison level, the poisoned rows' intervals as +1 / -1 marks
    delta = torch.empty(batch, q_heads, seq_len, dtype=torch.float32, device=q.device)
    row_flags = torch.empty(batch, q_heads, seq_len, dtype=torch.int8, device=q.device)
    spans = torch.zeros(batch, kv_heads, 2, num_keys + 1, dtype=torch.int32, device=q.device)
    config = _config(head_dim, q.dtype, dispatch.TRITON_INTERPRET)
    common = dict(HAS_SOFTCAP=softcap is not None, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
                  PRECISION=dot_precision(q.dtype))
    cap = softcap if softcap is not None else 1.0
    with device_guard(q.device):
        flags, counts = _key_flags(k, v)
        prep_rows = 16 if dispatch.TRITON_INTERPRET else max(1, 2048 // padded_head_dim(head_dim))
        kernels._attn_bwd_prep_kernel[(cdiv(seq_len, prep_rows), batch * q_heads)](
            q, grad_out, out, delta, row_flags, spans, kv_start, kv_end, counts, seq_len, num_keys, q_heads,
            q_heads // kv_heads, *q.stride()[:3], *grad_out.stride()[:3], *out.stride()[:3], kv_start.stride(0),
            HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=prep_rows,
            num_warps=1 if dispatch.TRITON_INTERPRET else 4,
        )
        for safe in (False, True):  # each program runs in one of the two (see "non-finite inputs")
            kernels._attn_bwd_dq_kernel[(cdiv(seq_len, config["dq"]["BLOCK_M"]), batch * q_heads)](
                q, k, v, grad_out, dq, lse2, delta, kv_start, kv_end, flags, counts, row_flags, seq_len, num_keys,
                q_heads, q_heads // kv_heads,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dq.stride()[:3],
                kv_start.stride(0), scale, cap, SAFE=safe, **common, **config["dq"],
            )
        row_counts = (row_flags & 1).cumsum(-1, dtype=torch.int32)  # rows whose q or dO is not finite
        seen = spans.cumsum(-1, dtype=torch.int32)  # > 0: a poisoned row sees the key
        for safe in (False, True):
            slices = padded_head_dim(head_dim) // config["dkdv"]["OUT_D"]  # programs per key tile
            kernels._attn_bwd_dkdv_kernel[(cdiv(num_keys, config["dkdv"]["BLOCK_N"]) * slices, batch * kv_heads)](
                q, k, v, grad_out, dk, dv, lse2, delta, kv_start, kv_end, tile_first, tile_last, flags, row_flags,
                row_counts, seen, seq_len, num_keys, q_heads, kv_heads, q_heads // kv_heads,
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3], *dk.stride()[:3],
                *dv.stride()[:3], kv_start.stride(0), tile_first.stride(0), scale, cap, SAFE=safe, **common,
                **config["dkdv"],
            )
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse2, kv_start, kv_end, tile_first, tile_last, scale, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, kv_end, tile_first, tile_last, scale, softcap = inputs
    out, lse2 = output
    ctx.mark_non_differentiable(lse2)
    ctx.save_for_backward(q, k, v, out, lse2, kv_start, kv_end, tile_first, tile_last)
    ctx.options = (scale, softcap)


def _backward(ctx, grad_out, grad_lse2):
    q, k, v, out, lse2, kv_start, kv_end, tile_first, tile_last = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse2, kv_start, kv_end, tile_first, tile_last,
                                        *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)
