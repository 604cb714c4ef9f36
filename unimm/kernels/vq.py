"""VQ codebook quantize / lookup: the nearest code of every vector, and codes back to vectors.

Public: ``vq_quantize(z, codebook, *, metric="l2")`` and ``vq_lookup(indices, codebook)``; their
meaning, non-finite values included, is ``unimm.kernels.reference.vq``.

Backends for ``vq_quantize`` (see ``dispatch``):
  * cuda: ``csrc/vq.cu``, code dims d <= 32 (Emu3 d=4, LlamaGen d=8): exact ``sum((z - e)^2)``
    in fp32 registers, codebook tiles in shared memory.
  * triton: any d. A program owns BLOCK_N rows of z and streams codebook tiles of BLOCK_K codes:
    the tile product ``z @ e.T`` on tensor cores (fp32 accumulation), then
    ``dist = |e|^2 - 2 z.e`` (``|z|^2`` is the same for every code of a row) and a running
    (min, argmin) per row. For ``metric="cosine"`` the same product is scaled by precomputed
    inverse norms, so no normalised copy of z or the codebook is made.
  Both split the codebook over a second grid axis when there are too few row blocks to fill
  the GPU, and reduce the per-split winners with two small torch ops.

Range: any finite input. Squares and products of fp32 / bf16 values overflow fp32 past ~1e19
(and underflow below ~1e-19), so both kernels work on values scaled by powers of two, which is
exact: the result is the unscaled fp32 computation wherever that one stays in range. Row n's
distances are evaluated in units of ``2**(2 m_n)``, ``m_n = max(e_n, e_min)`` (``e_n``: the
binary exponent of ``max|z_n|``; ``e_min``: the smallest such exponent over the finite codes),
a scale under which the row and its nearest code (no farther than the smallest code) are O(1);
codes far larger may overflow to +inf, and such a code is not the nearest. The CUDA kernel scales
``z - e`` by ``2**-m_n``; Triton, with ``dist - |z|^2 = |e|^2 - 2 z.e``, takes every code scaled
by its own ``2**-f_k`` and row n by ``2**-m_n`` and computes ``t (t |e'|^2 - 2 z'.e')`` with
``t = 2**(f_k - m_n)``. For cosine every row and code is scaled by its own ``2**-e`` (cosine does
not see scale). float16 values cannot overflow fp32 products and are used as they are. So one
outlier row or code changes no other row's result, and a pick is a nearest code up to fp32
rounding relative to ``max(|z_n|, |e_nearest|)^2``.

Non-finite values: rows or codes holding NaN / Inf get NaN factors, so every distance they take
part in is NaN, and a NaN distance never wins (Triton maps it to +inf; the CUDA kernel's strict
``<`` skips it); a row whose best distance is not finite gets -1 (``_combine_splits``). Nothing
is checked on the host: no device synchronisation.

Memory beyond inputs and output: per-row and per-code fp32 factors ``[N]``, ``[K]``, power-of-two
scaled copies of z and the codebook (Triton, fp32 / bf16 inputs: ``O((N + K) d)`` in the input
dtype; an fp32 copy of the codebook for its norms), per-split winners ``[splits, N]`` (fp32 +
int64), splits <= 4 x SMs / row blocks; the CUDA cosine path normalises copies of z and the
codebook in fp32 (``O((N + K) d)``). The N x K distance matrix is never formed.

fp32 inputs follow ``torch.get_float32_matmul_precision()`` (see ``_common``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimm import _ext
from unimm.kernels import dispatch
from unimm.kernels._common import cdiv, check_tensors, device_guard, dot_precision, split_columns, unserved_dtype
from unimm.kernels.reference import vq as reference

try:
    import triton
    import triton.language as tl
except ImportError:  # the Triton backend is then not live (dispatch says why)
    triton = None

METRICS = reference.METRICS
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_TEXT = "a floating tensor (float16, bfloat16, float32, float64)"
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
_INDEX_TEXT = "an integer tensor (int64, int32, int16, int8, uint8)"
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_CODES = 2**31 - 1
# Binary exponents of the kernels' power-of-two scales 2**-e: every scale is a normal fp32 (and
# bf16) number, and a scaled value stays below 4 (fp32's largest finite value is < 2**128).
_EXPONENTS = (-100, 126)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def vq_quantize(z: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2") -> torch.Tensor:
    """Index of the nearest code for every vector of ``z``.

    Args:
        z: ``[..., d]`` float16, bfloat16, float32 or float64 vectors.
        codebook: ``[K, d]`` codes, same dtype and device as ``z``.
        metric: ``"l2"`` (squared Euclidean) or ``"cosine"`` (Euclidean after L2-normalising
            both sides, as LlamaGen's tokenizer).

    Returns:
        int64 indices of shape ``z.shape[:-1]``; ties go to the lowest index. Any finite
        magnitude is served (the kernels scale by powers of two). Non-finite values are not
        checked (no device synchronisation): a code holding NaN or Inf is never returned, and a
        row holding NaN or Inf (or every row, when every code holds one) gets -1, which
        ``vq_lookup`` turns into a NaN vector.

    Raises:
        TypeError: non-tensor, integer or mismatched dtypes.
        ValueError: code-dim mismatch, empty codebook, different devices, unknown metric.
    """
    _check_quantize_args(z, codebook, metric)
    if z.numel() == 0:
        return torch.empty(z.shape[:-1], dtype=torch.int64, device=z.device)
    return torch.ops.unimm.vq_quantize(z, codebook, metric)


def vq_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``codebook[indices]``: ``[...] -> [..., d]``, differentiable with respect to ``codebook``.

    An index outside ``[0, K)`` (-1: ``vq_quantize``'s "no code" for a non-finite row) gives a
    NaN vector and no gradient; indices are not checked on the host (no device synchronisation).

    Raises:
        TypeError: ``indices`` not an integer tensor, ``codebook`` not a floating tensor.
        ValueError: ``codebook`` not 2-D, devices differ.
    """
    check_tensors({"indices": indices}, dtypes=_INDEX_DTYPES, kind=_INDEX_TEXT)
    check_tensors({"codebook": codebook}, dtypes=_FLOAT_DTYPES, kind=_FLOAT_TEXT)
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [num_codes, code_dim], got shape {tuple(codebook.shape)}")
    if indices.device != codebook.device:
        raise ValueError(f"indices and codebook must be on the same device, got {indices.device} and "
                         f"{codebook.device}")
    return torch.ops.unimm.vq_lookup(indices, codebook)


# ---------------------------------------------------------------------------------------------
# Checks (shapes, dtypes and devices only: tensor data is never read on the host)
# ---------------------------------------------------------------------------------------------

def _check_quantize_args(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> None:
    check_tensors({"z": z, "codebook": codebook}, dtypes=_FLOAT_DTYPES, kind=_FLOAT_TEXT)
    if z.dtype != codebook.dtype:
        raise TypeError(f"z and codebook must have the same dtype, got z {z.dtype} and codebook {codebook.dtype}")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [num_codes, code_dim], got shape {tuple(codebook.shape)}")
    num_codes, code_dim = codebook.shape
    if num_codes == 0:
        raise ValueError("codebook is empty: it has 0 codes")
    if num_codes > _MAX_CODES:
        raise ValueError(f"codebook has {num_codes} codes; at most {_MAX_CODES} are supported")
    if code_dim == 0:
        raise ValueError("codebook has code_dim 0")
    if z.dim() == 0 or z.shape[-1] != code_dim:
        raise ValueError(f"code-dim mismatch: z must be [..., {code_dim}] to match codebook [{num_codes}, {code_dim}], "
                         f"got z of shape {tuple(z.shape)}")
    if z.device != codebook.device:
        raise ValueError(f"z and codebook must be on the same device, got z on {z.device} and codebook on "
                         f"{codebook.device}")


# ---------------------------------------------------------------------------------------------
# Ops (opaque to torch.compile and CUDA graphs)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("unimm::vq_quantize", mutates_args=())
def _vq_quantize_op(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    z_rows = _as_rows(z)
    codebook = _as_rows(codebook)
    backend = dispatch.select(
        "vq_quantize", z.device, implemented=("cuda", "triton"),
        unsupported={
            "cuda": _cuda_unsupported(z_rows),
            "triton": unserved_dtype(z.dtype, _KERNEL_DTYPES),
        },
    )
    if backend == "cuda":
        indices = _quantize_cuda(z_rows, codebook, metric)
    elif backend == "triton":
        indices = _quantize_triton(z_rows, codebook, metric)
    else:
        indices = reference.vq_quantize(z_rows, codebook, metric)
    return indices.reshape(z.shape[:-1])


@_vq_quantize_op.register_fake
def _(z, codebook, metric):
    return z.new_empty(z.shape[:-1], dtype=torch.int64)


@torch.library.custom_op("unimm::vq_lookup", mutates_args=())
def _vq_lookup_op(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    num_codes = codebook.shape[0]
    if num_codes == 0:
        return codebook.new_full((*indices.shape, codebook.shape[1]), float("nan"))
    valid = (indices >= 0) & (indices < num_codes)
    # A gather moves each output byte once; torch's embedding kernel already runs at bandwidth.
    # Out-of-range indices read code 0 and are overwritten with NaN (no device-side assert).
    vectors = F.embedding(torch.where(valid, indices.long(), 0), codebook)
    return vectors.masked_fill_(~valid[..., None], float("nan"))


@_vq_lookup_op.register_fake
def _(indices, codebook):
    return codebook.new_empty((*indices.shape, codebook.shape[1]))


def _lookup_setup_context(ctx, inputs, output):
    indices, codebook = inputs
    ctx.save_for_backward(indices)
    ctx.codebook_shape = codebook.shape
    ctx.codebook_dtype = codebook.dtype


def _lookup_backward(ctx, grad_output):
    (indices,) = ctx.saved_tensors
    num_codes, code_dim = ctx.codebook_shape
    grad = torch.zeros(num_codes, code_dim, dtype=torch.float32, device=grad_output.device)
    if num_codes == 0:
        return None, grad.to(ctx.codebook_dtype)
    flat = indices.reshape(-1)
    valid = (flat >= 0) & (flat < num_codes)
    upstream = grad_output.reshape(-1, code_dim).float()
    # out-of-range positions (NaN outputs) send no gradient; even a NaN upstream there stays out
    grad.index_add_(0, torch.where(valid, flat.long(), 0), torch.where(valid[:, None], upstream, 0.0))
    return None, grad.to(ctx.codebook_dtype)


_vq_lookup_op.register_autograd(_lookup_backward, setup_context=_lookup_setup_context)


# ---------------------------------------------------------------------------------------------
# Shared launch helpers
# ---------------------------------------------------------------------------------------------

def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [N, d]`` with unit stride along d and a real row stride (no broadcasting)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < rows.shape[1]):
        rows = rows.contiguous()
    return rows


def _exponents(x_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (binary exponent of max|x| clamped to the kernels' range, row is all finite)."""
    return reference.max_exponents(x_rows, *_EXPONENTS)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    return reference.pow2(exponent, torch.float32)


def _scaled(x_rows: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``x * 2**-exponent`` per row, in x's dtype (exact: a power of two within range)."""
    return x_rows * _pow2(-exponent).to(x_rows.dtype)[:, None]


def _l2_scales(z_rows: torch.Tensor, codebook: torch.Tensor):
    """(int32 ``[N]`` ``m_n = max(e_n, e_min)``, bool ``[N]`` finite rows, int32 ``[K]`` code
    exponents ``f_k``, bool ``[K]`` finite codes): see the module docstring."""
    row_exp, row_finite = _exponents(z_rows)
    code_exp, code_finite = _exponents(codebook)
    return (reference.nearest_scale_exponents(row_exp, code_exp, code_finite, _EXPONENTS[1]), row_finite,
            code_exp, code_finite)


def _normalized(x_rows: torch.Tensor) -> torch.Tensor:
    """fp32 ``x / max(|x|, eps)`` per row (``F.normalize``) without overflow or underflow in the
    norm; rows holding NaN or Inf become NaN."""
    exponent, finite = _exponents(x_rows)
    scale = _pow2(-exponent)[:, None]
    scaled = x_rows.float() * scale
    out = scaled / torch.maximum(scaled.norm(dim=-1, keepdim=True), reference.NORMALIZE_EPS * scale)
    return out.masked_fill_(~finite[:, None], float("nan"))


def _combine_splits(part_dist: torch.Tensor, part_idx: torch.Tensor) -> torch.Tensor:
    """Per-split winners ``[splits, N]`` -> int64 ``[N]``. Splits hold increasing code ranges and
    argmin returns the first minimum, so equal distances keep the lowest index. A row whose best
    distance is not finite (it met no code at a finite distance) gets -1."""
    if part_idx.shape[0] == 1:
        best, idx = part_dist[0], part_idx[0]
    else:
        best_split = part_dist.argmin(0, keepdim=True)
        best, idx = part_dist.gather(0, best_split)[0], part_idx.gather(0, best_split)[0]
    return torch.where(best < float("inf"), idx, -1)


# ---------------------------------------------------------------------------------------------
# CUDA backend (csrc/vq.cu)
# ---------------------------------------------------------------------------------------------

def _cuda_unsupported(z_rows: torch.Tensor) -> str | None:
    if not _ext.has("vq_argmin_small_d"):
        return "unimm._C has no vq_argmin_small_d"
    if z_rows.shape[1] > _ext.lib().VQ_SMALL_MAX_DIM:
        return f"its CUDA kernel serves code_dim <= {_ext.lib().VQ_SMALL_MAX_DIM} only (got {z_rows.shape[1]})"
    if z_rows.dtype not in _ext.DTYPE_CODES:
        return f"its CUDA kernel does not serve {z_rows.dtype}"
    return None


def _cuda_row_scales(z_rows: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """What ``vq_argmin_small_d`` reads from ``part_dist`` on entry: fp32 ``[N]`` scales
    ``2**-m_n``, NaN for rows holding NaN or Inf."""
    row_exp, row_finite, _, _ = _l2_scales(z_rows, codebook)
    return _pow2(-row_exp).masked_fill_(~row_finite, float("nan"))


def _quantize_cuda(z_rows: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    C = _ext.lib()
    if metric == "cosine":
        z_rows, codebook = _normalized(z_rows), _normalized(codebook)
    n, d = z_rows.shape
    k = codebook.shape[0]
    device = z_rows.device
    row_blocks = cdiv(n, C.vq_small_d_rows_per_block(d))
    splits, codes_per_split = split_columns(row_blocks, k, C.VQ_SMALL_TILE_CODES, device)
    # in: every split's slots hold the row scales; out: the split's best distance per row
    part_dist = _cuda_row_scales(z_rows, codebook).expand(splits, n).contiguous()
    part_idx = torch.empty(splits, n, dtype=torch.int64, device=device)
    C.vq_argmin_small_d(
        z=z_rows.data_ptr(), z_row_stride=z_rows.stride(0), codebook=codebook.data_ptr(),
        codebook_row_stride=codebook.stride(0), n=n, k=k, d=d, codes_per_split=codes_per_split, splits=splits,
        part_dist=part_dist.data_ptr(), part_idx=part_idx.data_ptr(), dtype=_ext.DTYPE_CODES[z_rows.dtype],
        device=device.index, stream=_ext.stream_handle(device),
    )
    return _combine_splits(part_dist, part_idx)


# ---------------------------------------------------------------------------------------------
# Triton backend
# ---------------------------------------------------------------------------------------------

def _triton_config(code_dim: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Tile sizes and launch options. Not autotuned: the split count depends on the tiles.

    Chosen from sm_90a / sm_80 compiles (tests/test_triton_compile.py checks them): no spills,
    shared memory within both chips' limits, pipelined loads.
    """
    padded = max(16, triton.next_power_of_2(code_dim))
    if interpret:  # small tiles: cheap on the CPU interpreter, and tests cross every boundary
        return dict(BLOCK_N=16, BLOCK_K=32, BLOCK_D=min(padded, 32), num_warps=1, num_stages=1)
    if dtype == torch.float32:  # 3xTF32 splits each operand in two: smaller d chunks
        return dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=min(padded, 32), num_warps=8, num_stages=3)
    if code_dim % 16 and padded > 64:
        # Row strides not divisible by 16 defeat vectorised loads, which costs registers.
        return dict(BLOCK_N=128, BLOCK_K=64, BLOCK_D=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_K=128, BLOCK_D=min(padded, 64), num_warps=8, num_stages=3)


def _triton_operands(z_rows: torch.Tensor, codebook: torch.Tensor, metric: str):
    """What ``_vq_argmin_kernel`` takes besides the tiles: (z, codebook) as the kernel reads them
    (power-of-two scaled copies for fp32 / bf16; float16 as it is), and fp32 factors
    (code_bias ``[K]``, code_scale ``[K]``, row_scale ``[N]``) such that

        l2:     dist = t (t code_bias - 2 z.e),  t = row_scale code_scale
        cosine: dist = code_bias - 2 (z.e) row_scale code_scale

    orders the codes of each row as the reference does. Rows and codes holding NaN or Inf get
    NaN factors: every distance they take part in is NaN, which the kernel never picks."""
    scale = z_rows.dtype != torch.float16  # fp16 products cannot overflow fp32
    nan = float("nan")
    if metric == "l2":
        row_exp, row_finite, code_exp, code_finite = _l2_scales(z_rows, codebook)
        if not scale:
            row_exp, code_exp = torch.zeros_like(row_exp), torch.zeros_like(code_exp)
        else:
            # z' = z 2**-m_n, e' = e 2**-f_k: |e|^2 - 2 z.e = 2**(2 m_n) t (t |e'|^2 - 2 z'.e')
            z_rows, codebook = _scaled(z_rows, row_exp), _scaled(codebook, code_exp)
        code_bias = codebook.float().square().sum(-1).masked_fill_(~code_finite, nan)
        code_scale = _pow2(code_exp).masked_fill_(~code_finite, nan)
        return z_rows, codebook, code_bias, code_scale, _pow2(-row_exp).masked_fill_(~row_finite, nan)
    row_exp, row_finite = _exponents(z_rows)
    code_exp, code_finite = _exponents(codebook)
    if not scale:
        row_exp, code_exp = torch.zeros_like(row_exp), torch.zeros_like(code_exp)
    else:
        z_rows, codebook = _scaled(z_rows, row_exp), _scaled(codebook, code_exp)
    # dist(z_n, e_n) = u(|e|) - 2 (z.e) / (max(|z|, eps) max(|e|, eps)) + const (u: |e_n|^2, exactly
    # 1 except for codes shorter than eps, F.normalize's definition), on the scaled vectors with
    # eps scaled alike.
    row_eps = reference.NORMALIZE_EPS * _pow2(-row_exp)
    code_eps = reference.NORMALIZE_EPS * _pow2(-code_exp)
    code_norm = codebook.float().norm(dim=-1)
    code_scale = (1.0 / torch.maximum(code_norm, code_eps)).masked_fill_(~code_finite, nan)
    code_bias = torch.where(code_norm >= code_eps, 1.0, (code_norm / code_eps).square()).masked_fill_(~code_finite, nan)
    row_scale = (1.0 / torch.maximum(z_rows.float().norm(dim=-1), row_eps)).masked_fill_(~row_finite, nan)
    return z_rows, codebook, code_bias, code_scale, row_scale


def _quantize_triton(z_rows: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    n, d = z_rows.shape
    k = codebook.shape[0]
    device = z_rows.device
    config = _triton_config(d, z_rows.dtype, dispatch.TRITON_INTERPRET)
    z_rows, codebook, code_bias, code_scale, row_scale = _triton_operands(z_rows, codebook, metric)
    row_blocks = cdiv(n, config["BLOCK_N"])
    splits, codes_per_split = split_columns(row_blocks, k, config["BLOCK_K"], device)
    part_dist = torch.empty(splits, n, dtype=torch.float32, device=device)
    part_idx = torch.empty(splits, n, dtype=torch.int64, device=device)
    _launch_triton_argmin(z_rows, codebook, code_bias, code_scale, row_scale, part_dist, part_idx,
                          codes_per_split, metric == "cosine", config)
    return _combine_splits(part_dist, part_idx)


def _launch_triton_argmin(z_rows, codebook, code_bias, code_scale, row_scale, part_dist, part_idx,
                          codes_per_split, cosine, config):
    """Writes per-split winners into ``part_dist`` / ``part_idx`` ``[splits, N]``; the factors are
    ``_triton_operands``'s."""
    n, d = z_rows.shape
    grid = (cdiv(n, config["BLOCK_N"]), part_idx.shape[0])
    with device_guard(z_rows.device):
        _vq_argmin_kernel[grid](
            z_rows, codebook, code_bias, code_scale, row_scale, part_dist, part_idx,
            n, codebook.shape[0], d, z_rows.stride(0), codebook.stride(0), codes_per_split,
            COSINE=cosine, PRECISION=dot_precision(z_rows.dtype), **config,
        )


if triton is not None:

    @triton.jit
    def _vq_argmin_kernel(
        z_ptr, codebook_ptr, code_bias_ptr, code_scale_ptr, row_scale_ptr, part_dist_ptr, part_idx_ptr,
        n_rows, n_codes, code_dim, stride_z, stride_codebook, codes_per_split,
        COSINE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        split = tl.program_id(1)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_rows
        dims = tl.arange(0, BLOCK_D)
        code_begin = split.to(tl.int64) * codes_per_split
        code_end = tl.minimum(code_begin + codes_per_split, n_codes)
        # cosine: the row's inverse norm; l2: its scale 2**-m_n (NaN: a row holding NaN / Inf)
        row_scale = tl.load(row_scale_ptr + rows, mask=row_ok, other=0.0)

        # One flat loop over (code tile, d chunk) steps, the d chunk fastest, so the software
        # pipeline runs across tile boundaries; the row argmin is the epilogue of a tile's last chunk.
        d_chunks = tl.cdiv(code_dim, BLOCK_D)
        steps = tl.cdiv(code_end - code_begin, BLOCK_K) * d_chunks
        dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        best = tl.full([BLOCK_N], float("inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_N], tl.int64) + code_begin
        for step in range(0, steps):
            tile_begin = code_begin + (step // d_chunks) * BLOCK_K
            d0 = (step % d_chunks) * BLOCK_D
            codes = tile_begin + tl.arange(0, BLOCK_K)
            code_ok = codes < code_end
            dim_ok = (d0 + dims) < code_dim
            z_chunk = tl.load(z_ptr + rows[:, None] * stride_z + (d0 + dims)[None, :],
                              mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            # the codebook chunk is loaded transposed, [BLOCK_D, BLOCK_K], as the right operand
            code_chunk = tl.load(codebook_ptr + codes[None, :] * stride_codebook + (d0 + dims)[:, None],
                                 mask=dim_ok[:, None] & code_ok[None, :], other=0.0)
            dot = tl.dot(z_chunk, code_chunk, dot, input_precision=PRECISION)
            if d0 + BLOCK_D >= code_dim:
                # lanes past the codebook's end get benign factors here and +inf below
                code_bias = tl.load(code_bias_ptr + codes, mask=code_ok, other=0.0)
                code_scale = tl.load(code_scale_ptr + codes, mask=code_ok, other=0.0)
                scale = row_scale[:, None] * code_scale[None, :]
                if COSINE:
                    dist = code_bias[None, :] - 2.0 * (dot * scale)
                else:  # (|e|^2 - 2 z.e) 2**-2m_n: t = 2**(f_k - m_n) may over- or underflow, only
                    # for codes far from the nearest (+inf: never picked; 0: below fp32's resolution)
                    dist = scale * (scale * code_bias[None, :] - 2.0 * dot)
                # NaN (a row or code holding NaN / Inf: no finite distance) is never picked
                dist = tl.where(code_ok[None, :] & (dist == dist), dist, float("inf"))
                tile_best, tile_arg = tl.min(dist, axis=1, return_indices=True, return_indices_tie_break_left=True)
                better = tile_best < best  # strict: earlier tiles keep ties
                best = tl.where(better, tile_best, best)
                best_idx = tl.where(better, tile_begin + tile_arg.to(tl.int64), best_idx)
                dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)

        out = split.to(tl.int64) * n_rows + rows
        tl.store(part_dist_ptr + out, best, mask=row_ok)
        tl.store(part_idx_ptr + out, best_idx, mask=row_ok)
