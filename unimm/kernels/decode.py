"""Decode attention: one new query token per sequence against its KV cache (the generation step).

Public: ``decode_attention(q, k_cache, v_cache, cache_lens, *, scale=None, softcap=None,
block_table=None)`` with ``q [B, Hq, D]``, caches ``[B, max_len, Hkv, D]`` (GQA when Hkv divides
Hq) and int32 ``cache_lens [B]``; or paged, as vLLM and flashinfer: caches
``[num_pages, page_size, Hkv, D]`` (the same row layout, pages in place of batch rows) and an int32
``block_table [B, max_pages]``. Its meaning is ``unimm.kernels.reference.decode``. Inference only
(no autograd).

Every cached key and value is read once per call, so the kernels are memory-bound and the goal
is HBM bandwidth. Bytes per call: ``2 x sum_b len_b x Hkv x D x s`` (K and V, s bytes an
element; once per query tile of the group, one tile for groups up to 8 on CUDA and 64 on Triton)
plus q and the output (``2 x B x Hq x D x s``), plus with S > 1 splits the fp32 partials written
and read back (``2 x B x Hq x S x D x 4``: at most ``2 G / step`` of the cache's bytes for
G = Hq / Hkv, as a split holds a loop step or more; about 6% for Llama-3-8B at batch 1 with 4k
keys on CUDA, 32 splits); paged, also one 4-byte page id a step (L2-resident). At G FLOPs per
byte read it is memory-bound on every chip (Triton's broadcast path takes G < 16, under an
H100's ~20 fp32 FLOPs per HBM byte; larger groups go to tensor cores).
Both backends split the cache ("flash-decoding"): one program per (batch row, KV head, query
tile, split), where a query tile is the query heads of the GQA group that share the KV head (so
each KV head's cache is read once per group, not once per query head); each writes its fp32
partial output and log-sum-exp, and a small combine kernel merges the splits a row's length
reaches. The plan (``split_plan``) fills every program slot the device holds at once: the SM
count times the compiled split kernel's occupancy (``cudaOccupancyMaxActiveBlocksPerMultiprocessor``
for CUDA; Triton's compiled registers, shared memory and warps against the device's limits,
``resident_programs``), read once per (kernel, config, device); a split keeps 2+ loop steps
unless that would leave SMs idle (batch 1 with a short cache still gives every SM a program).
It comes from the shapes and the device only (never from the lengths), so a call makes no
host sync and allocates only shape-sized buffers: a decode step that calls it can be captured
in a CUDA graph. Both kernels keep the next K / V tile in flight while computing the current.
  * cuda: ``csrc/decode.cu``, float16 / bfloat16, D in {64, 128, 256}, contiguous or paged
    caches, 16-byte aligned rows: up to 8 query heads per CTA on m16n8k16 tensor-core mmas, K
    and V loaded straight into registers with 16-byte loads, the next step's loads issued
    before the current step's math at D <= 128 (register double buffering; at D = 256 one
    step's 128 registers a lane leave no room for a second), page ids a step ahead of the
    loads that need them (see the file's header).
  * triton: any of float16 / bfloat16 / float32 and D any multiple of 8 in [16, 256] (padded in
    the kernel to the next power of two, as ``_common.padded_head_dim``: the padding columns load
    as zeros and are never stored, so HBM bytes stay those of the real D); the group's scores with
    ``tl.dot`` when it has >= 16 query heads, else a broadcast multiply-sum; the key loop is
    software-pipelined two stages deep on both paths (cp.async). Paged, each step's rows go
    through its page id (one int32 load a step, L1/L2-resident, against BLOCK_N rows of 2D
    bytes: the same HBM bytes as the contiguous cache).

Lengths: on CPU tensors ``cache_lens`` outside ``[0, max_len]`` is a ValueError; on CUDA they are
not read back (that would sync), and the kernels clamp them to ``[0, max_len]``: no read ever
leaves the cache. Paged: on CPU a page id that a row's length reaches outside ``[0, num_pages)``
is a ValueError; on CUDA it is not read back, the kernel never reads through it (masked loads)
and that row's output is NaN, as for out-of-vocabulary ids elsewhere (README, "Non-finite
values"). Table entries past a row's length are never read.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

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
# Split plan: at least this many loop steps per split (fewer would cost more in partials and
# per-program setup than they save) unless that leaves SMs without a program; the resident
# programs per SM come from the compiled kernel, or are this many on CPU (the interpreter) and
# where a Triton kernel's resources cannot be read.
_MIN_SPLIT_STEPS = 2
_FALLBACK_PROGRAMS_PER_SM = 4
# CUDA's occupancy rules (sm_80 and later): registers go to warps in units of 256, the driver
# reserves 1 KB of shared memory per CTA, and an SM holds at most 16 CTAs on every chip since
# sm_75 (32 on sm_80 / sm_90; our 4- and 8-warp programs reach neither).
_REGISTER_UNIT = 256
_SHARED_RESERVED = 1024
_MAX_CTAS_PER_SM = 16
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
        return _decode_cuda(q, k_cache, v_cache, cache_lens, scale, softcap, block_table)
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

class DeviceLimits(NamedTuple):
    """What bounds the programs resident on one SM, and the SM count."""

    sms: int
    regs_per_sm: int
    shared_per_sm: int
    threads_per_sm: int


@functools.lru_cache(maxsize=None)
def device_limits(device: torch.device) -> DeviceLimits:
    props = torch.cuda.get_device_properties(device)
    # regs_per_multiprocessor is missing from older torch builds: 64K registers on every chip since sm_50
    return DeviceLimits(props.multi_processor_count, getattr(props, "regs_per_multiprocessor", 65536),
                        props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor)


def resident_programs(registers: int, shared: int, num_warps: int, limits: DeviceLimits) -> int:
    """Programs (CTAs) of one compiled kernel an SM holds at once, as CUDA's occupancy calculator
    counts them: by registers (per thread, allocated per warp in units of 256), by shared memory
    (per CTA, plus the 1 KB the driver reserves) and by threads; at least 1."""
    warp_registers = cdiv(max(registers, 1) * 32, _REGISTER_UNIT) * _REGISTER_UNIT
    by_registers = limits.regs_per_sm // warp_registers // num_warps
    by_shared = limits.shared_per_sm // (shared + _SHARED_RESERVED)
    by_threads = limits.threads_per_sm // (32 * num_warps)
    return max(1, min(by_registers, by_shared, by_threads, _MAX_CTAS_PER_SM))


def split_plan(programs: int, max_len: int, step: int, sms: int, per_sm: int) -> tuple[int, int]:
    """(splits, keys_per_split) for ``programs`` programs per split and a cache of ``max_len`` rows
    walked ``step`` rows at a time, on ``sms`` SMs that each hold ``per_sm`` programs of the
    kernel at once (its occupancy). Enough splits to fill every resident slot once
    (``per_sm x sms`` programs), with at least ``_MIN_SPLIT_STEPS`` steps per split; but never
    fewer than it takes to give every SM a program, down to one step per split (batch 1 with a
    short cache still reaches every SM's share of the bandwidth). Each split is a whole number of
    steps, every split non-empty (the last may be partial), at most ``_MAX_SPLITS``. Shapes only:
    the same plan for every call of one shape, as CUDA graphs need."""
    steps = cdiv(max_len, step)
    fill = min(cdiv(per_sm * sms, programs), cdiv(steps, _MIN_SPLIT_STEPS))
    steps_per_split = cdiv(steps, max(1, fill))
    every_sm = min(cdiv(sms, programs), steps)
    if cdiv(steps, steps_per_split) < every_sm:  # rounding down to a floor: splits >= every_sm
        steps_per_split = steps // every_sm
    keys_per_split = max(steps_per_split, cdiv(steps, _MAX_SPLITS)) * step
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
    if not _ext.has("decode_attention_occupancy"):  # an older build has decode_attention without paging
        return "unimm._C has no decode_attention_occupancy (not built, or built before paged decode)"
    if q.dtype not in _CUDA_DTYPES:
        return f"its CUDA kernel serves float16 and bfloat16 only (got {q.dtype})"
    if q.shape[2] not in _CUDA_HEAD_DIMS:
        return f"its CUDA kernel serves head_dim in {_CUDA_HEAD_DIMS} only (got {q.shape[2]})"
    # 16-byte vector loads: every row must start on a 16-byte boundary
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.data_ptr() % 16 or any(stride % 8 for stride in t.stride()[:-1]):
            return f"its CUDA kernel needs 16-byte aligned rows ({name} has strides {t.stride()})"
    return None


@functools.lru_cache(maxsize=None)
def _cuda_programs_per_sm(head_dim: int, dtype: torch.dtype, paged: bool, device: int) -> int:
    """The split kernel's occupancy (cudaOccupancyMaxActiveBlocksPerMultiprocessor), once per
    (head_dim, dtype, paged, device)."""
    occupancy = _ext.lib().decode_attention_occupancy(head_dim=head_dim, dtype=_ext.DTYPE_CODES[dtype],
                                                      paged=paged, device=device)
    return max(1, occupancy)


def _decode_cuda(q, k_cache, v_cache, cache_lens, scale, softcap, block_table=None):
    C = _ext.lib()
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = _max_len(k_cache, block_table), k_cache.shape[2]
    paged = block_table is not None
    q_tiles = cdiv(q_heads // kv_heads, C.DECODE_QUERY_TILE)
    per_sm = _cuda_programs_per_sm(head_dim, q.dtype, paged, q.device.index)
    splits, keys_per_split = split_plan(batch * kv_heads * q_tiles, max_len, C.DECODE_SPLIT_KEYS,
                                        multiprocessor_count(q.device), per_sm)
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    part_out, part_lse = _workspace(batch, q_heads, splits, head_dim, q.device) if splits > 1 else (None, None)
    C.decode_attention(
        q=q.data_ptr(), q_batch_stride=q.stride(0), q_head_stride=q.stride(1),
        k_cache=k_cache.data_ptr(), k_batch_stride=k_cache.stride(0), k_row_stride=k_cache.stride(1),
        k_head_stride=k_cache.stride(2),
        v_cache=v_cache.data_ptr(), v_batch_stride=v_cache.stride(0), v_row_stride=v_cache.stride(1),
        v_head_stride=v_cache.stride(2), cache_lens=cache_lens.data_ptr(),
        block_table=block_table.data_ptr() if paged else 0, table_stride=block_table.stride(0) if paged else 0,
        page_size=k_cache.shape[1] if paged else 0, num_pages=k_cache.shape[0] if paged else 0,
        out=out.data_ptr(), out_batch_stride=out.stride(0), out_head_stride=out.stride(1),
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
    address math spilled 8 bytes at 32 keys (D = 128, group 2) on sm_80 under triton 3.6. With
    the key loop pipelined (``num_stages`` 2, cp.async on both paths) the paged broadcast path
    left 8 bytes of stack at a product of 4096 values on 8 warps (D = 128 group 2 on sm_80 under
    triton 3.9, D = 256 group 1 on sm_90a under 3.6), none on 4: it takes 4 warps up to 4096.
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
    warps = 8
    if page_size:
        block_n = min(block_n, page_size, 64 if use_dot else 16)
        if not use_dot and block_g * block_n * head_dim <= 4096:
            warps = 4
    return dict(USE_DOT=use_dot, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=warps, num_stages=2)


def _decode_triton(q, k_cache, v_cache, cache_lens, scale, softcap, block_table=None):
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = _max_len(k_cache, block_table), k_cache.shape[2]
    group = q_heads // kv_heads
    page_size = k_cache.shape[1] if block_table is not None else 0
    config = _triton_config(group, head_dim, dispatch.TRITON_INTERPRET, page_size)
    q_tiles = cdiv(group, config["BLOCK_G"])
    per_sm = _triton_programs_per_sm(q, k_cache, v_cache, cache_lens, softcap, config, block_table)
    splits, keys_per_split = split_plan(batch * kv_heads * q_tiles, max_len, config["BLOCK_N"],
                                        multiprocessor_count(q.device), per_sm)
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=q.device)
    part_out, part_lse = _workspace(batch, q_heads, splits, head_dim, q.device) if splits > 1 else (out, out)
    _launch_triton_split(q, k_cache, v_cache, cache_lens, out, part_out, part_lse, splits, keys_per_split,
                         scale, softcap, config, block_table)
    if splits > 1:
        _launch_triton_combine(part_out, part_lse, cache_lens, out, max_len, keys_per_split)
    return out


_triton_occupancy: dict[tuple, int] = {}  # (device, dtype, head_dim, page size, softcap?, config) -> per SM


def _triton_programs_per_sm(q, k_cache, v_cache, cache_lens, softcap, config, block_table) -> int:
    """The split kernel's occupancy on q's device from its compiled registers, shared memory and
    warps (``resident_programs``), once per (device, dtype, head dim, page size, soft-cap, config).
    It compiles the kernel before the first launch (``warmup``) as a split launch (SPLIT, an
    fp32 workspace), which that shape's launches then reuse: one compile more only where the
    plan turns out a single split. Integer specialisations (divisibility) may differ from the
    launch's by a register or two. CPU (the interpreter) and a triton whose compiled kernels do
    not expose their resources: ``_FALLBACK_PROGRAMS_PER_SM``."""
    if q.device.type != "cuda":
        return _FALLBACK_PROGRAMS_PER_SM
    page_size = k_cache.shape[1] if block_table is not None else 0
    key = (q.device, q.dtype, q.shape[2], page_size, softcap is not None, tuple(sorted(config.items())))
    if key not in _triton_occupancy:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # the launch's output layout
        workspace = torch.empty(1, dtype=torch.float32, device=q.device)
        kernel = _launch_triton_split(q, k_cache, v_cache, cache_lens, out, workspace, workspace, 2,
                                      16 * config["BLOCK_N"], 1.0, softcap, config, block_table, warmup=True)
        try:
            kernel._init_handles()  # loads the binary: n_regs is read from it
            per_sm = resident_programs(kernel.n_regs, kernel.metadata.shared, kernel.metadata.num_warps,
                                       device_limits(q.device))
        except AttributeError:
            per_sm = _FALLBACK_PROGRAMS_PER_SM
        _triton_occupancy[key] = per_sm
    return _triton_occupancy[key]


def _launch_triton_split(q, k_cache, v_cache, cache_lens, out, part_out, part_lse, splits, keys_per_split,
                         scale, softcap, config, block_table=None, warmup=False):
    """Split ``s`` of every (batch row, kv head, query tile): with one split the output itself,
    else its partial in ``part_out`` / ``part_lse`` (splits past a row's length write nothing).
    ``warmup``: compile only, and return the compiled kernel."""
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = _max_len(k_cache, block_table), k_cache.shape[2]
    paged = block_table is not None
    table = block_table if paged else cache_lens  # contiguous: a pointer the kernel never reads
    group = q_heads // kv_heads
    q_tiles = cdiv(group, config["BLOCK_G"])
    args = (q, k_cache, v_cache, cache_lens, table, out, part_out, part_lse,
            max_len, kv_heads, group, q_tiles, q_heads, keys_per_split, splits, k_cache.shape[0] if paged else 0,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0) if paged else 0,
            out.stride(0), out.stride(1), scale, softcap if softcap is not None else 1.0)
    options = dict(PAGE_SIZE=k_cache.shape[1] if paged else 0, HAS_SOFTCAP=softcap is not None, SPLIT=splits > 1,
                   HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), PRECISION=dot_precision(q.dtype),
                   STAGES=config["num_stages"], **config)
    grid = (batch * kv_heads * q_tiles, splits)
    with device_guard(q.device):
        if warmup:
            return _decode_split_kernel.warmup(*args, grid=grid, **options)
        _decode_split_kernel[grid](*args, **options)


def _launch_triton_combine(part_out, part_lse, cache_lens, out, max_len, keys_per_split):
    batch, q_heads, splits, head_dim = part_out.shape
    with device_guard(out.device):
        _decode_combine_kernel[(batch * q_heads,)](
            part_out, part_lse, cache_lens, out, q_heads, max_len, keys_per_split, splits,
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
            BLOCK_S=_COMBINE_BLOCK_SPLITS,
            num_warps=1 if dispatch.TRITON_INTERPRET else 4,
        )
