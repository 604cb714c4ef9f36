"""The meaning of ``linear_cross_entropy``, in plain PyTorch (materialised logits).

For rows ``h`` of ``hidden [N, D]`` and the column block ``(lo, hi)`` of the vocabulary:
  x   = h @ weight[lo:hi].T (+ bias[lo:hi])          in fp32 (fp64 when asked)
  x   = softcap * tanh(x / softcap)                   if softcap
  lse = logsumexp(x)
  for a kept token (target != ignore_index), with eps = label_smoothing and w its token weight:
    ce = (1 - eps) (lse - x[target - lo]) + eps (lse - mean(x))
    l  = w (ce + z_loss lse^2)
  ignored tokens: l = 0, no gradient.
  reduction "mean": sum(l) / sum(w over kept tokens), 0 when nothing is kept; "sum": sum(l);
  "none": l [N]. ``return_lse`` adds lse [N] (fp32) for every row.

Autograd through these torch ops gives the gradients the kernels must match.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         token_weights: torch.Tensor | None = None, vocab_range: tuple[int, int] | None = None,
                         return_lse: bool = False, compute_dtype: torch.dtype = torch.float32):
    lo, hi = vocab_range if vocab_range is not None else (0, weight.shape[0])
    h = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
    x = h @ weight[lo:hi].to(compute_dtype).T
    if bias is not None:
        x = x + bias[lo:hi].to(compute_dtype)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    lse = torch.logsumexp(x, dim=-1)

    targets = targets.reshape(-1)
    kept = targets != ignore_index
    column = torch.where(kept, targets - lo, 0)
    target_logit = x.gather(1, column[:, None])[:, 0]
    ce = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - x.mean(-1))
    w = token_weights.reshape(-1).to(compute_dtype) if token_weights is not None else torch.ones_like(lse)
    w = torch.where(kept, w, 0.0)
    loss = w * (ce + z_loss * lse.square())
    loss = torch.where(kept, loss, 0.0)  # an ignored row contributes exactly 0, and no NaN

    if reduction == "mean":
        total_weight = w.sum()
        loss = loss.sum() / torch.where(total_weight != 0, total_weight, 1.0)  # 0, not NaN, when nothing is kept
    elif reduction == "sum":
        loss = loss.sum()
    if return_lse:
        return loss, lse.detach().float()
    return loss
