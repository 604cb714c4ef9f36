"""Decode attention: one new query token per sequence against its KV cache (the generation step).

Public: ``decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None, softcap=None,
block_table=None)`` with ``q [B, Hq, D]``, caches ``[B, max_len, Hkv, D]`` (GQA when Hkv divides
Hq) and int32 ``cache_lens [B]``; or paged, as vLLM and flashinfer: caches
``[num_pages, page_size, Hkv, D]`` (the same row layout, pages in place of batch rows) and an int32
``block_table [B, max_pages]``. Its meaning is ``unimm.kernels.reference.decode``. Inference only
(no autograd).

Every cached key and value is read once per call, so the kernels are memory-bound and the goal
is HBM bandwidth. Both backends split the cache ("flash-decoding"): one program per
(batch row, KV head, query tile, split), where a query tile is the query heads of the GQA group
that share the KV head (so each KV head's cache is read once per group, not once per query
head); each writes its fp32 partial output and log-sum-exp, and a small combine kernel merges
the splits a row's length reaches. The split count comes from the shapes and the SM count only
(never from the lengths), so a call makes no host sync and allocates only shape-sized buffers:
a decode step that calls it can be captured in a CUDA graph.
  * cuda: ``csrc/decode.cu``, float16 / bfloat16, D in {64, 128, 256}, contiguous (not paged)
    caches, 16-byte aligned rows:
    up to 8 query heads per CTA on m16n8k16 tensor-core mmas, K and V loaded straight into
    registers with 16-byte loads (see the file's header).
  * triton: any of float16 / bfloat16 / float32 and D any multiple of 8 in [16, 256] (padded in
    the kernel to the next power of two, as ``_common.padded_head_dim``: the padding columns load
    as zeros and are never stored, so HBM bytes stay those of the real D); the group's scores with
    ``tl.dot`` when it has >= 16 query heads, else a broadcast multiply-sum. Paged, each key's
    row address goes through its page id (BLOCK_N int32 loads a step, L1/L2-resident, against
    BLOCK_N x Hkv-head rows of 2D bytes each: the same HBM bytes as the contiguous cache).

Lengths: on CPU tensors ``cache_lens`` outside ``[0, max_len]`` is a ValueError; on CUDA they are
not read back (that would sync), and the kernels clamp them to ``[0, max_len]``: no read ever
leaves the cache. Paged: on CPU a page id that a row's length reaches outside ``[0, num_pages)``
is a ValueError; on CUDA it is not read back, the kernel never reads through it (masked loads)
and that row's output is NaN, as for out-of-vocabulary ids elsewhere (README, "Non-finite
values"). Table entries past a row's length are never read.
"""

from __future__ import annotations

import math

import torch

from unimm import _ext
from unimm.kernels import dispatch
from unimm.kernels._common import (
    cdiv,
    check_head_dim,
    check_tensors,
    device_guard,
    dot_precision,
    multiprocessor_count,
    padded_head_dim,
)
from unimm.kernels.reference import decode as reference

