"""The meaning of ``attention``: softmax attention under an ``AttentionMask``, with a dense mask.

``out[b, i, h] = sum_j p[b, h, i, j] v[b, j, h // (Hq / Hkv)]`` with
``p = softmax_j(s)`` over the visible keys ``j in [kv_start[b, i], kv_end[b, i])``,
``s = q . k * scale`` (``scale`` defaults to ``D^-1/2``), soft-capped to ``c tanh(s / c)`` when
``softcap`` is given. A row that sees no key outputs 0 and passes no gradient.
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
    s = qf @ kf.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    visible = mask.to_dense(num_keys)[:, None]  # [B, 1, S, Skv]
    sees_any = visible.any(-1, keepdim=True)
    # rows that see nothing get finite scores and zero weights: no NaN, no gradient
    s = s.masked_fill(~visible, float("-inf")).masked_fill(~sees_any, 0.0)
    p = torch.softmax(s, dim=-1) * sees_any
    return (p @ vf).transpose(1, 2).to(q.dtype)
