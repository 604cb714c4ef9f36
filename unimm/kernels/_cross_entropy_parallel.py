"""Vocabulary-parallel ``linear_cross_entropy`` (its ``process_group=``), for tensor-parallel heads.

Each rank of the group holds a contiguous shard of the vocabulary, in rank order: its rows of
``weight`` (and ``bias``); hidden, targets and the weights of rows and classes are the same on
every rank (as after a tensor-parallel block). No rank forms a full row of logits:
  * forward: each rank computes its shard's per-row statistics (max, log-sum, target logit, logit
    sum) with the kernels; an all-reduce of the maxima, then one of the sum-exps rescaled to the
    global max together with the target logits and logit sums, make them global; the loss follows
    on every rank from the O(N) terms. Communication: 4 N fp32 values.
  * backward: each rank runs the chunked gradients of its shard with the global statistics: its
    own dW and dbias, and a partial dH that one all-reduce (N x D fp32) sums over the group.
``vocab_range`` is in global columns; a rank whose shard misses it contributes empty statistics.
FLOPs per rank are those of the single-process path on V / ranks columns.

Backends: "triton" runs the kernels of ``_cross_entropy_triton`` on the shard; "reference"
materialises the shard's logits in plain torch (fp32, fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from unimm.kernels import _cross_entropy_terms as terms_


def shard_offset(weight: torch.Tensor, group) -> tuple[int, int]:
    """(first global row of this rank's shard, rows of all shards): one all-gather of the sizes."""
    size = torch.tensor([weight.shape[0]], dtype=torch.int64, device=weight.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    sizes = [int(s) for s in sizes]
    return sum(sizes[:dist.get_rank(group)]), sum(sizes)


def linear_cross_entropy(hidden, weight, bias, targets, token_weights, class_weights, group, offset, backend, lo, hi,
                         ignore_index, reduction, label_smoothing, z_loss, softcap, workspace):
    """(loss, lse, stats) of the rows ``hidden [N, D]`` over the global columns ``[lo, hi)``,
    ``weight`` and ``bias`` being this rank's shard from global row ``offset`` (``shard_offset``);
    stats: the global ``[4, N]``."""
    options = (group, backend, offset, lo, hi, ignore_index, reduction, label_smoothing, z_loss, softcap, workspace)
    return _VocabParallel.apply(hidden, weight, bias, targets, token_weights, class_weights, options)


class _VocabParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, token_weights, class_weights, options):
        group, backend, offset, lo, hi, ignore_index, reduction, label_smoothing, z_loss, softcap, _ = options
        terms, local = _local_terms(weight, bias, targets, token_weights, class_weights, offset, lo, hi, ignore_index,
                                    reduction)
        head, head_bias, column, head_cw, _ = local
        stats = _all_reduce_stats(_local_stats(backend, hidden, head, head_bias, column, softcap, head_cw), group)
        class_sum = terms[4].sum() if terms[4] is not None else None
        loss, lse = terms_.loss(stats, terms, label_smoothing, z_loss, hi - lo, class_sum, reduction)
        ctx.options = options
        ctx.save_for_backward(hidden, weight, bias, targets, token_weights, class_weights, stats)
        ctx.mark_non_differentiable(stats)
        return loss, lse, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, _):
        group, backend, offset, lo, hi, ignore_index, reduction, label_smoothing, z_loss, softcap, workspace = (
            ctx.options)
        hidden, weight, bias, targets, token_weights, class_weights, stats = ctx.saved_tensors
        terms, local = _local_terms(weight, bias, targets, token_weights, class_weights, offset, lo, hi, ignore_index,
                                    reduction)
        head, head_bias, column, head_cw, first = local
        class_sum = terms[4].sum() if terms[4] is not None else None
        coefs = terms_.coefs(stats, terms, grad_loss, grad_lse, label_smoothing, z_loss, hi - lo, class_sum)
        wants = ctx.needs_input_grad[:3]
        if head.shape[0] == 0:  # no column of the range here: this rank adds nothing to dH
            dh, dw, db = (hidden.new_zeros(hidden.shape), head.new_zeros(head.shape),
                          head.new_zeros(head.shape[:1], dtype=torch.float32))
        elif backend == "triton":
            from unimm.kernels import _cross_entropy_triton as triton_backend

            dh, dw, db = triton_backend.gradients(hidden, head, head_bias, column, stats, coefs, softcap, wants,
                                                  workspace, head_cw)
        else:
            dh, dw, db = _torch_gradients(hidden, head, head_bias, column, stats, coefs, softcap, head_cw)
        if wants[0]:  # the same on every rank: hidden is the group's
            dh = dh.float()
            dist.all_reduce(dh, group=group)  # every rank's share of every row's gradient
            dh = dh.to(hidden.dtype)
        dw = terms_.full_rows(dw, first, weight.shape[0]).to(weight.dtype) if wants[1] else None
        db = terms_.full_rows(db, first, weight.shape[0]).to(bias.dtype) if wants[2] else None
        return dh, dw, db, None, None, None, None


