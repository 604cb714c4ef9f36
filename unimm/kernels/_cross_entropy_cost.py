"""The FLOP and HBM-byte model of ``linear_cross_entropy``'s Triton paths (``unimm.kernels.cross_entropy``
explains them), the choice of gradient path it drives, and the benchmark's predicted times.

Pure arithmetic on shapes: the same plan for every call of one shape, no device needed (the device's
SM count and L2 size are arguments).
"""

from __future__ import annotations

import dataclasses

from unimm.kernels._common import cdiv

# A Hopper's bf16 dense matmul rate over its HBM bandwidth, FLOPs per byte (H100 SXM ~295, H200
# ~206): the exchange rate between the two when the plan compares paths. Only the comparison
# uses it; the benchmark predicts with the run's measured rates instead.
RIDGE_FLOPS_PER_BYTE = 250
# The Triton GEMMs' row tile and L2 grouping (``_cross_entropy_triton._matmul_config`` for 16-bit
# inputs): a group of GROUP_M row tiles reads each W tile once.
BLOCK_M, GROUP_M = 128, 8
_STAT_BYTES = 16  # 4 fp32 statistics per row and column range


@dataclasses.dataclass(frozen=True)
class Plan:
    """``path`` "columns" (statistics, then gradients over ``size`` columns at a time) or "rows"
    (gradients with the forward, ``size`` rows at a time); ``phases``: (name, FLOPs, HBM bytes)."""
    path: str
    size: int
    phases: tuple[tuple[str, float, float], ...]

    def seconds(self, flops_per_s: float, bytes_per_s: float) -> float:
        """Each phase bound by the slower of its FLOPs and its bytes."""
        return sum(max(flops / flops_per_s, moved / bytes_per_s) for _, flops, moved in self.phases)


def l2_splits(sms: int, block_bytes: int, l2_bytes: int) -> int:
    """Column splits of the statistics kernel that keep the hidden blocks (``block_bytes`` each) of
    the resident CTAs (about one per SM) within half of L2 (``_cross_entropy_triton.statistics``)."""
    return max(1, cdiv(sms * block_bytes, max(1, l2_bytes // 2)))


def statistics_phase(n: int, d: int, vocab: int, e: int, sms: int, l2_bytes: int, block_n: int = 128):
    """The forward statistics pass: h once (its blocks stay in L2), W once per wave of CTAs."""
    splits = l2_splits(sms, block_n * d * e, l2_bytes)
    waves = cdiv(cdiv(n, block_n) * splits, sms)
    return ("statistics", 2.0 * n * d * vocab, n * d * e + vocab * d * e * waves + _STAT_BYTES * n * splits)


def chunk_cols(n: int, vocab: int, e: int, granule: int, workspace: int) -> int:
    """Columns per chunk of the column path: as many as the dx workspace holds, whole tiles."""
    cols = max(granule, workspace // max(1, n * e) // granule * granule)
    return max(1, min(cols, vocab))


def column_phases(n: int, d: int, vocab: int, e: int, cols: int):
    """The column path's gradients: per chunk of C columns the dx GEMM recomputes the logits and
    dW, dH follow (2 N D V FLOPs each); h is read by the dx and dW GEMMs and the fp32 dH accumulator
    read and written once per chunk, W[chunk] read by the dx and dH GEMMs, dx written and read twice."""
    chunks = vocab / cols
    w_reads = cdiv(n, BLOCK_M * GROUP_M)  # per chunk, W tiles once per row group
    return (("gradients", 6.0 * n * d * vocab,
             chunks * (2 * n * d * e + 8 * n * d) + (1 + 2 * w_reads) * vocab * d * e + 3 * n * vocab * e),)


def row_chunk(n: int, d: int, vocab: int, e: int, workspace: int, tile: tuple[int, int], want_dw: bool) -> int:
    """Rows per chunk of the row path that the workspace holds (a multiple of the GEMM's row tile,
    ``tile`` = (rows, columns), so that chunks are whole tiles; or all n), 0 when not even one row
    tile fits. Per row: its logits row in the input dtype and its per-tile
    statistics; with more than one chunk and a 16-bit dW, also the fp32 dW accumulator [V, D]."""
    block_m, block_n = tile
    per_row = vocab * e + _STAT_BYTES * cdiv(vocab, block_n)
    if n * per_row <= workspace:
        return n
    left = workspace - (4 * vocab * d if want_dw and e < 4 else 0)
    rows = max(0, left) // per_row // block_m * block_m
    return rows if rows >= block_m else 0


def row_phases(n: int, d: int, vocab: int, e: int, rows: int, block_n: int, want_dw: bool):
    """The row path, per chunk of R rows: the logits GEMM (2 R D V) stores x - tile max and per-tile
    statistics; an elementwise pass turns them into dx in place; dH = dx @ W and dW (+)= dx.T @ h
    (2 R D V each, cuBLAS, or the Triton GEMM accumulating into fp32 dW when there are several
    chunks). 6 N D V FLOPs in all."""
    chunks = cdiv(n, rows)
    stats = _STAT_BYTES * n * cdiv(vocab, block_n)
    w_reads = chunks * cdiv(rows, BLOCK_M * GROUP_M)
    if not want_dw:
        dw_bytes = 0
    elif chunks == 1 or e == 4:
        dw_bytes = n * vocab * e + n * d * e + chunks * vocab * d * e * (2 if chunks > 1 else 1)
    else:  # the fp32 accumulator read and written per chunk, then converted
        dw_bytes = n * vocab * e + n * d * e + chunks * 8 * vocab * d + vocab * d * (4 + e)
    return (("logits", 2.0 * n * d * vocab, n * d * e + w_reads * vocab * d * e + n * vocab * e + stats),
            ("dx", 0.0, 2 * n * vocab * e + 2 * stats),
            ("dH", 2.0 * n * d * vocab, n * vocab * e + chunks * vocab * d * e + n * d * e),
            ("dW", 2.0 * n * d * vocab if want_dw else 0.0, dw_bytes))


def plan(n: int, d: int, vocab: int, e: int, workspace: int, *, grads_now: bool, want_dw: bool,
         tile: tuple[int, int] = (BLOCK_M, 128), sms: int = 132, l2_bytes: int = 50 << 20) -> Plan:
    """The faster path at this shape (by ``RIDGE_FLOPS_PER_BYTE``) among those the workspace allows.
    The row path needs the gradients in the forward pass (``grads_now``: a scalar loss whose lse is
    not returned): it forms each logit once (6 N D V FLOPs where the column path needs 8).
    ``tile``: the gradient GEMMs' (rows, columns) tile."""
    block_n = tile[1]
    stats = statistics_phase(n, d, vocab, e, sms, l2_bytes)
    cols = chunk_cols(n, vocab, e, block_n, workspace)
    best = Plan("columns", cols, (stats, *column_phases(n, d, vocab, e, cols)))
    rows = row_chunk(n, d, vocab, e, workspace, tile, want_dw) if grads_now and n else 0
    if rows:
        by_rows = Plan("rows", rows, row_phases(n, d, vocab, e, rows, block_n, want_dw))
        if by_rows.seconds(RIDGE_FLOPS_PER_BYTE, 1.0) < best.seconds(RIDGE_FLOPS_PER_BYTE, 1.0):
            best = by_rows
    return best