try:
    import triton

    from unimm.kernels._decode_triton import _decode_combine_kernel, _decode_split_kernel
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
                     scale: float | None = None, softcap: float | None = None,
                     block_table: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query token per sequence over the first ``cache_lens[b]`` rows of its cache.

    Args:
        q: ``[B, Hq, D]`` float16, bfloat16 or float32 (any strides).
        k_cache, v_cache: ``[B, max_len, Hkv, D]`` with ``Hq % Hkv == 0``, q's dtype and device;
            D a multiple of 8 in [16, 256]. Any strides with a contiguous last dim, so slices of
            a bigger buffer (e.g. ``cache[:, :max_len]``, one layer of a stacked cache) work as is.
        cache_lens: int32 ``[B]`` on q's device: row b attends to cache rows ``[0, cache_lens[b])``;
            0 gives an output of 0. CPU: must lie in ``[0, max_len]``. CUDA: not checked (no
            host sync), clamped to ``[0, max_len]`` in the kernel.
        scale: score scale, default ``D ** -0.5``.
        softcap: Gemma-2's ``c tanh(s / c)`` on the scaled scores, c > 0.
        block_table: paged caches: int32 ``[B, max_pages]`` on q's device; then ``k_cache`` and
            ``v_cache`` are ``[num_pages, page_size, Hkv, D]`` with page_size a power of two in
            [16, 256], key j of row b is slot ``j % page_size`` of page ``block_table[b, j //
            page_size]``, and max_len is ``max_pages * page_size``. Page ids a row's length
            reaches must lie in ``[0, num_pages)``: checked on CPU; on CUDA a bad one makes the
            row's output NaN (never read through). Entries past the length may hold anything.

    Returns:
        ``[B, Hq, D]`` in q's dtype (a new contiguous tensor).

    Raises:
        TypeError: non-tensor arguments, non-floating or mismatched dtypes, cache_lens or
            block_table not int32.
        ValueError: wrong ranks or shapes, devices that differ, a cache whose last dim is not
            contiguous, a bad scale, softcap or page size, CPU lengths outside ``[0, max_len]``,
            CPU page ids outside ``[0, num_pages)``.
    """
    _check_args(q, k_cache, v_cache, cache_lens, scale, softcap, block_table)
    if q.numel() == 0 or _max_len(k_cache, block_table) == 0:  # nothing to attend to: every row outputs 0
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    scale = q.shape[2]**-0.5 if scale is None else float(scale)
    return torch.ops.unimm.decode_attention(q, k_cache, v_cache, cache_lens, scale,
                                            float(softcap) if softcap is not None else None, block_table)


def _max_len(k_cache: torch.Tensor, block_table: torch.Tensor | None) -> int:
    return k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)


def _check_args(q, k_cache, v_cache, cache_lens, scale, softcap, block_table) -> None:
    check_tensors({"q": q}, dtypes=_DTYPES, kind=_DTYPES_TEXT, dims=3, layout="[batch, q_heads, head_dim]")
    paged = block_table is not None
    check_tensors({"k_cache": k_cache, "v_cache": v_cache}, like=("q", q), dtypes=_DTYPES, kind=_DTYPES_TEXT,
                  same_dtype=True, dims=4, layout="[num_pages, page_size, kv_heads, head_dim]" if paged
                  else "[batch, max_len, kv_heads, head_dim]")
    batch, q_heads, head_dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    if paged:
        _check_block_table(q, k_cache, block_table)
    elif k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be [{batch}, max_len, kv_heads, {head_dim}] to match q {tuple(q.shape)}, "
                         f"got {tuple(k_cache.shape)}")
    kv_heads = k_cache.shape[2]
    if kv_heads == 0 or q_heads % kv_heads:
        raise ValueError(f"q's heads ({q_heads}) must be a multiple of the caches' kv_heads ({kv_heads})")
    check_head_dim(head_dim)
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


def _check_block_table(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor) -> None:
    check_tensors({"block_table": block_table}, like=("q", q), dtypes=(torch.int32,), kind="int32", dims=2,
                  layout="[batch, max_pages]")
    batch, _, head_dim = q.shape
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must be [{batch}, max_pages] (one row per batch row of q), got shape "
                         f"{tuple(block_table.shape)}")
    page_size = k_cache.shape[1]
    if page_size < 16 or page_size > 256 or page_size & (page_size - 1):
        raise ValueError(f"page_size (k_cache.shape[1] with a block_table) must be a power of two in [16, 256], "
                         f"got {page_size}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must be [num_pages, page_size, kv_heads, {head_dim}] to match q "
                         f"{tuple(q.shape)}, got {tuple(k_cache.shape)}")


def _check_page_ids(block_table: torch.Tensor, cache_lens: torch.Tensor, page_size: int, num_pages: int) -> None:
    """CPU tables only: the page ids each row's length reaches lie in [0, num_pages)."""
    if block_table.device.type != "cpu" or block_table.numel() == 0:
        return
    pages_used = (cache_lens.long() + page_size - 1) // page_size
    used = torch.arange(block_table.shape[1])[None, :] < pages_used[:, None]
    ids = block_table[used]
    bad = ids[(ids < 0) | (ids >= num_pages)]
    if bad.numel():
        raise ValueError(f"block_table must hold page ids in [0, num_pages = {num_pages}) up to each row's "
                         f"cache_lens, found {int(bad[0])}")


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
                         scale: float, softcap: float | None,
                         block_table: torch.Tensor | None = None) -> torch.Tensor:
    _check_lens_range(cache_lens, _max_len(k_cache, block_table))
    if block_table is not None:
        _check_page_ids(block_table, cache_lens, k_cache.shape[1], k_cache.shape[0])
        if block_table.stride(1) != 1:
            block_table = block_table.contiguous()
    if q.stride(2) != 1:
        q = q.contiguous()
    if cache_lens.stride(0) != 1:
        cache_lens = cache_lens.contiguous()
    backend = dispatch.select(
        "decode_attention", q.device, implemented=("cuda", "triton"),
        unsupported={"cuda": _cuda_unsupported(q, k_cache, v_cache, block_table)},
    )
    if backend == "cuda":
        return _decode_cuda(q, k_cache, v_cache, cache_lens, scale, softcap)
    if backend == "triton":
        return _decode_triton(q, k_cache, v_cache, cache_lens, scale, softcap, block_table)
    return reference.decode_attention(q, k_cache, v_cache, cache_lens, scale=scale, softcap=softcap,
                                      block_table=block_table)


