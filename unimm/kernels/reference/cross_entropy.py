"""The meaning of ``linear_cross_entropy``, in plain PyTorch (materialised logits).

For rows ``h`` of ``hidden [N, D]`` and the column block ``(lo, hi)`` of the vocabulary:
  x   = h @ weight[lo:hi].T (+ bias[lo:hi])          in fp32 (fp64 when asked); 0 (+ bias) when D = 0
  x   = softcap * tanh(x / softcap)                   if softcap
  lse = m + log(sum(exp(x - m))), m = max(x) held constant: its gradient p = exp(x - m) / sum(...)
        keeps x - m exact (exp(x - lse) would carry lse's rounding, ~1e-4 at |x| ~ 1e3 in fp32)
  a row is kept when its target != ignore_index and its token weight w != 0 (w = 1 without
  token_weights; a NaN weight is kept, and propagates). For a kept row, with eps = label_smoothing,
  t = target - lo and c = class_weights[lo:hi] (torch's ``weight=``, Liger's ``ce_weight``; all 1
  without, and then ce is (1 - eps) (lse - x[t]) + eps (lse - mean(x))):
    ce = (1 - eps) c[t] (lse - x[t]) + eps / V sum_v c[v] (lse - x[v])
    z  = z_loss lse^2
  a dropped row (ignored, or weight 0): ce = z = 0, and it contributes exactly nothing to the loss
  or to any gradient, even when its hidden row holds Inf or NaN.
  reduction "mean": sum(w ce) / sum(w c[t]) + sum(w z) / sum(w), each over kept rows and 0 when
  nothing is kept (as torch and Liger: the class-weighted part over the class-weighted count,
  z-loss over the plain one); "sum": sum(w (ce + z)); "none": w (ce + z) [N].
  ``return_lse`` adds lse [N] (fp32) for every row, dropped rows included; its gradient flows
  through kept rows only. ``return_accuracy`` adds the hits (a kept row whose
  target logit is its maximum) reduced by ``reduce_hits``.
  ``grad_filter_eps`` (cut-cross-entropy's gradient filtering; None: exact): the rows x columns of
  x are cut into ``grad_filter_tile`` tiles from (0, 0); in a tile whose kept rows' p are all
  below eps, lse's gradient p is 0 (x is detached there for lse only), so the softmax part of
  every gradient (ce's, z's, a returned lse's) skips it; the target's and smoothing's terms stay.

Tensor values are never checked here (``unimm.kernels.linear_cross_entropy`` checks what it can
without a device sync); what the kernels do with values they cannot check, this does too:
  * a kept row whose target lies outside [lo, hi) acts as a NaN token weight: its loss, the
    reduced loss and the gradients it reaches are NaN;
  * reduction "mean" with a negative weight on a kept row: the loss and every gradient are NaN
    (sum(w) is no normaliser then); "sum" and "none" take negative weights as they are.

Autograd through these torch ops gives the gradients the kernels must match.
"""

from __future__ import annotations

import math

import torch

REDUCTIONS = ("mean", "sum", "none")
# (rows, columns) of a gradient-filtering tile when the caller names none (the Triton dx GEMM's on a GPU)
GRAD_FILTER_TILE = (128, 128)


def row_terms(targets: torch.Tensor, token_weights: torch.Tensor | None, lo: int, hi: int, ignore_index: int,
              reduction: str, dtype: torch.dtype = torch.float32):
    """Per row: kept (bool), its column ``target - lo`` (0 where dropped or out of range), its weight
    (0 where dropped, NaN for an out-of-range target), and the normaliser of the reduction (sum of
    the weights for "mean", NaN when a kept weight is negative, 1 in place of 0; else 1).

    Shared by the reference and the kernels, so both draw the same rows."""
    targets = targets.reshape(-1).long()
    kept = targets != ignore_index
    in_range = (targets >= lo) & (targets < hi)
    w = token_weights.reshape(-1).to(dtype) if token_weights is not None else torch.ones(
        targets.shape, dtype=dtype, device=targets.device)
    w = torch.where(in_range, w, math.nan)
    kept = kept & (w != 0)  # a zero weight drops the row, as ignore_index does; NaN != 0 keeps it
    w = torch.where(kept, w, 0.0)
    column = torch.where(kept & in_range, targets - lo, 0)
    total = torch.ones((), dtype=dtype, device=targets.device)
    if reduction == "mean":
        total = w.sum()
        if token_weights is not None:
            total = torch.where((w < 0).any(), math.nan, total)
        total = torch.where(total != 0, total, 1.0)  # 0, not NaN, when nothing is kept
    return kept, column, w, total


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """Row-wise log-sum-exp whose gradient is ``exp(x - m) / s`` (the module docstring)."""
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # all -inf (or +inf) rows: as torch.logsumexp
    return (m + (x - m).exp().sum(-1, keepdim=True).log())[..., 0]


