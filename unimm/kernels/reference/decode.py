"""The meaning of ``decode_attention``: one query token per sequence against its KV cache.

``out[b, h] = sum_{j < len_b} p[b, h, j] v[b, j, h // (Hq / Hkv)]`` with
``p = softmax_j(s)`` over the cached rows ``j in [0, len_b)``, ``len_b = cache_lens[b]``,
``s = q[b, h] . k[b, j, h // (Hq / Hkv)] * scale`` (``scale`` defaults to ``D^-1/2``), soft-capped
to ``c tanh(s / c)`` when ``softcap`` is given. A row with ``len_b = 0`` outputs 0. Rows at or past
``len_b`` never reach the output, whatever they hold (NaN included).

Paged (``block_table`` given): the caches are ``[num_pages, page_size, Hkv, D]`` and row ``j`` of
sequence ``b`` is slot ``j % page_size`` of page ``block_table[b, j // page_size]``; the cache
length is ``max_pages * page_size``. A page id outside ``[0, num_pages)`` that a row reaches makes
that row's output NaN (the id is never used to index); pages past the row's length are not read.

fp32 math with a dense per-row mask; batch rows are taken in chunks so the fp32 copies of the
cache stay bounded and the reference also serves as the CPU fallback at real sizes.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 26  # fp32 cache elements (K and V each) converted at once: 256 MiB


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor, *,
                     scale: float | None = None, softcap: float | None = None,
                     block_table: torch.Tensor | None = None) -> torch.Tensor:
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    max_len = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    group = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    lens = cache_lens.to(device=q.device, dtype=torch.int64).clamp(0, max_len)
    positions = torch.arange(max_len, device=q.device)
    out = torch.empty(batch, q_heads, head_dim, dtype=torch.float32, device=q.device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, max_len * kv_heads * head_dim))
    for b0 in range(0, batch, rows_per_chunk):
        rows = slice(b0, b0 + rows_per_chunk)
        visible = positions[None, :] < lens[rows, None]  # [b, L]
        keep = visible[:, :, None, None]
        table = block_table[rows] if block_table is not None else None
        k = torch.where(keep, _rows(k_cache, rows, table), 0.0)  # [b, L, Hkv, D]
        v = torch.where(keep, _rows(v_cache, rows, table), 0.0)
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


def _rows(cache: torch.Tensor, rows: slice, table: torch.Tensor | None) -> torch.Tensor:
    """fp32 cache rows ``[b, L, Hkv, D]`` of the batch rows ``rows``; paged, gathered through
    ``table`` (the rows of out-of-range page ids are NaN)."""
    if table is None:
        return cache[rows].float()
    num_pages = cache.shape[0]
    pages = table.to(device=cache.device, dtype=torch.int64)
    bad = (pages < 0) | (pages >= num_pages)
    if num_pages == 0:  # every id is out of range
        gathered = cache.new_zeros((*pages.shape, *cache.shape[1:]), dtype=torch.float32)
    else:
        gathered = cache[pages.clamp(0, num_pages - 1)].float()
    gathered = gathered.masked_fill(bad[:, :, None, None, None], float("nan"))  # [b, pages, page_size, Hkv, D]
    return gathered.flatten(1, 2)
