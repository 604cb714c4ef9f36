"""The Triton backend of ``unimm.kernels.cross_entropy``: the per-row statistics and the chunked
gradients (the module docstring there describes the design), their launches and kernels.

Imported only where triton is.
"""

import torch
import triton
import triton.language as tl

from unimm.kernels import _cross_entropy_cost as cost
from unimm.kernels import dispatch
from unimm.kernels._common import cdiv, device_guard, dot_precision, split_columns
from unimm.kernels._triton import tanh

# ---------------------------------------------------------------------------------------------
# Statistics and gradients
# ---------------------------------------------------------------------------------------------

def statistics(hidden, head, head_bias, column, softcap, class_weights=None):
    """Per-row ``[4, N]`` fp32: the row max m and log-sum ``log sum exp(x - m)`` of the logits
    (kept apart: lse = m + log-sum rounds away ~1e-4 at |x| ~ 1e3, and ``exp(x - lse)`` would
    carry that into every p), the target logit (0 for a dropped row) and the sum of the logits,
    weighted by ``class_weights`` (fp32 ``[V]``) when given."""
    n, d = hidden.shape
    vocab = head.shape[0]
    device = hidden.device
    if n == 0:
        return torch.empty(4, 0, dtype=torch.float32, device=device)
    arch = 90
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = major * 10 + minor
    config = _lse_config(hidden.dtype, dispatch.TRITON_INTERPRET, arch)
    row_blocks = cdiv(n, config["BLOCK_N"])
    splits, cols_per_split = split_columns(row_blocks, vocab, config["BLOCK_V"], device)
    l2_splits = _l2_splits(config["BLOCK_N"] * d * hidden.element_size(), device)
    if l2_splits > splits:
        tiles = cdiv(vocab, config["BLOCK_V"])
        per_split = cdiv(tiles, min(tiles, l2_splits))
        splits, cols_per_split = cdiv(tiles, per_split), per_split * config["BLOCK_V"]
    parts = torch.empty(4, splits, n, dtype=torch.float32, device=device)  # max, sum exp, sum x, x[t]
    with device_guard(device):
        _lse_kernel[(row_blocks * splits,)](
            hidden, head, head_bias if head_bias is not None else head,
            class_weights if class_weights is not None else parts, column, parts, n, vocab, d,
            hidden.stride(0), hidden.stride(1), head.stride(0), head.stride(1), cols_per_split,
            float(softcap) if softcap is not None else 1.0,
            HAS_BIAS=head_bias is not None, HAS_SOFTCAP=softcap is not None,
            HAS_CLASS_WEIGHTS=class_weights is not None, PRECISION=dot_precision(hidden.dtype), **config,
        )
    return merge_parts(parts)


def merge_parts(parts):
    """The ``[4, N]`` statistics from per-column-range parts ``[4, ranges, N]`` (max, sum of exp
    relative to that max, logit sum, target logit): max of the maxima, the sums rescaled to it."""
    part_max, part_sum, part_logit_sum, part_target = parts
    row_max = part_max.max(0).values if parts.shape[1] > 1 else part_max[0]
    log_sum = (part_sum * (part_max - row_max).exp()).sum(0).log()
    return torch.stack((row_max, log_sum, part_target.sum(0), part_logit_sum.sum(0)))


def _l2_splits(block_bytes: int, device: torch.device) -> int:
    """Column splits that keep the hidden blocks (``block_bytes`` each) of the CTAs resident at once
    within half of L2 (``_cross_entropy_cost.l2_splits``): the launch order runs a row block's
    splits side by side, so each block is re-read once per column tile from L2 instead of HBM."""
    if device.type != "cuda":
        return 1
    props = torch.cuda.get_device_properties(device)
    return cost.l2_splits(props.multi_processor_count, block_bytes, getattr(props, "L2_cache_size", 0))