@_decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_lens, scale, softcap, block_table=None):
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

def _cuda_unsupported(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_table: torch.Tensor | None = None) -> str | None:
    if not _ext.has("decode_attention"):
        return "unimm._C has no decode_attention"
    if block_table is not None:
        return "its CUDA kernel reads contiguous caches only (paged caches, given a block_table, go to Triton)"
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

def _triton_config(group: int, head_dim: int, interpret: bool, page_size: int = 0) -> dict:
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
    function is not told the dtype. Paged (``page_size`` > 0), BLOCK_N is at most the page size,
    so a step's keys lie in one page, and the broadcast path takes at most 16 keys: its page
    address math spilled 8 bytes at 32 keys (D = 128, group 2) on sm_80 under triton 3.6.
    """
    head_dim = padded_head_dim(head_dim)  # a padded head dim takes its power of two's tiles
    use_dot = group >= 16
    block_g = min(64, triton.next_power_of_2(group)) if use_dot else triton.next_power_of_2(group)
    if interpret:  # small tiles: cheap on the CPU interpreter, and tests cross every boundary
        return dict(USE_DOT=use_dot, BLOCK_G=block_g, BLOCK_N=16, num_warps=1, num_stages=1)
    if use_dot:
        block_n = max(16, min(64, 128 * 1024 // (block_g * head_dim)))
    else:
        block_n = max(1, min(32, 64 * 128 // (block_g * head_dim)))
    if page_size:
        block_n = min(block_n, page_size, 64 if use_dot else 16)
    return dict(USE_DOT=use_dot, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=8, num_stages=2)


def _decode_triton(q, k_cache, v_cache, cache_lens, scale, softcap, block_table=None):
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = _max_len(k_cache, block_table), k_cache.shape[2]
    group = q_heads // kv_heads
    page_size = k_cache.shape[1] if block_table is not None else 0
    config = _triton_config(group, head_dim, dispatch.TRITON_INTERPRET, page_size)
    q_tiles = cdiv(group, config["BLOCK_G"])
    splits, keys_per_split = split_plan(batch * kv_heads * q_tiles, max_len, config["BLOCK_N"], q.device)
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    part_out, part_lse = _workspace(batch, q_heads, splits, head_dim, q.device) if splits > 1 else (out, out)
    _launch_triton_split(q, k_cache, v_cache, cache_lens, out, part_out, part_lse, splits, keys_per_split,
                         scale, softcap, config, block_table)
    if splits > 1:
        _launch_triton_combine(part_out, part_lse, cache_lens, out, max_len, keys_per_split)
    return out


def _launch_triton_split(q, k_cache, v_cache, cache_lens, out, part_out, part_lse, splits, keys_per_split,
                         scale, softcap, config, block_table=None):
    """Split ``s`` of every (batch row, kv head, query tile): with one split the output itself,
    else its partial in ``part_out`` / ``part_lse`` (splits past a row's length write nothing)."""
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = _max_len(k_cache, block_table), k_cache.shape[2]
    paged = block_table is not None
    table = block_table if paged else cache_lens  # contiguous: a pointer the kernel never reads
    group = q_heads // kv_heads
    q_tiles = cdiv(group, config["BLOCK_G"])
    with device_guard(q.device):
        _decode_split_kernel[(batch * kv_heads * q_tiles, splits)](
            q, k_cache, v_cache, cache_lens, table, out, part_out, part_lse,
            max_len, kv_heads, group, q_tiles, q_heads, keys_per_split, splits, k_cache.shape[0] if paged else 0,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0) if paged else 0,
            out.stride(0), out.stride(1), scale, softcap if softcap is not None else 1.0,
            PAGE_SIZE=k_cache.shape[1] if paged else 0,
            HAS_SOFTCAP=softcap is not None, SPLIT=splits > 1, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
            PRECISION=dot_precision(q.dtype), **config,
        )


def _launch_triton_combine(part_out, part_lse, cache_lens, out, max_len, keys_per_split):
    batch, q_heads, splits, head_dim = part_out.shape
    with device_guard(out.device):
        _decode_combine_kernel[(batch * q_heads,)](
            part_out, part_lse, cache_lens, out, q_heads, max_len, keys_per_split, splits,
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
            BLOCK_S=_COMBINE_BLOCK_SPLITS,
            num_warps=1 if dispatch.TRITON_INTERPRET else 4,
        )
