"""The row path of ``unimm.kernels.cross_entropy``'s Triton backend: the statistics and the gradients
of a scalar loss in one pass over the logits, 6 N D V FLOPs (the column path recomputes them: 8).

Per chunk of R token rows (``_cross_entropy_cost.row_chunk``: as many as the workspace holds):
  1. ``_matmul_kernel`` (EPILOGUE_LOGITS) forms the chunk's logits ``[R, V]`` once and stores them as
     x - (the row's max over the tile), in the input dtype, with each tile's statistics;
  2. a torch merge of the tiles' statistics gives each row's max and log-sum, the loss terms and
     the per-row coefficients of its gradient;
  3. ``_row_grad_kernel`` turns the stored logits into ``dx`` in place (the same epilogue algebra as
     the column path's EPILOGUE_LOSS_GRAD, on the same tiles, so gradient filtering drops the same
     tiles);
  4. ``dH[chunk] = dx @ W`` and ``dW = dx.T @ h`` on cuBLAS (plain GEMMs: nothing to fuse), dW
     accumulated over chunks in fp32 by the Triton GEMM (dropped rows' hidden loads as zeros) when
     there are several; ``dbias += colsum(dx)``. With gradient filtering, step 3 flags the dx tiles
     that may be non-zero and both GEMMs run in ``_listed_matmul_kernel`` over those tiles only.

Imported only where triton is.
"""

import torch
import triton
import triton.language as tl

from unimm.kernels import dispatch
from unimm.kernels._common import cdiv, device_guard
from unimm.kernels._cross_entropy_triton import (
    EPILOGUE_ACCUMULATE,
    EPILOGUE_LOGITS,
    _listed_matmul,
    _matmul,
    _matmul_config,
    filter_p_term,
    logit_grad,
    merge_parts,
    tile_live,
)


def gradients_with_statistics(hidden, head, head_bias, column, row_coefs, softcap, wants, rows_per_chunk,
                              class_weights=None, filter_eps=None):
    """``(stats, dh, dw, db)``: ``_cross_entropy_triton.statistics``' ``[4, N]`` and
    ``_cross_entropy_triton.gradients``' results (None where not in ``wants``), in one pass.
    ``row_coefs(stats, rows)``: the fp32 ``[3, len(rows)]`` coefficients (cp, ct, cu) of the token
    rows ``rows`` (a slice) from their ``[4, len(rows)]`` statistics."""
    n, d = hidden.shape
    vocab = head.shape[0]
    device = hidden.device
    want_dh, want_dw, want_db = wants
    interpret = dispatch.TRITON_INTERPRET
    config = _matmul_config(hidden.dtype, interpret)
    tiles = cdiv(vocab, config["BLOCK_N"])
    rows_per_chunk = min(n, rows_per_chunk)
    chunks = cdiv(n, rows_per_chunk)
    with device_guard(device):
        logits = torch.empty(rows_per_chunk, vocab, dtype=hidden.dtype, device=device)
        parts = torch.empty(4 * tiles * rows_per_chunk, dtype=torch.float32, device=device)
        stats = torch.empty(4, n, dtype=torch.float32, device=device)
        dh = torch.empty(n, d, dtype=hidden.dtype, device=device) if want_dh else None
        # several chunks add into dW: in fp32 (the weight's dtype when that is fp32)
        dw = None
        if want_dw and chunks > 1:
            dw = torch.zeros(vocab, d, dtype=torch.float32, device=device)
        db = torch.zeros(vocab, dtype=torch.float32, device=device) if want_db else None
        for start in range(0, n, rows_per_chunk):
            rows = slice(start, min(n, start + rows_per_chunk))
            count = rows.stop - start
            h, col = hidden[rows], column[rows]
            dx = logits[:count]
            chunk_parts = parts[:4 * tiles * count].view(4, tiles, count)
            _matmul(h, head.T, dx, EPILOGUE_LOGITS, config, bias=head_bias, softcap=softcap,
                    class_weights=class_weights, loss_terms=(chunk_parts, col, None, 0))
            chunk_stats = merge_parts(chunk_parts)
            stats[:, rows] = chunk_stats
            coefs = row_coefs(chunk_stats, rows).contiguous()
            row_tiles = cdiv(count, config["BLOCK_M"])
            live = torch.empty(row_tiles, tiles, dtype=torch.int8, device=device) if filter_eps is not None else None
            _row_grad_kernel[(row_tiles, tiles)](
                dx, chunk_parts, chunk_stats, col, coefs, class_weights if class_weights is not None else coefs,
                live if live is not None else coefs, count, vocab, dx.stride(0),
                float(softcap) if softcap is not None else 1.0,
                float(filter_eps) if filter_eps is not None else 0.0, FILTER=filter_eps is not None,
                HAS_SOFTCAP=softcap is not None, HAS_CLASS_WEIGHTS=class_weights is not None,
                BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], SUB_N=min(32, config["BLOCK_N"]),
                num_warps=config["num_warps"],
            )
            if live is not None:  # filtered: the GEMMs visit the dx tiles that may be non-zero
                if want_dh:
                    _listed_matmul(dx, head, dh[rows], live, (config["BLOCK_M"], config["BLOCK_N"]), col, "m",
                                   accumulate=False)
                if want_dw:
                    if dw is None:
                        dw = torch.empty(vocab, d, dtype=head.dtype, device=device)
                    _listed_matmul(dx.T, h, dw, live.T, (config["BLOCK_N"], config["BLOCK_M"]), col, "k",
                                   accumulate=chunks > 1)
            else:
                kept = (col != -1)[:, None]
                if want_dh:  # selected: a dropped row's dH is 0 whatever W holds
                    dh[rows] = torch.where(kept, torch.mm(dx, head), 0.0)
                if want_dw and chunks == 1:  # a dropped row's hidden may be Inf or NaN: zeros in its place
                    dw = torch.mm(dx.T, torch.where(kept, h, 0.0))
                elif want_dw:
                    _matmul(dx.T, h, dw, EPILOGUE_ACCUMULATE, _matmul_config(hidden.dtype, interpret, drop_k=True),
                            rows=col, drop="k")
            if want_db:
                db += dx.sum(0, dtype=torch.float32)
    if dw is not None:
        dw = dw.to(head.dtype)
    return stats, dh, dw, db