def gradients(hidden, head, head_bias, column, stats, coefs, softcap, wants, workspace, class_weights=None,
              filter_eps=None):
    """``(dh, dw, db)`` for the gradients flagged in ``wants`` (hidden, head, bias), None where
    not wanted: dh ``[N, D]`` in hidden's dtype, dw ``[V, D]`` in head's dtype, db ``[V]`` fp32.
    Each row's gradient of its logits is ``dx = p cp - ct [v = t] - cu w_v``, p = exp(x - m - log-sum),
    w_v the ``class_weights`` (fp32 ``[V]``; 1 without):
    ``stats`` is ``statistics()``'s (m and log-sum are read), ``coefs`` the fp32 ``[3, N]``
    (cp, ct, cu) per row; a dropped row (column -1) gets dx = 0, a kept row whose target is outside
    the head (column -2) no target term. ``workspace`` bounds the dx
    chunk (bytes). ``filter_eps``: the p term is dropped from each ``filter_tile`` tile of dx whose
    kept rows' p are all below it (None: exact)."""
    n, d = hidden.shape
    vocab = head.shape[0]
    device = hidden.device
    want_dh, want_dw, want_db = wants
    dh = dw = db = None
    if not (want_dh or want_dw or want_db):
        return dh, dw, db
    with device_guard(device):
        config = _matmul_config(hidden.dtype, dispatch.TRITON_INTERPRET)
        dw_config = _matmul_config(hidden.dtype, dispatch.TRITON_INTERPRET, drop_k=True)
        chunk = cost.chunk_cols(n, vocab, hidden.element_size(), config["BLOCK_N"], workspace)
        dx = torch.empty(n, chunk, dtype=hidden.dtype, device=device)
        dh32 = torch.zeros(n, d, dtype=torch.float32, device=device) if want_dh else None
        dw = torch.empty(vocab, d, dtype=head.dtype, device=device) if want_dw else None
        db = torch.empty(vocab, dtype=torch.float32, device=device) if want_db else None
        stats, coefs = stats[:2].contiguous(), coefs.contiguous()
        for start in range(0, vocab, chunk):
            cols = slice(start, min(vocab, start + chunk))
            dx_chunk = dx[:, :cols.stop - start]
            live = None
            if filter_eps is not None:
                live = torch.empty(cdiv(n, config["BLOCK_M"]), cdiv(cols.stop - start, config["BLOCK_N"]),
                                   dtype=torch.int8, device=device)
            _matmul(hidden, head[cols].T, dx_chunk, EPILOGUE_LOSS_GRAD, config,
                    bias=head_bias[cols] if head_bias is not None else None, softcap=softcap,
                    class_weights=class_weights[cols] if class_weights is not None else None,
                    loss_terms=(stats, column, coefs, start), filter_eps=filter_eps, live=live)
            tile = (config["BLOCK_M"], config["BLOCK_N"])
            if want_dw and live is not None:  # filtered: the dx tiles that may be non-zero only
                _listed_matmul(dx_chunk.T, hidden, dw[cols], live.T, tile[::-1], column, "k", accumulate=False)
            elif want_dw:  # dropped rows' hidden loads as zeros
                _matmul(dx_chunk.T, hidden, dw[cols], EPILOGUE_STORE, dw_config, rows=column, drop="k")
            if want_dh and live is not None:
                _listed_matmul(dx_chunk, head[cols], dh32, live, tile, column, "m", accumulate=True)
            elif want_dh:  # dropped rows' dH stays 0
                _matmul(dx_chunk, head[cols], dh32, EPILOGUE_ACCUMULATE, config, rows=column, drop="m")
            if want_db:
                db[cols] = dx_chunk.sum(0, dtype=torch.float32)
    if want_dh:
        dh = dh32.to(hidden.dtype)
    return dh, dw, db


def filter_tile(dtype: torch.dtype) -> tuple[int, int]:
    """(rows, columns) of the dx tiles that gradient filtering keeps or drops whole: the dx GEMM's
    output tile (chunks are whole tiles, so column tiles start at multiples of it)."""
    config = _matmul_config(dtype, dispatch.TRITON_INTERPRET)
    return config["BLOCK_M"], config["BLOCK_N"]


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

# What _matmul_kernel does with its tile product; constexpr so that the kernel can name them too
# (launches pass the plain int).
EPILOGUE_STORE, EPILOGUE_ACCUMULATE, EPILOGUE_LOSS_GRAD, EPILOGUE_LOGITS = (
    tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3))