def reduce_hits(hits: torch.Tensor, kept: torch.Tensor, reduction: str) -> torch.Tensor:
    """Token accuracy from the per-row hits (bool, False on dropped rows): fp32 per row ("none"),
    their count ("sum"), or count / kept rows ("mean", 0 when none is kept); unweighted."""
    hits = hits.float()
    if reduction == "none":
        return hits
    if reduction == "sum":
        return hits.sum()
    return hits.sum() / kept.sum().clamp(min=1)


def class_terms(kept, column, w, total, class_weights, lo, hi, reduction, dtype=torch.float32):
    """The class weights of the head ``c [V]`` (None without), each row's ``c[t]`` (0 where
    dropped; 1 without) and the normaliser of the ce term (sum of ``w c[t]`` for "mean", NaN where
    ``total`` is, 1 in place of 0; else ``total``). Shared by the reference and the kernels."""
    if class_weights is None:
        return None, torch.ones_like(w), total
    head = class_weights[lo:hi].to(dtype)
    picked = torch.where(kept, head[column], 0.0)
    ce_total = total
    if reduction == "mean":
        ce_total = (w * picked).sum()
        ce_total = torch.where(total.isnan() | (ce_total == 0), torch.where(total.isnan(), math.nan, 1.0), ce_total)
    return head, picked, ce_total


def _filter(x: torch.Tensor, kept: torch.Tensor, eps: float, tile: tuple[int, int]) -> torch.Tensor:
    """x, detached in the (rows x columns) ``tile``s whose kept rows' softmax p are all below
    ``eps`` (gradient filtering): lse keeps its value, but its gradient p skips those tiles."""
    with torch.no_grad():
        p = torch.where(kept[:, None], torch.softmax(x, -1), 0.0)
        rows, cols = tile
        pad_r, pad_c = -p.shape[0] % rows, -p.shape[1] % cols
        tiles = torch.nn.functional.pad(p, (0, pad_c, 0, pad_r)).unflatten(1, (-1, cols)).unflatten(0, (-1, rows))
        live = tiles.amax((1, 3)) >= eps
        live = live.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:p.shape[0], :p.shape[1]]
    return torch.where(live, x, x.detach())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         token_weights: torch.Tensor | None = None, vocab_range: tuple[int, int] | None = None,
                         class_weights: torch.Tensor | None = None, return_lse: bool = False,
                         return_accuracy: bool = False, grad_filter_eps: float | None = None,
                         grad_filter_tile: tuple[int, int] = GRAD_FILTER_TILE,
                         compute_dtype: torch.dtype = torch.float32):
    lo, hi = vocab_range if vocab_range is not None else (0, weight.shape[0])
    dim = hidden.shape[-1]
    h = hidden.reshape(math.prod(hidden.shape[:-1]), dim).to(compute_dtype)
    head = weight[lo:hi].to(compute_dtype)
    head_bias = bias[lo:hi].to(compute_dtype) if bias is not None else None

    def logits(rows):
        x = rows @ head.T
        if head_bias is not None:
            x = x + head_bias
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        return x

    kept, column, w, total = row_terms(targets, token_weights, lo, hi, ignore_index, reduction, compute_dtype)
    # A dropped row enters no product: its hidden is replaced by zeros before the matmul (0 * Inf
    # would be NaN in dW), and its logits by zeros after it (Inf or NaN in the weights or bias must
    # not reach it through the softmax's backward either).
    x = torch.where(kept[:, None], logits(torch.where(kept[:, None], h, 0.0)), 0.0)
    lse = logsumexp(x if grad_filter_eps is None else _filter(x, kept, grad_filter_eps, grad_filter_tile))
    target_logit = x.gather(1, column[:, None])[:, 0]
    head_weights, picked, ce_total = class_terms(kept, column, w, total, class_weights, lo, hi, reduction,
                                                 compute_dtype)
    if head_weights is None:
        ce = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - x.mean(-1))
    else:
        smooth = (head_weights.sum() * lse - x @ head_weights) / (hi - lo)
        ce = (1.0 - label_smoothing) * picked * (lse - target_logit) + label_smoothing * smooth
    ce = torch.where(kept, w * ce, 0.0)
    z = torch.where(kept, w * z_loss * lse.square(), 0.0)

    if reduction == "mean":
        loss = ce.sum() / ce_total + z.sum() / total
    elif reduction == "sum":
        loss = (ce + z).sum()
    else:
        loss = ce + z
    outputs = [loss]
    if return_lse:
        with torch.no_grad():  # every row's own lse, dropped rows included ...
            all_lse = torch.logsumexp(logits(h), dim=-1)
        outputs.append(torch.where(kept, lse, all_lse).float())  # ... with a gradient through kept rows
    if return_accuracy:
        with torch.no_grad():
            hits = kept & (target_logit >= x.amax(-1))
        outputs.append(reduce_hits(hits, kept, reduction))
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
