"""Decode attention: one new query token per sequence against its KV cache (the generation step).

Public: ``decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None, softcap=None)`` with
``q [B, Hq, D]``, caches ``[B, max_len, Hkv, D]`` (GQA when Hkv divides Hq) and int32
``cache_lens [B]``; its meaning is ``unimm.kernels.reference.decode``. Inference only (no autograd).

Every cached key and value is read once per call, so the kernels are memory-bound and the goal
is HBM bandwidth. Both backends split the cache ("flash-decoding"): one program per
(batch row, KV head, query tile, split), where a query tile is the query heads of the GQA group
that share the KV head (so each KV head's cache is read once per group, not once per query
head); each writes its fp32 partial output and log-sum-exp, and a small combine kernel merges
the splits a row's length reaches. The split count comes from the shapes and the SM count only
(never from the lengths), so a call makes no host sync and allocates only shape-sized buffers:
a decode step that calls it can be captured in a CUDA graph.
  * cuda: ``csrc/decode.cu``, float16 / bfloat16, D in {64, 128, 256}, 16-byte aligned rows:
    up to 8 query heads per CTA on m16n8k16 tensor-core mmas, K and V loaded straight into
    registers with 16-byte loads (see the file's header).
  * triton: any of float16 / bfloat16 / float32 and D a power of two in [16, 256]; the group's
    scores with ``tl.dot`` when it has >= 16 query heads, else a broadcast multiply-sum.

Lengths: on CPU tensors ``cache_lens`` outside ``[0, max_len]`` is a ValueError; on CUDA they are
not read back (that would sync), and the kernels clamp them to ``[0, max_len]``: no read ever
leaves the cache.
"""

from __future__ import annotations

import math

import torch

from unimm import _ext
from unimm.kernels import dispatch
from unimm.kernels._common import cdiv, check_tensors, device_guard, dot_precision, multiprocessor_count
from unimm.kernels.reference import decode as reference

try:
    import triton
    import triton.language as tl

    from unimm.kernels._triton import LOG2E, tanh