def _lse_config(dtype: torch.dtype, interpret: bool, arch: int = 90) -> dict:
    """Tiles for ``_lse_kernel`` on a chip of compute capability ``arch`` (major * 10 + minor);
    tests/triton_aot.py checks them against sm_90a and sm_80."""
    if interpret:
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16, num_warps=1, num_stages=1)
    if dtype == torch.float32:  # 3xTF32 holds each operand twice
        return dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=3)
    # 128 x 128 tiles read 64 FLOPs per byte of h and W (64 x 128: 43). Hopper's wgmma keeps the
    # accumulator and softmax epilogue within 255 registers; sm_80's mma.sync spills them.
    return dict(BLOCK_N=128, BLOCK_V=128 if arch >= 90 else 64, BLOCK_D=64, num_warps=8, num_stages=3)


def _matmul_config(dtype: torch.dtype, interpret: bool, drop_k: bool = False) -> dict:
    """Tiles for ``_matmul_kernel``, ``drop_k`` for its GEMMs over token rows (dW); tests/triton_aot.py
    checks them against sm_90a and sm_80."""
    if interpret:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1)
    if dtype == torch.float32:
        config = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    else:
        config = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4)
    if drop_k:
        # dW's B tiles are masked by a loaded flag (the row's column): triton's pipeliner spreads
        # its stages over that chain of two loads, so 2 s - 1 stages give the A and B tiles the
        # buffers s give the other GEMMs (4 / 3 on sm_90a / sm_80 for 16-bit, 2 for fp32).
        config["num_stages"] = 2 * config["num_stages"] - 1
    return config


def _matmul(a, b, out, epilogue, config, *, bias=None, softcap=None, class_weights=None, loss_terms=None,
            rows=None, drop=None, filter_eps=None, live=None):
    """The GEMMs of the gradients, fp32 accumulation; strides are honoured, so transposes are
    free. ``rows``: each token row's column (int32), -1 when dropped, any other negative value
    when kept with its target outside this head (another rank's vocabulary shard); ``drop``: which
    dimension runs over token rows, "k" (a dropped row's B row loads as zeros: its hidden may be
    Inf or NaN) or "m" (a dropped row's output is left as it is).
      * EPILOGUE_LOSS_GRAD, ``dx = lossgrad(h @ W.T)``: ``loss_terms`` = (stats ``[2, M]``: row max
        and log-sum, column, coefs ``[3, M]``: cp, ct, cu, first column of this chunk) and the
        chunk's ``class_weights``; a dropped row's dx is 0; ``filter_eps`` as in ``gradients``, and
        then ``live`` (int8 ``[M tiles, N tiles]``) gets whether each dx tile may be non-zero.
      * EPILOGUE_LOGITS, ``x - tile max = h @ W.T`` (+ bias, soft-cap) for the row path
        (``_cross_entropy_rows``): ``loss_terms`` = (parts ``[4, column tiles, M]``, column, -, 0)
        get each row's tile max, sum of exp, (``class_weights``-weighted) logit sum and target logit.
      * EPILOGUE_STORE, ``dW = dx.T @ h``; EPILOGUE_ACCUMULATE, ``out += a @ b``."""
    m, k = a.shape
    n = b.shape[1]
    if loss_terms is None:
        if rows is None or drop not in ("k", "m"):
            raise ValueError("_matmul: EPILOGUE_STORE and EPILOGUE_ACCUMULATE need rows and drop")
        loss_terms = (out, rows, out, 0)
    stats, column, coefs, col_offset = loss_terms
    grid = (cdiv(m, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]),)
    _matmul_kernel[grid](
        a, b, out, bias if bias is not None else out, class_weights if class_weights is not None else out, stats,
        column, coefs if coefs is not None else stats, live if live is not None else column, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        col_offset, float(softcap) if softcap is not None else 1.0,
        float(filter_eps) if filter_eps is not None else 0.0, FILTER=filter_eps is not None, EPILOGUE=int(epilogue),
        DROP_K=drop == "k", HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        HAS_CLASS_WEIGHTS=class_weights is not None,
        PRECISION=dot_precision(a.dtype), **config,
    )