def _local_terms(weight, bias, targets, token_weights, class_weights, offset, lo, hi, ignore_index, reduction):
    """The global row terms and this rank's share: (head, head bias, the kernels' column in the
    head: -1 dropped, -2 kept with its target on another rank; the head's class weights, the
    head's first row in the shard)."""
    terms = terms_.row_terms(targets, token_weights, class_weights, lo, hi, ignore_index, reduction)
    first = min(max(lo - offset, 0), weight.shape[0])
    last = min(max(hi - offset, 0), weight.shape[0])
    skip = offset + first - lo  # the head's column 0 is column ``skip`` of the range
    column = terms[1].long() - skip
    here = (column >= 0) & (column < last - first)
    column = torch.where(terms[1] == -1, -1, torch.where(here, column, -2)).to(torch.int32)
    head_cw = terms[4][skip:skip + last - first] if terms[4] is not None else None
    head_bias = bias[first:last] if bias is not None else None
    return terms, (weight[first:last], head_bias, column, head_cw, first)


def _local_stats(backend, hidden, head, head_bias, column, softcap, head_cw):
    """This rank's ``[4, N]`` statistics of its head (max -inf and log-sum -inf when it is empty)."""
    n = hidden.shape[0]
    if head.shape[0] == 0:
        empty = torch.full((n,), float("-inf"), device=hidden.device)
        return torch.stack((empty, empty, torch.zeros_like(empty), torch.zeros_like(empty)))
    if backend == "triton":
        from unimm.kernels import _cross_entropy_triton as triton_backend

        return triton_backend.statistics(hidden, head, head_bias, column, softcap, head_cw)
    x = _torch_logits(hidden, head, head_bias, softcap)
    row_max = x.amax(-1)
    log_sum = (x - row_max[:, None]).exp().sum(-1).log()
    target = torch.where(column >= 0, x.gather(1, column.long().clamp_min(0)[:, None])[:, 0], 0.0)
    logit_sum = x @ head_cw.to(x.dtype) if head_cw is not None else x.sum(-1)
    return torch.stack((row_max, log_sum, target, logit_sum)).float()


def _all_reduce_stats(stats, group):
    """The group's statistics from each rank's: max of the maxima, sum of the sum-exps rescaled to
    it, sums of the target logits and logit sums."""
    row_max = stats[0].clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack(((stats[1] + (stats[0] - row_max)).exp(), stats[2], stats[3]))
    dist.all_reduce(sums, group=group)
    return torch.stack((row_max, sums[0].log(), sums[1], sums[2]))


def _torch_logits(hidden, head, head_bias, softcap):
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    x = hidden.to(dtype) @ head.to(dtype).T
    if head_bias is not None:
        x = x + head_bias.to(dtype)
    return softcap * torch.tanh(x / softcap) if softcap is not None else x


def _torch_gradients(hidden, head, head_bias, column, stats, coefs, softcap, head_cw):
    """(dh, dw, db) of ``_cross_entropy_triton.gradients`` in plain torch, on the shard's logits."""
    kept = (column != -1)[:, None]
    h = torch.where(kept, hidden, 0.0)  # a dropped row's Inf or NaN reaches no gradient
    x = _torch_logits(h, head, head_bias, softcap)
    cp, ct, cu = coefs.to(x.dtype)
    p = ((x - stats[0, :, None]) - stats[1, :, None]).exp()
    uniform = cu[:, None] * (head_cw.to(x.dtype)[None, :] if head_cw is not None else 1.0)
    dx = p * cp[:, None] - uniform
    onehot = torch.arange(head.shape[0], device=x.device)[None, :] == column[:, None]
    dx = dx - torch.where(onehot, ct[:, None], 0.0)
    if softcap is not None:
        dx = dx * (1.0 - (x / softcap).square())
    dx = torch.where(kept, dx, 0.0)
    return dx @ head.to(dx.dtype), dx.T @ h.to(dx.dtype), dx.sum(0)