except ImportError:  # the Triton backend is then not live (dispatch says why)
    triton = None

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES_TEXT = "float16, bfloat16 or float32"
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_HEAD_DIMS = (64, 128, 256)
# Split plan: about this many programs per SM (several resident per SM keep enough loads in
# flight), and at least this many loop steps per split (fewer would cost more in partials and
# per-program setup than they save).
_PROGRAMS_PER_SM = 4
_MIN_SPLIT_STEPS = 2
_MAX_SPLITS = 256  # csrc/ops.h kDecodeMaxSplits (the CUDA combine kernel's weights buffer)
_COMBINE_BLOCK_SPLITS = 16


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, *,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over the first ``cache_lens[b]`` rows of its cache.

    Args:
        q: ``[B, Hq, D]`` float16, bfloat16 or float32 (any strides).
        k_cache, v_cache: ``[B, max_len, Hkv, D]`` with ``Hq % Hkv == 0``, q's dtype and device;
            D a power of two in [16, 256]. Any strides with a contiguous last dim, so slices of
            a bigger buffer (e.g. ``cache[:, :max_len]``, one layer of a stacked cache) work as is.
        cache_lens: int32 ``[B]`` on q's device: row b attends to cache rows ``[0, cache_lens[b])``;
            0 gives an output of 0. CPU: must lie in ``[0, max_len]``. CUDA: not checked (no
            host sync), clamped to ``[0, max_len]`` in the kernel.
        scale: score scale, default ``D ** -0.5``.
        softcap: Gemma-2's ``c tanh(s / c)`` on the scaled scores, c > 0.

    Returns:
        ``[B, Hq, D]`` in q's dtype (a new contiguous tensor).

    Raises:
        TypeError: non-tensor arguments, non-floating or mismatched dtypes, cache_lens not int32.
        ValueError: wrong ranks or shapes, devices that differ, a cache whose last dim is not
            contiguous, a bad scale or softcap, CPU lengths outside ``[0, max_len]``.
    """
    _check_args(q, k_cache, v_cache, cache_lens, scale, softcap)
    if q.numel() == 0 or k_cache.shape[1] == 0:  # nothing to attend to: every row outputs 0
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    scale = q.shape[2]**-0.5 if scale is None else float(scale)
    return torch.ops.unimm.decode_attention(q, k_cache, v_cache, cache_lens, scale,
                                            float(softcap) if softcap is not None else None)


def _check_args(q, k_cache, v_cache, cache_lens, scale, softcap) -> None:
    check_tensors({"q": q}, dtypes=_DTYPES, kind=_DTYPES_TEXT, dims=3, layout="[batch, q_heads, head_dim]")
    check_tensors({"k_cache": k_cache, "v_cache": v_cache}, like=("q", q), dtypes=_DTYPES, kind=_DTYPES_TEXT,
                  same_dtype=True, dims=4, layout="[batch, max_len, kv_heads, head_dim]")
    batch, q_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be [{batch}, max_len, kv_heads, {head_dim}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k_cache.shape)}")
    kv_heads = k_cache.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q's heads ({q_heads}) must be a multiple of the caches' kv_heads ({kv_heads})")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    for name, value in (("k_cache", k_cache), ("v_cache", v_cache)):
        if value.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride 1), got strides {value.stride()}")
    check_tensors({"cache_lens": cache_lens}, like=("q", q), dtypes=(torch.int32,), kind="int32")
    if cache_lens.shape != (batch,):
        raise ValueError(f"cache_lens must be 1-D [{batch}] (one length per batch row), got shape "
                         f"{tuple(cache_lens.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0 (or None), got {softcap!r}")


def _check_lens_range(cache_lens: torch.Tensor, max_len: int) -> None:
    """CPU lengths only: reading them costs no device sync."""
    if cache_lens.device.type != "cpu" or cache_lens.numel() == 0:
        return
    low, high = torch.aminmax(cache_lens)
    if low < 0 or high > max_len:
        bad = int(low) if low < 0 else int(high)
        raise ValueError(f"cache_lens must lie in [0, max_len = {max_len}], found {bad}")


# ---------------------------------------------------------------------------------------------
# Op (opaque to torch.compile and CUDA graphs)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("unimm::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                         scale: float, softcap: float | None) -> torch.Tensor:
    _check_lens_range(cache_lens, k_cache.shape[1])
    if q.stride(2) != 1:
        q = q.contiguous()
    if cache_lens.stride(0) != 1:
        cache_lens = cache_lens.contiguous()
    backend = dispatch.select(
        "decode_attention", q.device, implemented=("cuda", "triton"),
        unsupported={"cuda": _cuda_unsupported(q, k_cache, v_cache)},
    )
    if backend == "cuda":
        return _decode_cuda(q, k_cache, v_cache, cache_lens, scale, softcap)
    if backend == "triton":
        return _decode_triton(q, k_cache, v_cache, cache_lens, scale, softcap)
    return reference.decode_attention(q, k_cache, v_cache, cache_lens, scale=scale, softcap=softcap)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_lens, scale, softcap):
    return q.new_empty(q.shape)


# ---------------------------------------------------------------------------------------------
# Shared launch helpers
# ---------------------------------------------------------------------------------------------

def split_plan(programs: int, max_len: int, step: int, device: torch.device) -> tuple[int, int]:
    """(splits, keys_per_split) for ``programs`` programs per split and a cache of ``max_len`` rows
    walked ``step`` rows at a time: about ``_PROGRAMS_PER_SM`` programs per SM in all, at least
    ``_MIN_SPLIT_STEPS`` steps per split, each split a whole number of steps, every split
    non-empty (the last may be partial). Shapes only: the same plan for every call of one
    shape, as CUDA graphs need."""
    wanted = cdiv(_PROGRAMS_PER_SM * multiprocessor_count(device), programs)
    splits = max(1, min(wanted, cdiv(max_len, _MIN_SPLIT_STEPS * step), _MAX_SPLITS))
    keys_per_split = cdiv(cdiv(max_len, splits), step) * step
    return cdiv(max_len, keys_per_split), keys_per_split


def _workspace(batch: int, q_heads: int, splits: int, head_dim: int, device: torch.device):
    """Per-split fp32 outputs ``[B, Hq, splits, D]`` (each normalised by its own sum) and their
    log2-sum-exp2 ``[B, Hq, splits]``; nothing is read before it is written."""
    return (torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=device),
            torch.empty(batch, q_heads, splits, dtype=torch.float32, device=device))


# ---------------------------------------------------------------------------------------------
# CUDA backend (csrc/decode.cu)
# ---------------------------------------------------------------------------------------------

def _cuda_unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> str | None:
    if not _ext.has("decode_attention"):
        return "unimm._C has no decode_attention"
    if q.dtype not in _CUDA_DTYPES:
        return f"its CUDA kernel serves float16 and bfloat16 only (got {q.dtype})"
    if q.shape[2] not in _CUDA_HEAD_DIMS:
        return f"its CUDA kernel serves head_dim in {_CUDA_HEAD_DIMS} only (got {q.shape[2]})"
    # 16-byte vector loads: every row must start on a 16-byte boundary
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16 or any(stride % 8 for stride in t.stride()[:-1]):
            return f"its CUDA kernel needs 16-byte aligned rows ({name} has strides {t.stride()})"
    return None


def _decode_cuda(q, k_cache, v_cache, cache_lens, scale, softcap):
    C = _ext.lib()
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    q_tiles = cdiv(q_heads // kv_heads, C.DECODE_QUERY_TILE)
    splits, keys_per_split = split_plan(batch * kv_heads * q_tiles, max_len, C.DECODE_SPLIT_KEYS, q.device)
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    part_out, part_lse = _workspace(batch, q_heads, splits, head_dim, q.device) if splits > 1 else (None, None)
    C.decode_attention(
        q=q.data_ptr(), q_batch_stride=q.stride(0), q_head_stride=q.stride(1),
        k_cache=k_cache.data_ptr(), k_batch_stride=k_cache.stride(0), k_row_stride=k_cache.stride(1),
        k_head_stride=k_cache.stride(2),
        v_cache=v_cache.data_ptr(), v_batch_stride=v_cache.stride(0), v_row_stride=v_cache.stride(1),
        v_head_stride=v_cache.stride(2),
        cache_lens=cache_lens.data_ptr(), out=out.data_ptr(), out_batch_stride=out.stride(0),
        out_head_stride=out.stride(1),
        part_out=part_out.data_ptr() if part_out is not None else 0,
        part_lse=part_lse.data_ptr() if part_lse is not None else 0,
        batch=batch, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len,
        keys_per_split=keys_per_split, splits=splits, scale=scale, softcap=softcap if softcap is not None else 0.0,
        dtype=_ext.DTYPE_CODES[q.dtype], device=q.device.index, stream=_ext.stream_handle(q.device),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

def _triton_config(group: int, head_dim: int, interpret: bool) -> dict:
    """Tiles and launch options; tests/triton_aot.py compiles them for sm_90a and sm_80 under each
    supported triton (3.6 and 3.9): no spills.

    Groups of >= 16 query heads take their scores and outputs from ``tl.dot`` (BLOCK_G rows per
    program, at most 64; groups of 33 or more fill 64-row tiles, which get wgmma on Hopper) and
    BLOCK_N = 128K / (BLOCK_G x D) keys a step, within [16, 64]; smaller groups a broadcast
    multiply-sum over a [BLOCK_G, BLOCK_N, D] product of at most 8192 fp32 values and at most 32
    keys. Both on 8 warps: with the former 4 (and 64 keys on the dot path up to BLOCK_G x D =
    4096) ptxas spilled a few bytes in the broadcast at D = 64 under triton 3.6 (capping
    registers at 168 a thread for occupancy), in the 64-row dot at D >= 128 on sm_80, and in
    float32's dot (3xTF32 doubles the operands) at 16 rows and D = 128 on sm_90a too. float32
    still spills on its dot path at 32+ rows with D = 256 and at 64 rows with D >= 128: this
    function is not told the dtype.
    """
    use_dot = group >= 16
    block_g = min(64, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)
    if interpret:  # small tiles: cheap on the CPU interpreter, and tests cross every boundary
        return dict(USE_DOT=use_dot, BLOCK_G=block_g, BLOCK_N=16, num_warps=1, num_stages=1)
    if use_dot:
        block_n = max(16, min(64, 128 * 1024 // (block_g * head_dim)))
    else:
        block_n = max(1, min(32, 64 * 128 // (block_g * head_dim)))
    return dict(USE_DOT=use_dot, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=8, num_stages=2)


def _decode_triton(q, k_cache, v_cache, cache_lens, scale, softcap):
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    config = _triton_config(group, head_dim, dispatch.TRITON_INTERPRET)
    q_tiles = cdiv(group, config["BLOCK_G"])
    splits, keys_per_split = split_plan(batch * kv_heads * q_tiles, max_len, config["BLOCK_N"], q.device)
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    part_out, part_lse = _workspace(batch, q_heads, splits, head_dim, q.device) if splits > 1 else (out, out)
    _launch_triton_split(q, k_cache, v_cache, cache_lens, out, part_out, part_lse, splits, keys_per_split,
                         scale, softcap, config)
    if splits > 1:
        _launch_triton_combine(part_out, part_lse, cache_lens, out, max_len, keys_per_split)
    return out


def _launch_triton_split(q, k_cache, v_cache, cache_lens, out, part_out, part_lse, splits, keys_per_split,
                         scale, softcap, config):
    """Split ``s`` of every (batch row, kv head, query tile): with one split the output itself,
    else its partial in ``part_out`` / ``part_lse`` (splits past a row's length write nothing)."""
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    q_tiles = cdiv(group, config["BLOCK_G"])
    with device_guard(q.device):
        _decode_split_kernel[(batch * kv_heads * q_tiles, splits)](
            q, k_cache, v_cache, cache_lens, out, part_out, part_lse,
            max_len, kv_heads, group, q_tiles, q_heads, keys_per_split, splits,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], out.stride(0), out.stride(1),
            scale, softcap if softcap is not None else 1.0,
            HAS_SOFTCAP=softcap is not None, SPLIT=splits > 1, HEAD_DIM=head_dim,
            PRECISION=dot_precision(q.dtype), **config,
        )


