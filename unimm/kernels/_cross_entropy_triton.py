"""The Triton backend of ``unimm.kernels.cross_entropy``: the per-row statistics and the chunked
gradients (the module docstring there describes the design), their launches and kernels.

Imported only where triton is.
"""

import torch
import triton
import triton.language as tl

from unimm.kernels import dispatch
from unimm.kernels._common import cdiv, device_guard, dot_precision, split_columns
from unimm.kernels._triton import tanh

# ---------------------------------------------------------------------------------------------
# Statistics and gradients
# ---------------------------------------------------------------------------------------------

def run_chunks(hidden, head, head_bias, column, weights, row_scale, label_smoothing, z_loss, softcap, wants,
               workspace):
    """Per-row statistics ``(lse, target_logit, logit_sum)`` (fp32 ``[N]``) and, for the gradients
    flagged in ``wants`` (hidden, head, bias), ``(dh, dw, db)``: dh ``[N, D]`` in hidden's dtype,
    dw ``[V, D]`` in head's dtype, db ``[V]`` in fp32; None where not wanted. ``row_scale [N]``
    multiplies each row's loss gradient (the upstream gradient, 1 / sum(w) for "mean");
    ``workspace`` bounds the dx chunk (bytes)."""
    n, d = hidden.shape
    vocab = head.shape[0]
    device = hidden.device
    want_dh, want_dw, want_db = wants
    dh = dw = db = None
    with device_guard(device):
        stats = _lse_stats(hidden, head, head_bias, column, softcap)
        if not (want_dh or want_dw or want_db):
            return stats, (dh, dw, db)
        lse = stats[0]
        coef = row_scale * weights
        config = _matmul_config(hidden.dtype, dispatch.TRITON_INTERPRET)
        dw_config = _matmul_config(hidden.dtype, dispatch.TRITON_INTERPRET, EPILOGUE_STORE)
        chunk = _chunk_cols(n, vocab, hidden.element_size(), config["BLOCK_N"], workspace)
        dx = torch.empty(n, chunk, dtype=hidden.dtype, device=device)
        dh32 = torch.zeros(n, d, dtype=torch.float32, device=device) if want_dh else None
        dw = torch.empty(vocab, d, dtype=head.dtype, device=device) if want_dw else None
        db = torch.empty(vocab, dtype=torch.float32, device=device) if want_db else None
        for start in range(0, vocab, chunk):
            cols = slice(start, min(vocab, start + chunk))
            dx_chunk = dx[:, :cols.stop - start]
            _matmul(hidden, head[cols].T, dx_chunk, EPILOGUE_LOSS_GRAD, config,
                    bias=head_bias[cols] if head_bias is not None else None, softcap=softcap,
                    loss_terms=(lse, column, coef, start, vocab, label_smoothing, z_loss))
            if want_dw:  # dropped rows' hidden loads as zeros
                _matmul(dx_chunk.T, hidden, dw[cols], EPILOGUE_STORE, dw_config, rows=column)
            if want_dh:  # dropped rows' dH stays 0
                _matmul(dx_chunk, head[cols], dh32, EPILOGUE_ACCUMULATE, config, rows=column)
            if want_db:
                db[cols] = dx_chunk.sum(0, dtype=torch.float32)
    if want_dh:
        dh = dh32.to(hidden.dtype)
    return stats, (dh, dw, db)