def listed_config(dtype: torch.dtype, interpret: bool, tile: tuple[int, int]) -> dict:
    """Tiles for ``_listed_matmul_kernel`` over dx tiles of ``tile`` = (extent along M, along K):
    BLOCK_M is the tile's M extent (one list per row tile of the output) and BLOCK_K divides its K
    extent; tests/triton_aot.py checks them against sm_90a and sm_80."""
    block_m, k_tile = tile
    if interpret:
        return dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=min(16, k_tile), K_TILE=k_tile, GROUP_M=2, num_warps=1,
                    num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, K_TILE=k_tile, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=64, K_TILE=k_tile, GROUP_M=8, num_warps=8, num_stages=3)


def _listed_matmul(a, b, out, live, tile, column, drop, *, accumulate):
    """``out (+)= a @ b`` over the K tiles each output row tile's ``live`` row (int8 flags
    ``[M tiles, K tiles]`` of the dx tiles) marks: the live tiles' indices first, in order (a
    stable sort, no host sync), and their count."""
    live = live.contiguous()  # the lists are read with unit stride along a row
    order = torch.sort(live, dim=1, descending=True, stable=True).indices.to(torch.int32)
    count = live.sum(1, dtype=torch.int32)
    config = listed_config(a.dtype, dispatch.TRITON_INTERPRET, tile)
    m, k = a.shape
    n = b.shape[1]
    grid = (cdiv(m, config["BLOCK_M"]) * cdiv(n, config["BLOCK_N"]),)
    _listed_matmul_kernel[grid](
        a, b, out, order, count, column, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        out.stride(0), out.stride(1), order.stride(0), ACCUMULATE=accumulate, DROP_K=drop == "k", DROP_M=drop == "m",
        PRECISION=dot_precision(a.dtype), **config)


@triton.jit
def not_below(x, eps):
    """``not (x < eps)``: True for NaN, so that a NaN tile stays live."""
    return (x < eps) == 0


@triton.jit
def filter_p_term(p_row_max, target, cp, filter_eps):
    """CCE-style gradient filtering of one dx tile from each row's largest p in it (``p_row_max``):
    (cp, 0 where the tile's kept rows' p are all below eps; whether the p term stays). The target's
    and label smoothing's terms are not touched."""
    p_live = not_below(tl.max(tl.where(target != -1, p_row_max, 0.0), 0), filter_eps)
    return tl.where(p_live, cp, 0.0), p_live


@triton.jit
def tile_live(p_live, target, cu, first_col, BLOCK_N: tl.constexpr):
    """Whether a filtered dx tile (columns from ``first_col``, numbered as ``target``) may be non-zero:
    its p term stays, a kept row's target is in it, or label smoothing spreads over it. The dW and
    dH GEMMs skip the others (``_listed_matmul``)."""
    local = target - first_col
    has_target = tl.max(((target != -1) & (local >= 0) & (local < BLOCK_N)).to(tl.int32), 0) > 0
    spread = tl.max(((target != -1) & (cu != 0.0)).to(tl.int32), 0) > 0
    return p_live | has_target | spread