@triton.jit
def _row_grad_kernel(
    x_ptr, parts_ptr, stats_ptr, column_ptr, coef_ptr, class_weight_ptr, live_ptr, M, N, stride_xm, softcap,
    filter_eps, FILTER: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_CLASS_WEIGHTS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUB_N: tl.constexpr,
):
    """dx = (p cp - ct [v = t] - cu w_v) (1 - (x / softcap)^2) in place of the stored x - tile max,
    on the logits GEMM's tiles (BLOCK_N equal to its, so the tile's max is its parts entry). With
    FILTER, live_ptr ``[row tiles, column tiles]`` int8 gets whether the tile's dx may be non-zero
    (``tile_live``)."""
    pid_n = tl.program_id(1)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rm < M
    tile_max = tl.load(parts_ptr + pid_n.to(tl.int64) * M + rm, mask=row_ok, other=0.0)
    row_max = tl.load(stats_ptr + rm, mask=row_ok, other=0.0)
    log_sum = tl.load(stats_ptr + M + rm, mask=row_ok, other=0.0)
    target = tl.load(column_ptr + rm, mask=row_ok, other=-1)
    cp = tl.load(coef_ptr + rm, mask=row_ok, other=0.0)
    ct = tl.load(coef_ptr + M + rm, mask=row_ok, other=0.0)
    cu = tl.load(coef_ptr + 2 * M + rm, mask=row_ok, other=0.0)
    # log p at the tile's max: p = exp(x + shift) with x the stored (small where p matters) offset
    shift = (tile_max - row_max) - log_sum
    if FILTER:  # the column path's rule and flags, from the same per-row values
        cp, p_live = filter_p_term(tl.exp(shift), target, cp, filter_eps)
        tl.store(live_ptr + tl.program_id(0) * tl.num_programs(1) + pid_n,
                 tile_live(p_live, target, cu, pid_n * BLOCK_N, BLOCK_N).to(tl.int8))
    # the tile in column slices of SUB_N: a whole BLOCK_M x BLOCK_N tile of fp32 temporaries per
    # program would take every register of 8 warps (one CTA per SM for a memory-bound pass)
    for c0 in tl.static_range(0, BLOCK_N, SUB_N):
        rn = pid_n * BLOCK_N + c0 + tl.arange(0, SUB_N)
        col_ok = rn < N
        ptrs = x_ptr + rm[:, None] * stride_xm + rn[None, :]
        x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        uniform = cu[:, None]
        if HAS_CLASS_WEIGHTS:
            uniform = uniform * tl.load(class_weight_ptr + rn, mask=col_ok, other=0.0)[None, :]
        grad = logit_grad(x + shift[:, None], rn, target, target, x + tile_max[:, None], cp, ct, uniform, softcap,
                          HAS_SOFTCAP)
        tl.store(ptrs, grad.to(x_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