def _chunk_cols(n: int, vocab: int, elem_bytes: int, granule: int, workspace: int) -> int:
    """Columns per gradient chunk: as many as the dx workspace (bytes) holds, whole matmul tiles."""
    cols = max(granule, workspace // max(1, n * elem_bytes) // granule * granule)
    return max(1, min(cols, vocab))


def _lse_stats(hidden, head, head_bias, column, softcap):
    """(lse, target_logit, logit_sum), fp32 ``[N]`` each, through ``_lse_kernel``."""
    n, d = hidden.shape
    vocab = head.shape[0]
    device = hidden.device
    if n == 0:
        return tuple(torch.empty(0, dtype=torch.float32, device=device) for _ in range(3))
    config = _lse_config(hidden.dtype, dispatch.TRITON_INTERPRET)
    row_blocks = cdiv(n, config["BLOCK_N"])
    splits, cols_per_split = split_columns(row_blocks, vocab, config["BLOCK_V"], device)
    parts = torch.empty(4, splits, n, dtype=torch.float32, device=device)  # max, sum exp, sum x, x[t]
    _lse_kernel[(row_blocks, splits)](
        hidden, head, head_bias if head_bias is not None else head, column, parts, n, vocab, d,
        hidden.stride(0), hidden.stride(1), head.stride(0), head.stride(1), cols_per_split,
        float(softcap) if softcap is not None else 1.0,
        HAS_BIAS=head_bias is not None, HAS_SOFTCAP=softcap is not None, PRECISION=dot_precision(hidden.dtype),
        **config,
    )
    part_max, part_sum, part_logit_sum, part_target = parts
    row_max = part_max.max(0).values if splits > 1 else part_max[0]
    lse = row_max + (part_sum * (part_max - row_max).exp()).sum(0).log()
    return lse, part_target.sum(0), part_logit_sum.sum(0)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

# What _matmul_kernel does with its tile product; constexpr so that the kernel can name them too
# (launches pass the plain int).
EPILOGUE_STORE, EPILOGUE_ACCUMULATE, EPILOGUE_LOSS_GRAD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


def _lse_config(dtype: torch.dtype, interpret: bool) -> dict:
    """Tiles for ``_lse_kernel``; tests/triton_aot.py checks them against sm_90a and sm_80."""
    if interpret:
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # 3xTF32 holds each operand twice
        return dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=3)


