"""The meaning of ``decode_attention``: one query token per sequence against its KV cache.

``out[b, h] = sum_{j < len_b} p[b, h, j] v[b, j, h // (Hq / Hkv)]`` with
``p = softmax_j(s)`` over the cached rows ``j in [0, len_b)``, ``len_b = cache_lens[b]``,
``s = q[b, h] . k[b, j, h // (Hq / Hkv)] * scale`` (``scale`` defaults to ``D^-1/2``), soft-capped
to ``c tanh(s / c)`` when ``softcap`` is given. A row with ``len_b = 0`` outputs 0. Rows at or past
``len_b`` never reach the output, whatever they hold (NaN included).

fp32 math with a dense per-row mask; batch rows are taken in chunks so the fp32 copies of the
cache stay bounded and the reference also serves as the CPU fallback at real sizes.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 26  # fp32 cache elements (K and V each) converted at once: 256 MiB


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, *,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:
    batch, q_heads, head_dim = q.shape
    max_len, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    lens = cache_lens.to(device=q.device, dtype=torch.int64).clamp(0, max_len)
    positions = torch.arange(max_len, device=q.device)
    out = torch.empty(batch, q_heads, head_dim, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, k_cache[0].numel()))
    for b0 in range(0, batch, rows_per_chunk):
        rows = slice(b0, b0 + rows_per_chunk)
        visible = positions[None, :] < lens[rows, None]  # [b, L]
        keep = visible[:, :, None, None]
        k = torch.where(keep, k_cache[rows].float(), 0.0)  # [b, L, Hkv, D]
        v = torch.where(keep, v_cache[rows].float(), 0.0)
        qf = q[rows].float().reshape(-1, kv_heads, group, head_dim)
        s = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        sees_any = visible.any(-1)[:, None, None, None]
        # empty rows get finite scores and zero weights: no NaN
        s = s.masked_fill(~visible[:, None, None, :], float("-inf")).masked_fill(~sees_any, 0.0)
        p = torch.softmax(s, dim=-1) * sees_any
        out[rows] = torch.einsum("bhgl,blhd->bhgd", p, v).reshape(-1, q_heads, head_dim)
    return out.to(q.dtype)
