"""The meaning of ``attention``: softmax attention under an ``AttentionMask``, with a dense mask.

``out[b, i, h] = sum_j p[b, h, i, j] v[b, j, h // (Hq / Hkv)]`` with
``p = softmax_j(s)`` over the visible keys ``j in [kv_start[b, i], kv_end[b, i])``, and for a
two-interval mask also ``j in [kv_start2[b, i], kv_end2[b, i])`` (``mask.to_dense``; bounds
clamped to ``[0, Skv]``), ``s = q . k * scale`` (``scale`` defaults to ``D^-1/2``), soft-capped to
``c tanh(s / c)`` when ``softcap`` is given. A row that sees no key outputs 0 and passes no
gradient.

Non-finite inputs (NaN, +-inf) reach exactly the results that depend on them, by row:
  * a row whose q holds one, or which sees a key whose k or v row holds one, outputs NaN;
  * in backward, with dO: a row whose q or dO holds one, or which sees such a key, gets a NaN
    dQ and makes NaN the dK of every key it sees; its dV too, except when only values were
    non-finite (they do not change the row's probabilities, which dV is made of);
  * everything else is computed as if the non-finite rows were absent: keys outside a row's
    interval, ignored rows (padding included) contribute exactly nothing, whatever they hold.
Rows that see nothing output 0 and pass 0 gradients whatever their q or dO. The computation runs
on the inputs with their non-finite rows zeroed (so no 0 * NaN arises where the mask excludes a
pair); the NaN are then put where the rule says, forward and backward.
"""

from __future__ import annotations

import torch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, scale: float | None = None,
              softcap: float | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    batch, seq_len, q_heads, head_dim = q.shape
    num_keys, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    qf = q.to(compute_dtype).transpose(1, 2)
    kf = k.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.to(compute_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    visible = mask.to_dense(num_keys)[:, None]  # [B, 1, S, Skv]
    sees_any = visible.any(-1)  # [B, 1, S]
    q_bad, k_bad, v_bad = (_bad_rows(t) for t in (qf, kf, vf))  # [B, Hq, S or Skv]
    qc, kc, vc = (_ZeroRows.apply(t, bad) for t, bad in ((qf, q_bad), (kf, k_bad), (vf, v_bad)))

    s = qc @ kc.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    # rows that see nothing get finite scores and zero weights: no NaN, no gradient
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~sees_any[..., None], 0.0)
    p = torch.softmax(s, dim=-1) * sees_any[..., None]
    out = p @ vc

    sees_bad_k = (visible & k_bad[:, :, None, :]).any(-1)  # [B, Hq, S]
    sees_bad_v = (visible & v_bad[:, :, None, :]).any(-1)
    out = _Poison.apply(out, qf, kf, vf, visible, q_bad & sees_any, sees_bad_k, sees_bad_v)
    return out.transpose(1, 2).to(q.dtype)


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    """Which rows (last dim) hold a NaN or an infinity."""
    return ~torch.isfinite(x).all(-1)


class _ZeroRows(torch.autograd.Function):
    """x with the rows ``bad`` zeroed; the gradient passes through unchanged (a zeroed row's
    gradient is what it would have been: dV does not depend on V, and a zeroed k row's gradient
    is either 0, when no row sees it, or NaN from _Poison)."""

    @staticmethod
    def forward(ctx, x, bad):
        return x.masked_fill(bad[..., None], 0.0)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Poison(torch.autograd.Function):
    """Identity on the clean output, with NaN where the rule puts it, forward and backward.

    Backward passes dO (its non-finite rows zeroed) to the clean computation, and adds NaN to
    the gradients of q, k and v (as the gradient of their direct inputs here) where they depend
    on a non-finite value; elsewhere it adds exact zeros.
    """

    @staticmethod
    def forward(ctx, out, q, k, v, visible, q_bad, sees_bad_k, sees_bad_v):
        ctx.save_for_backward(visible, q_bad, sees_bad_k, sees_bad_v)
        return out.masked_fill((q_bad | sees_bad_k | sees_bad_v)[..., None], float("nan"))

    @staticmethod
    def backward(ctx, grad_out):
        visible, q_bad, sees_bad_k, sees_bad_v = ctx.saved_tensors
        sees_any = visible.any(-1)
        do_bad = _bad_rows(grad_out)
        own = q_bad | (do_bad & sees_any)
        affected = own | sees_bad_k | sees_bad_v  # NaN dQ, and dK for the keys these rows see
        probabilities = own | sees_bad_k  # NaN dV too for the keys these rows see
        nan = grad_out.new_tensor(float("nan"))
        zero = grad_out.new_zeros(())
        dq = torch.where(affected[..., None], nan, zero).expand(grad_out.shape)
        dk = torch.where((visible & affected[..., None]).any(-2)[..., None], nan, zero)
        dv = torch.where((visible & probabilities[..., None]).any(-2)[..., None], nan, zero)
        head_dim = grad_out.shape[-1]
        return (grad_out.masked_fill(do_bad[..., None], 0.0), dq, dk.expand(*dk.shape[:-1], head_dim),
                dv.expand(*dv.shape[:-1], head_dim), None, None, None, None)