def _launch_triton_combine(part_out, part_lse, cache_lens, out, max_len, keys_per_split):
    batch, q_heads, splits, head_dim = part_out.shape
    with device_guard(out.device):
        _decode_combine_kernel[(batch * q_heads,)](
            part_out, part_lse, cache_lens, out, q_heads, max_len, keys_per_split, splits,
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_S=_COMBINE_BLOCK_SPLITS,
            num_warps=1 if dispatch.TRITON_INTERPRET else 4,
        )


if triton is not None:

    @triton.jit
    def _row_length(lens_ptr, b, max_len):
        """The row's cache length, clamped to [0, max_len]: reads never leave the cache."""
        return tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), max_len)

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
        max_len, kv_heads, group, q_tiles, q_heads, keys_per_split, num_splits,
        stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
        stride_ob, stride_oh, scale, softcap,
        HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
        USE_DOT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        program = tl.program_id(0)  # ((b * kv_heads) + kv_head) * q_tiles + q_tile
        split = tl.program_id(1)
        q_tile = program % q_tiles
        kv_head = (program // q_tiles) % kv_heads
        b = (program // (q_tiles * kv_heads)).to(tl.int64)
        length = _row_length(lens_ptr, b, max_len)
        begin = split * keys_per_split
        end = tl.minimum(length, begin + keys_per_split)

        members = q_tile * BLOCK_G + tl.arange(0, BLOCK_G)  # query heads of the group
        member_ok = members < group
        heads = kv_head * group + members
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                    mask=member_ok[:, None], other=0.0)
        if not USE_DOT:
            q = q.to(tl.float32)
        k_base = k_ptr + b * stride_kb + kv_head * stride_kh
        v_base = v_ptr + b * stride_vb + kv_head * stride_vh

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for n0 in range(begin, end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < end  # never past the row's length: the cache may hold anything there
            k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + dims[None, :], mask=col_ok[:, None],
                        other=0.0)
            v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + dims[None, :], mask=col_ok[:, None],
                        other=0.0)
            if USE_DOT:
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            else:
                s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
            s = s * scale
            if HAS_SOFTCAP:
                s = softcap * tanh(s / softcap)
            s = tl.where(col_ok[None, :], s * LOG2E, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: column n0 is visible
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if USE_DOT:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            else:
                acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
            m_i = m_new

        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        if SPLIT:
            part = (b * q_heads + heads) * num_splits + split
            write = member_ok & seen  # seen: the split reached some key of the row
            tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out, mask=write[:, None])
            tl.store(part_lse_ptr + part, m_i + tl.log2(tl.where(seen, l_i, 1.0)), mask=write)
        else:  # a row of length 0 stores 0
            tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=member_ok[:, None])

    @triton.jit
    def _decode_combine_kernel(
        part_out_ptr, part_lse_ptr, lens_ptr, out_ptr, q_heads, max_len, keys_per_split, num_splits,
        stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program per (batch row, query head): the splits its length reaches, each weighted
        by 2^(lse - max lse)."""
        row = tl.program_id(0).to(tl.int64)  # b * q_heads + head
        b = row // q_heads
        head = row % q_heads
        active = tl.cdiv(_row_length(lens_ptr, b, max_len), keys_per_split)
        lse_base = part_lse_ptr + row * num_splits
        dims = tl.arange(0, HEAD_DIM)

        m = tl.full([], float("-inf"), tl.float32)
        for s0 in range(0, active, BLOCK_S):
            splits = s0 + tl.arange(0, BLOCK_S)
            m = tl.maximum(m, tl.max(tl.load(lse_base + splits, mask=splits < active, other=float("-inf")), 0))
        total = tl.zeros([], tl.float32)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for s0 in range(0, active, BLOCK_S):
            splits = s0 + tl.arange(0, BLOCK_S)
            ok = splits < active
            weight = tl.exp2(tl.load(lse_base + splits, mask=ok, other=float("-inf")) - m)
            part = tl.load(part_out_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                           mask=ok[:, None], other=0.0)
            total += tl.sum(weight, 0)
            acc += tl.sum(weight[:, None] * part, 0)
        out = acc / tl.where(total > 0, total, 1.0)  # length 0: no split, output 0
        tl.store(out_ptr + b * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty))
