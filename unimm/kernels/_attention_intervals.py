"""Attention under a two-interval ``AttentionMask``: unimm's one-interval kernels once per interval,
merged (``unimm.kernels.attention`` hands these masks here; its ops are passed in, so this module
imports nothing of it).

Forward: each interval's pass gives ``out_i`` and its log-sum-exp ``lse_i`` (base 2; +inf on the
rows whose interval i is empty, read as -inf here). The row's ``lse`` is the log2-sum-exp2 of
the two, and ``out = sum_i exp2(lse_i - lse) out_i`` (fp32), the split-KV merge.
Backward: each interval's backward pass runs with the combined ``lse`` and ``O``, so its
probabilities and ``delta = dO . O`` are the row's over both intervals; its dQ holds the sum over
that interval's keys, its dK / dV the sums over the rows whose interval holds the key, so
``dq = dq_1 + dq_2``, ``dk = dk_1 + dk_2``, ``dv = dv_1 + dv_2``.

Cost: each pass visits only the key tiles its own interval touches (tile bounds per interval),
so the score tiles computed are those of the union, plus the tiles both intervals touch in the
same query tile (e.g. the tile where a sink interval meets a window) computed twice. HBM traffic
beyond the passes: a second pass's read of Q and its key flags over K and V, the merge (reads two
outputs, writes one), in backward a second delta / flags pass, the fp32 sums of dq, dk, dv, and
the finiteness checks of q, k, v and dO below (one read each). A mask whose second intervals are
all empty is not here: it is a one-interval mask.

Non-finite inputs follow the reference's rule (``unimm.kernels.reference.attention``): each pass
confines what its interval holds to the rows that see it ("non-finite inputs" in
``unimm.kernels._attention_triton``), and keys outside both intervals reach nothing. Two things
cross intervals, fixed here:
  * a row whose output is NaN because of the other interval gives its pass a NaN ``O``: backward
    hands the passes ``O`` with its non-finite rows zeroed (such a row is poisoned anyway: its
    dQ comes out NaN from the pass that sees the non-finite key, and the dK of the keys it sees
    is set below; its dV needs only its probabilities, which are exact);
  * a row poisoned by a key of one interval makes NaN the dK (a non-finite k: also the dV) of the
    keys it sees in the other, which that interval's pass does not know: marked in O(B H S) torch
    ops from per-key flags (a pass over K and V), as running sums over the keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q, k, v, parts: list[tuple[torch.Tensor, ...]], scale: float, softcap: float | None, forward_op,
              backward_op) -> torch.Tensor:
    """``parts``: per interval (kv_start, kv_end, tile_first, tile_last); ``forward_op`` /
    ``backward_op``: attention's one-interval custom ops."""
    return _TwoIntervals.apply(q, k, v, scale, softcap, (forward_op, backward_op), *(t for p in parts for t in p))


class _TwoIntervals(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, scale, softcap, ops, *bounds):
        parts = [bounds[i:i + 4] for i in range(0, len(bounds), 4)]
        passes = [ops[0](q, k, v, *part, scale, softcap) for part in parts]
        out, lse2 = _merge(passes, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse2, *bounds)
        ctx.options = (scale, softcap, ops[1])
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse2, *bounds = ctx.saved_tensors
        scale, softcap, backward_op = ctx.options
        parts = [bounds[i:i + 4] for i in range(0, len(bounds), 4)]
        grad_out = grad_out.contiguous()
        out = out.masked_fill(~torch.isfinite(out).all(-1, keepdim=True), 0.0)
        grads = [backward_op(grad_out, q, k, v, out, lse2, *part, scale, softcap) for part in parts]
        dq, dk, dv = (sum(g[i].float() for g in grads).to(g0.dtype) for i, g0 in enumerate(grads[0]))
        _poison_across(dk, dv, q, k, v, grad_out, [part[:2] for part in parts])
        return (dq, dk, dv, None, None, None, *[None] * len(bounds))


def _merge(passes, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, Hq, D], lse2 [B, Hq, S], +inf where the row sees nothing) of the passes'
    (out_i, lse2_i). NaN in either pass's row stays NaN (0 * NaN where its weight underflows)."""
    lses = [torch.where(lse == float("inf"), float("-inf"), lse) for _, lse in passes]
    top = torch.maximum(*lses)
    top = torch.where(top == float("-inf"), 0.0, top)  # rows that see nothing: weights 0, not NaN
    weights = [torch.exp2(lse - top) for lse in lses]
    total = sum(weights)
    seen = total > 0
    out = sum((w / torch.where(seen, total, 1.0)).transpose(1, 2)[..., None] * o.float()
              for w, (o, _) in zip(weights, passes))
    return out.to(dtype), torch.where(seen, top + torch.log2(total), float("inf"))


def _poison_across(dk, dv, q, k, v, grad_out, intervals) -> None:
    """Set in place the NaN that cross intervals (see the module docstring): for each interval,
    the rows no pass poisoned for it (a finite q and dO, nothing non-finite in it) but whose other
    interval holds a key with a non-finite k or v (for dK) / k (for dV) make NaN what they see
    in it."""
    batch, seq_len, q_heads, _ = q.shape
    num_keys, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    k_bad = ~torch.isfinite(k).all(-1)  # [B, Skv, Hkv]
    own = ~torch.isfinite(q).all(-1) | ~torch.isfinite(grad_out).all(-1)  # [B, S, Hq]
    bounds = [(start.clamp(0, num_keys).long(), end.clamp(0, num_keys).long()) for start, end in intervals]
    for grad, bad in ((dk, k_bad | ~torch.isfinite(v).all(-1)), (dv, k_bad)):
        counts = F.pad(bad.int().cumsum(1), (0, 0, 1, 0))  # [B, Skv + 1, Hkv], inclusive, from 0
        holds = [_holds(counts, start, end, group) for start, end in bounds]  # [B, S, Hq]
        marks = torch.zeros(batch, num_keys + 1, q_heads, dtype=torch.int32, device=q.device)
        for index, (start, end) in enumerate(bounds):
            missed = ((end > start)[..., None] & ~own & ~holds[index] & holds[1 - index]).int()
            marks.scatter_add_(1, start[..., None].expand(-1, -1, q_heads), missed)
            marks.scatter_add_(1, end[..., None].expand(-1, -1, q_heads), -missed)
        seen = marks.cumsum(1)[:, :num_keys].reshape(batch, num_keys, kv_heads, group).amax(-1) > 0
        grad.masked_fill_(seen[..., None], float("nan"))


def _holds(counts: torch.Tensor, start: torch.Tensor, end: torch.Tensor, group: int) -> torch.Tensor:
    """bool [B, S, Hq]: the row's interval ``[start, end)`` holds a flagged key of its kv head."""
    kv_heads = counts.shape[2]
    end = torch.maximum(end, start)
    inside = counts.gather(1, end[..., None].expand(-1, -1, kv_heads)) - \
        counts.gather(1, start[..., None].expand(-1, -1, kv_heads))
    return (inside > 0).repeat_interleave(group, dim=2)