def _matmul_config(dtype: torch.dtype, interpret: bool, epilogue: int = EPILOGUE_LOSS_GRAD) -> dict:
    """Tiles for ``_matmul_kernel`` running ``epilogue``'s GEMM; tests/triton_aot.py checks them
    against sm_90a and sm_80."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        config = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if epilogue == EPILOGUE_STORE:
        # dW's B tiles are masked by a loaded flag (the row's column): triton's pipeliner spreads
        # its stages over that chain of two loads, so 2 s - 1 stages give the A and B tiles the
        # buffers s give the other GEMMs (4 / 3 on sm_90a / sm_80 for 16-bit, 2 for fp32).
        config["num_stages"] = 2 * config["num_stages"] - 1
    return config


def _matmul(a, b, out, epilogue, config, *, bias=None, softcap=None, loss_terms=None, rows=None):
    """The three GEMMs of the gradient, fp32 accumulation; strides are honoured, so transposes are
    free. ``rows``: each token row's column, -1 when dropped (int32).
      * EPILOGUE_LOSS_GRAD, ``dx = lossgrad(h @ W.T)``: ``loss_terms`` = (lse, column, coef, first
        column of this chunk, V, label_smoothing, z_loss); a dropped row's dx is 0.
      * EPILOGUE_STORE, ``dW = dx.T @ h``: K runs over token rows; a dropped row loads as zeros.
      * EPILOGUE_ACCUMULATE, ``dH += dx @ W``: a dropped row's output is left as it is."""
    m, k = a.shape
    n = b.shape[1]
    if loss_terms is None:
        if rows is None:
            raise ValueError("_matmul: EPILOGUE_STORE and EPILOGUE_ACCUMULATE need rows")
        loss_terms = (out, rows, out, 0, 1, 0.0, 0.0)
    lse, column, coef, col_offset, vocab, label_smoothing, z_loss = loss_terms
    grid = (cdiv(m, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b, out, bias if bias is not None else out, lse, column, coef, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        col_offset, vocab, float(softcap) if softcap is not None else 1.0, label_smoothing, z_loss,
        EPILOGUE=int(epilogue), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        PRECISION=dot_precision(a.dtype), **config,
    )


@triton.jit
def _lse_kernel(
    h_ptr, w_ptr, bias_ptr, column_ptr, parts_ptr, n_rows, vocab, dim,
    stride_hn, stride_hd, stride_wv, stride_wd, cols_per_split, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    dims = tl.arange(0, BLOCK_D)
    col_begin = split.to(tl.int64) * cols_per_split
    col_end = tl.minimum(col_begin + cols_per_split, vocab)
    target = tl.load(column_ptr + rows, mask=row_ok, other=-1)

    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    exp_sum = tl.zeros([BLOCK_N], tl.float32)
    logit_sum = tl.zeros([BLOCK_N], tl.float32)
    target_logit = tl.zeros([BLOCK_N], tl.float32)
    # One flat loop over (column tile, d chunk) steps, d fastest, so the software pipeline runs
    # across tiles; the log-sum-exp update is the epilogue of a tile's last d chunk.
    d_chunks = tl.cdiv(dim, BLOCK_D)
    steps = tl.cdiv(col_end - col_begin, BLOCK_V) * d_chunks
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for step in range(0, steps):
        tile_begin = col_begin + (step // d_chunks) * BLOCK_V
        d0 = (step % d_chunks) * BLOCK_D
        cols = tile_begin + tl.arange(0, BLOCK_V)
        col_ok = cols < col_end
        dim_ok = (d0 + dims) < dim
        h = tl.load(h_ptr + rows[:, None] * stride_hn + (d0 + dims)[None, :] * stride_hd,
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[None, :] * stride_wv + (d0 + dims)[:, None] * stride_wd,
                    mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if d0 + BLOCK_D >= dim:
            x = acc
            if HAS_BIAS:
                x += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_SOFTCAP:
                x = softcap * tanh(x / softcap)
            x = tl.where(col_ok[None, :], x, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(x, 1))
            exp_sum = exp_sum * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max[:, None]), 1)
            row_max = new_max
            logit_sum += tl.sum(tl.where(col_ok[None, :], x, 0.0), 1)
            target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), 1)
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)

    out = split.to(tl.int64) * n_rows + rows
    plane = tl.num_programs(1).to(tl.int64) * n_rows
    tl.store(parts_ptr + out, row_max, mask=row_ok)
    tl.store(parts_ptr + plane + out, exp_sum, mask=row_ok)
    tl.store(parts_ptr + 2 * plane + out, logit_sum, mask=row_ok)
    tl.store(parts_ptr + 3 * plane + out, target_logit, mask=row_ok)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, lse_ptr, column_ptr, coef_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    col_offset, vocab, softcap, label_smoothing, z_loss,
    EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles sweep the columns together, so B tiles are reused
    # from L2 instead of re-read from memory.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & (k0 + rk < K)[None, :], other=0.0)
        k_ok = k0 + rk < K
        if EPILOGUE == EPILOGUE_STORE:
            # dW = dx.T @ h: K runs over token rows. A dropped row's dx is 0, but its hidden may
            # be Inf or NaN (0 * Inf = NaN): it loads as zeros.
            k_ok &= tl.load(column_ptr + k0 + rk, mask=k_ok, other=-1) >= 0
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    if EPILOGUE == EPILOGUE_LOSS_GRAD:
        # acc holds logits of rows rm, columns col_offset + rn: turn them into d loss / d logit,
        # c (p (1 + 2 z lse) - eps / V - (1 - eps) [v = t]), through the soft-cap.
        row_ok = rm < M
        lse = tl.load(lse_ptr + rm, mask=row_ok, other=0.0)
        target = tl.load(column_ptr + rm, mask=row_ok, other=-1)
        coef = tl.load(coef_ptr + rm, mask=row_ok, other=0.0)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            acc = softcap * tanh(acc / softcap)
        grad = tl.exp(acc - lse[:, None]) * (1.0 + 2.0 * z_loss * lse)[:, None] - label_smoothing / vocab
        grad -= tl.where((col_offset + rn)[None, :] == target[:, None], 1.0 - label_smoothing, 0.0)
        if HAS_SOFTCAP:
            grad = grad * (1.0 - (acc / softcap) * (acc / softcap))
        # selected, not multiplied: a dropped row (coef 0) may have Inf or NaN logits or lse
        acc = tl.where(target[:, None] >= 0, coef[:, None] * grad, 0.0)
    if EPILOGUE == EPILOGUE_ACCUMULATE:  # accumulate into an fp32 output; a dropped row adds nothing
        kept = tl.load(column_ptr + rm, mask=rm < M, other=-1) >= 0
        acc = tl.where(kept[:, None], acc, 0.0) + tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
