"""The Triton kernels of ``unimm.kernels.decode`` (which launches them and documents what they do).

Imported only where triton is.
"""

import triton
import triton.language as tl

from unimm.kernels._triton import LOG2E, dim_mask, tanh


@triton.jit
def _row_length(lens_ptr, b, max_len):
    """The row's cache length, clamped to [0, max_len]: reads never leave the cache."""
    return tl.minimum(tl.maximum(tl.load(lens_ptr + b), 0), max_len)

@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, table_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    max_len, kv_heads, group, q_tiles, q_heads, keys_per_split, num_splits, num_pages,
    stride_qb, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    stride_tb, stride_ob, stride_oh, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, USE_DOT: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, STAGES: tl.constexpr,
):
    """PAGE_SIZE 0: row b's cache is ``k_ptr + b * stride_kb``. Else paged: the batch strides are
    the page strides, and key j of row b lives in slot ``j % PAGE_SIZE`` of page
    ``table[b, j // PAGE_SIZE]``; a page id outside ``[0, num_pages)`` is never read through, and
    makes the row's scores (so its output) NaN. BLOCK_N divides PAGE_SIZE (the launcher sees to
    it), so each step's keys lie in one page: one scalar page id a step, not one per key.

    The key loop is software-pipelined STAGES deep: the K / V tiles of the next steps are in
    flight (cp.async into shared memory) while the current one is computed. The loop
    says so itself (``tl.range(num_stages=...)``): triton pipelines on its own only loads that
    feed ``tl.dot``, so without it the broadcast path (groups under 16) would not be."""
    program = tl.program_id(0)  # ((b * kv_heads) + kv_head) * q_tiles + q_tile
    split = tl.program_id(1)
    q_tile = program % q_tiles
    kv_head = (program // q_tiles) % kv_heads
    b = (program // (q_tiles * kv_heads)).to(tl.int64)
    length = _row_length(lens_ptr, b, max_len)
    begin = split * keys_per_split
    end = tl.minimum(length, begin + keys_per_split)

    members = q_tile * BLOCK_G + tl.arange(0, BLOCK_G)  # query heads of the group
    member_ok = members < group
    heads = kv_head * group + members
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=dim_mask(member_ok, dims, HEAD_DIM, BLOCK_D), other=0.0)
    if not USE_DOT:
        q = q.to(tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    if PAGE_SIZE == 0:
        k_base += b * stride_kb
        v_base += b * stride_vb

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in tl.range(begin, end, BLOCK_N, num_stages=STAGES):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end  # never past the row's length: the cache may hold anything there
        if PAGE_SIZE == 0:
            k_rows = cols.to(tl.int64) * stride_kn
            v_rows = cols.to(tl.int64) * stride_vn
            load = dim_mask(col_ok, dims, HEAD_DIM, BLOCK_D)  # nor past D
        else:
            page = tl.load(table_ptr + b * stride_tb + n0 // PAGE_SIZE).to(tl.int64)  # n0 < end: a used entry
            # [BLOCK_N]: the step's visible keys, if its page id is bad (a where, not an `&` of a
            # scalar: the interpreter rejects that mask)
            bad_page = tl.where(col_ok, (page < 0) | (page >= num_pages), False)
            slot = n0 % PAGE_SIZE + tl.arange(0, BLOCK_N)
            k_rows = page * stride_kb + slot * stride_kn
            v_rows = page * stride_vb + slot * stride_vn
            load = dim_mask(col_ok & ~bad_page, dims, HEAD_DIM, BLOCK_D)
        k = tl.load(k_base + k_rows[:, None] + dims[None, :], mask=load, other=0.0)
        v = tl.load(v_base + v_rows[:, None] + dims[None, :], mask=load, other=0.0)
        if USE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        else:
            s = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2)
        s = s * scale
        if HAS_SOFTCAP:
            # the series near zero would spill the broadcast path's score tiles under triton 3.6
            # (sm_90a), and its ~6e-8 absolute gain in tanh is far below the output's 16-bit rounding
            s = softcap * tanh(s / softcap, EXACT_NEAR_ZERO=False)
        s = tl.where(col_ok[None, :], s * LOG2E, float("-inf"))
        if PAGE_SIZE != 0:
            s = tl.where(bad_page[None, :], float("nan"), s)
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: column n0 is visible
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        m_i = m_new

    seen = l_i != 0  # NaN (a bad page id) counts as seen: the row's NaN reaches its output
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    if SPLIT:
        part = (b * q_heads + heads) * num_splits + split
        write = member_ok & seen  # seen: the split reached some key of the row
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + dims[None, :], out,
                 mask=dim_mask(write, dims, HEAD_DIM, BLOCK_D))
        tl.store(part_lse_ptr + part, m_i + tl.log2(tl.where(seen, l_i, 1.0)), mask=write)
    else:  # a row of length 0 stores 0
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=dim_mask(member_ok, dims, HEAD_DIM, BLOCK_D))

@triton.jit
def _decode_combine_kernel(
    part_out_ptr, part_lse_ptr, lens_ptr, out_ptr, q_heads, max_len, keys_per_split, num_splits,
    stride_ob, stride_oh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One program per (batch row, query head): the splits its length reaches, each weighted
    by 2^(lse - max lse)."""
    row = tl.program_id(0).to(tl.int64)  # b * q_heads + head
    b = row // q_heads
    head = row % q_heads
    active = tl.cdiv(_row_length(lens_ptr, b, max_len), keys_per_split)
    lse_base = part_lse_ptr + row * num_splits
    dims = tl.arange(0, BLOCK_D)

    m = tl.full([], float("-inf"), tl.float32)
    for s0 in range(0, active, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        m = tl.maximum(m, tl.max(tl.load(lse_base + splits, mask=splits < active, other=float("-inf")), 0))
    total = tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, active, BLOCK_S):
        splits = s0 + tl.arange(0, BLOCK_S)
        ok = splits < active
        weight = tl.exp2(tl.load(lse_base + splits, mask=ok, other=float("-inf")) - m)
        part = tl.load(part_out_ptr + (row * num_splits + splits)[:, None] * HEAD_DIM + dims[None, :],
                       mask=dim_mask(ok, dims, HEAD_DIM, BLOCK_D), other=0.0)
        total += tl.sum(weight, 0)
        acc += tl.sum(weight[:, None] * part, 0)
    out = acc / tl.where(total > 0, total, 1.0)  # length 0: no split, output 0
    out_ptrs = out_ptr + b * stride_ob + head * stride_oh + dims
    if HEAD_DIM == BLOCK_D:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)
