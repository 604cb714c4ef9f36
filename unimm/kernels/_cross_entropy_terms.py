"""The O(N) algebra of ``linear_cross_entropy`` around its kernels, shared by the single-process
ops (``cross_entropy``) and the vocabulary-parallel path (``_cross_entropy_parallel``): which rows
count and with what weights, the loss from the per-row statistics, and the per-row coefficients
of the gradient kernels. Plain torch; the statistics are ``_cross_entropy_triton.statistics``'
``[4, N]`` (row max, log-sum, target logit, logit sum).
"""

from __future__ import annotations

import torch

from unimm.kernels.reference import cross_entropy as reference


def row_terms(targets, token_weights, class_weights, lo, hi, ignore_index, reduction):
    """``reference.row_terms`` (which rows are kept, their weights, the normaliser of the
    reduction) with the kernels' column (the target's column in the head, -1 for a dropped row,
    int32), then ``reference.class_terms`` (the head's class weights, each row's, the normaliser
    of the ce term): (kept, column, weights, total, head_cw, picked, ce_total)."""
    kept, column, weights, total = reference.row_terms(targets, token_weights, lo, hi, ignore_index, reduction)
    class_terms = reference.class_terms(kept, column, weights, total, class_weights, lo, hi, reduction)
    return kept, torch.where(kept, column, -1).to(torch.int32), weights, total, *class_terms


def loss(stats, terms, label_smoothing, z_loss, vocab, class_sum, reduction):
    """(loss, lse) from the statistics over the ``vocab`` columns; ``terms``: ``row_terms``';
    ``class_sum``: the sum of the class weights over those columns (None without)."""
    kept, _, weights, total, _, picked, ce_total = terms
    row_max, log_sum, target_logit, logit_sum = stats
    lse = row_max + log_sum
    if class_sum is None:
        ce = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - logit_sum / vocab)
    else:  # logit_sum is sum_v c[v] x[v]
        ce = ((1.0 - label_smoothing) * picked * (lse - target_logit)
              + label_smoothing * (class_sum * lse - logit_sum) / vocab)
    # selected, not multiplied: a dropped row's lse may be Inf or NaN
    ce = torch.where(kept, weights * ce, 0.0)
    z = torch.where(kept, weights * z_loss * lse.square(), 0.0)
    if reduction == "mean":
        return ce.sum() / ce_total + z.sum() / total, lse
    if reduction == "sum":
        return (ce + z).sum(), lse
    return ce + z, lse


def coefs(stats, terms, grad_loss, grad_lse, label_smoothing, z_loss, vocab, class_sum):
    """The ``[3, N]`` (cp, ct, cu) of ``_cross_entropy_triton.gradients``. With a = upstream
    gradient x token weight / the ce term's "mean" normaliser, b the same over the z term's, c the
    class weights (1 without; picked = c[t]) and g = ``grad_lse`` (None: 0), a kept row's
    ``d/dx [a ce + b z_loss lse^2 + g lse]`` (ce: the reference module docstring) is
    ``p (a ((1 - eps) c[t] + eps sum(c) / V) + 2 b z_loss lse + g) - a (1 - eps) c[t] [v = t]
    - a eps / V c[v]``; a dropped row's is selected to 0 in the kernel, its g unread."""
    _, _, weights, total, _, picked, ce_total = terms
    scaled = grad_loss.float().reshape(-1) * weights
    a, b = scaled / ce_total, scaled / total
    smooth = label_smoothing * (class_sum / vocab if class_sum is not None else 1.0)
    ct = a * (1.0 - label_smoothing) * picked
    cp = ct + a * smooth + b * (2.0 * z_loss) * (stats[0] + stats[1])
    if grad_lse is not None:
        cp = cp + grad_lse.float().reshape(-1)
    return torch.stack((cp, ct, a * (label_smoothing / vocab)))


def rows_of(terms, rows: slice):
    """``row_terms``' terms of the token rows ``rows`` (the per-row ones sliced, the others as they are)."""
    kept, column, weights, total, head_cw, picked, ce_total = terms
    return kept[rows], column[rows], weights[rows], total, head_cw, picked[rows], ce_total


def full_rows(block: torch.Tensor, lo: int, vocab: int) -> torch.Tensor:
    """The gradient of a whole ``[V, ...]`` parameter from that of its rows ``[lo, lo + len)``."""
    if block.shape[0] == vocab:
        return block
    full = block.new_zeros((vocab, *block.shape[1:]))
    full[lo:lo + block.shape[0]] = block
    return full