@triton.jit
def logit_grad(log_p, cols, col_target, target, x, cp, ct, uniform, softcap, HAS_SOFTCAP: tl.constexpr):
    """d loss / d logit of a dx tile, ``(p cp - uniform - ct [col = target]) (1 - (x / softcap)^2)``
    with p = exp(``log_p``) and x the soft-capped logit; ``cols`` and ``col_target`` number the
    columns alike; a dropped row (``target`` -1) is selected to 0, not multiplied: it may have Inf
    or NaN logits, statistics or coefficients."""
    grad = tl.exp(log_p) * cp[:, None] - uniform
    grad -= tl.where(cols[None, :] == col_target[:, None], ct[:, None], 0.0)
    if HAS_SOFTCAP:
        grad = grad * (1.0 - (x / softcap) * (x / softcap))
    return tl.where(target[:, None] != -1, grad, 0.0)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (row tile, column tile) of an [M, N] output in grouped order: GROUP_M row
    tiles sweep the columns together, so B tiles are reused from L2 instead of re-read from memory."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _lse_kernel(
    h_ptr, w_ptr, bias_ptr, class_weight_ptr, column_ptr, parts_ptr, n_rows, vocab, dim,
    stride_hn, stride_hd, stride_wv, stride_wd, cols_per_split, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_CLASS_WEIGHTS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A row block's column splits are adjacent in launch order (see _l2_splits); the host's split
    # count is cdiv(vocab, cols_per_split).
    splits = tl.cdiv(vocab, cols_per_split)
    split = tl.program_id(0) % splits
    rows = (tl.program_id(0) // splits).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
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
            if HAS_CLASS_WEIGHTS:  # the label-smoothing term of torch's weight=: sum_v w_v x_v
                logit_sum += tl.sum(tl.where(col_ok[None, :], x * tl.load(class_weight_ptr + cols, mask=col_ok,
                                                                          other=0.0)[None, :], 0.0), 1)
            else:
                logit_sum += tl.sum(tl.where(col_ok[None, :], x, 0.0), 1)
            target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], x, 0.0), 1)
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)

    out = split.to(tl.int64) * n_rows + rows
    plane = splits.to(tl.int64) * n_rows
    tl.store(parts_ptr + out, row_max, mask=row_ok)
    tl.store(parts_ptr + plane + out, exp_sum, mask=row_ok)
    tl.store(parts_ptr + 2 * plane + out, logit_sum, mask=row_ok)
    tl.store(parts_ptr + 3 * plane + out, target_logit, mask=row_ok)


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, class_weight_ptr, stats_ptr, column_ptr, coef_ptr, live_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    col_offset, softcap, filter_eps,
    FILTER: tl.constexpr, EPILOGUE: tl.constexpr, DROP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_CLASS_WEIGHTS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm < M)[:, None] & (k0 + rk < K)[None, :], other=0.0)
        k_ok = k0 + rk < K
        if DROP_K:
            # dW = dx.T @ h: K runs over token rows. A dropped row's dx is 0, but its hidden may
            # be Inf or NaN (0 * Inf = NaN): it loads as zeros.
            k_ok &= tl.load(column_ptr + k0 + rk, mask=k_ok, other=-1) != -1
        b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    if EPILOGUE == EPILOGUE_LOSS_GRAD:
        # acc holds logits of rows rm, columns col_offset + rn: turn them into d loss / d logit,
        # p cp - ct [v = t] - cu w_v, through the soft-cap. p = exp((x - m) - log-sum): x - m is exact
        # near the max, where exp(x - lse) would carry lse's rounding (~1e-4 at |x| ~ 1e3).
        row_ok = rm < M
        row_max = tl.load(stats_ptr + rm, mask=row_ok, other=0.0)
        log_sum = tl.load(stats_ptr + M + rm, mask=row_ok, other=0.0)
        target = tl.load(column_ptr + rm, mask=row_ok, other=-1)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            acc = softcap * tanh(acc / softcap)
        cp = tl.load(coef_ptr + rm, mask=row_ok, other=0.0)
        if FILTER:
            # exp and - are monotone, so the tile's largest p comes from each row's largest logit
            # (a few registers, where a masked [BLOCK_M, BLOCK_N] p would spill on sm_80)
            x_max = tl.max(tl.where((rn < N)[None, :], acc, float("-inf")), 1)
            cp, p_live = filter_p_term(tl.exp((x_max - row_max) - log_sum), target, cp, filter_eps)
        ct = tl.load(coef_ptr + M + rm, mask=row_ok, other=0.0)
        cu = tl.load(coef_ptr + 2 * M + rm, mask=row_ok, other=0.0)
        if FILTER:
            tl.store(live_ptr + pid_m * tiles_n + pid_n,
                     tile_live(p_live, target, cu, col_offset + pid_n * BLOCK_N, BLOCK_N).to(tl.int8))
        uniform = cu[:, None]
        if HAS_CLASS_WEIGHTS:
            uniform = uniform * tl.load(class_weight_ptr + rn, mask=rn < N, other=0.0)[None, :]
        # the target's column within this chunk, compared in 32 bits (a chunk is < 2^31 columns)
        acc = logit_grad((acc - row_max[:, None]) - log_sum[:, None], pid_n * BLOCK_N + tl.arange(0, BLOCK_N),
                         target - col_offset, target, acc, cp, ct, uniform, softcap, HAS_SOFTCAP)
    if EPILOGUE == EPILOGUE_LOGITS:
        # The row path's logits, stored as x - (the row's max over this tile) in c's dtype: where
        # p = exp(x - m - log-sum) matters, x is near that max, so 16 bits keep it to ~|x - max| 2^-9
        # (raw |x| ~ 30 would round 20x coarser). The tile's max, sum of exp relative to it,
        # logit sum and target logit go to parts [4, tiles_n, M] (stats_ptr) for the row's merge.
        row_ok = rm < M
        col_ok = rn < N
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            acc = softcap * tanh(acc / softcap)
        tile_max = tl.max(tl.where(col_ok[None, :], acc, float("-inf")), 1)
        acc = tl.where(col_ok[None, :], acc, 0.0)
        if HAS_CLASS_WEIGHTS:
            logit_sum = tl.sum(acc * tl.load(class_weight_ptr + rn, mask=col_ok, other=0.0)[None, :], 1)
        else:
            logit_sum = tl.sum(acc, 1)
        target = tl.load(column_ptr + rm, mask=row_ok, other=-1)
        target_logit = tl.sum(tl.where(rn[None, :] == target[:, None], acc, 0.0), 1)
        acc -= tile_max[:, None]
        exp_sum = tl.sum(tl.where(col_ok[None, :], tl.exp(acc), 0.0), 1)
        part = stats_ptr + pid_n.to(tl.int64) * M + rm
        plane = tiles_n.to(tl.int64) * M
        tl.store(part, tile_max, mask=row_ok)
        tl.store(part + plane, exp_sum, mask=row_ok)
        tl.store(part + 2 * plane, logit_sum, mask=row_ok)
        tl.store(part + 3 * plane, target_logit, mask=row_ok)
    if EPILOGUE == EPILOGUE_ACCUMULATE:  # accumulate into an fp32 output; a dropped row adds nothing
        if not DROP_K:
            kept = tl.load(column_ptr + rm, mask=rm < M, other=-1) != -1
            acc = tl.where(kept[:, None], acc, 0.0)
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _listed_matmul_kernel(
    a_ptr, b_ptr, c_ptr, list_ptr, count_ptr, column_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
    stride_cm, stride_cn, stride_list,
    ACCUMULATE: tl.constexpr, DROP_K: tl.constexpr, DROP_M: tl.constexpr, PRECISION: tl.constexpr,
    K_TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``c (+)= a @ b`` over listed K tiles only: row tile m of c (BLOCK_M rows) sums over the
    ``count[m]`` K tiles (K_TILE wide) ``list[m, :count[m]]``, the dx tiles that are not all zero.
    DROP_K: token rows run along K, a dropped one (column -1) loads b as zeros (its hidden may be
    Inf or NaN); DROP_M: they run along M, a dropped one's output is 0."""
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    listed = list_ptr + pid_m.to(tl.int64) * stride_list
    subs: tl.constexpr = K_TILE // BLOCK_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for step in range(0, tl.load(count_ptr + pid_m) * subs):
        k = tl.load(listed + step // subs).to(tl.int64) * K_TILE + (step % subs) * BLOCK_K + rk
        k_ok = k < K
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rm < M)[:, None] & k_ok[None, :], other=0.0)
        if DROP_K:
            k_ok &= tl.load(column_ptr + k, mask=k_ok, other=-1) != -1
        b = tl.load(b_ptr + k[:, None] * stride_bk + rn[None, :] * stride_bn, mask=k_ok[:, None] & (rn < N)[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm < M)[:, None] & (rn < N)[None, :]
    if DROP_M:
        acc = tl.where((tl.load(column_ptr + rm, mask=rm < M, other=-1) != -1)[:, None], acc, 0.0)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
