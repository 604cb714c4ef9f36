"""The Triton kernels of ``unimm.kernels.attention`` (which launches them) and their jit helpers.

Imported only where triton is. What each kernel does is in ``unimm.kernels.attention``'s
docstring; what the two launches per kernel do about non-finite inputs is in "non-finite inputs"
below.
"""

import triton
import triton.language as tl

from unimm.kernels._triton import LOG2E, dim_mask, tanh


@triton.jit
def _row_intervals(start_ptr, end_ptr, rows, row_ok, num_keys):
    """The rows' intervals clamped to [0, num_keys] (empty for rows past the end), which are
    non-empty, the hull of the non-empty ones, and the range every row sees."""
    start = tl.load(start_ptr + rows, mask=row_ok, other=1)
    end = tl.load(end_ptr + rows, mask=row_ok, other=0)
    start = tl.minimum(tl.maximum(start, 0), num_keys)
    end = tl.minimum(tl.maximum(end, 0), num_keys)
    nonempty = end > start
    lo = tl.min(tl.where(nonempty, start, 2**30), 0)
    hi = tl.max(tl.where(nonempty, end, 0), 0)
    inner_lo = tl.max(tl.where(row_ok, start, 0), 0)
    inner_hi = tl.min(tl.where(row_ok, end, 2**30), 0)
    return start, end, nonempty, lo, hi, inner_lo, inner_hi


@triton.jit
def _query_program(start_ptr, end_ptr, seq_len, num_keys, heads, group, stride_mask, BLOCK_M: tl.constexpr):
    """What a (query tile, batch x head) program works on: its batch, head and kv head, its rows,
    and their intervals (see _row_intervals)."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seq_len
    start, end, nonempty, lo, hi, inner_lo, inner_hi = _row_intervals(
        start_ptr + b * stride_mask, end_ptr + b * stride_mask, rows, row_ok, num_keys)
    return bh, b, h, h // group, rows, row_ok, start, end, nonempty, lo, hi, inner_lo, inner_hi


@triton.jit
def _bad_rows(x):
    """Which rows of x [R, D] hold a NaN or an infinity."""
    finite = tl.abs(x.to(tl.float32)) < float("inf")  # False for NaN too
    return tl.min(finite.to(tl.int32), 1) == 0


@triton.jit
def _count_in(count_ptr, lo, hi, valid):
    """How many flags lie in [lo, hi) (lo < hi where ``valid``, else 0), from their running
    count (inclusive) at count_ptr."""
    upto_hi = tl.load(count_ptr + hi - 1, mask=valid, other=0)
    below_lo = tl.load(count_ptr + lo - 1, mask=valid & (lo > 0), other=0)
    return upto_hi - below_lo


@triton.jit
def _flagged_keys(counts_ptr, lo, hi, num_keys, BLOCK_N: tl.constexpr):
    """How many flagged keys the key tiles covering [lo, hi) hold."""
    tiles_lo = (lo // BLOCK_N) * BLOCK_N
    tiles_hi = tl.minimum(tl.cdiv(hi, BLOCK_N) * BLOCK_N, num_keys)
    return _count_in(counts_ptr, tiles_lo, tiles_hi, tiles_lo < tiles_hi)


@triton.jit
def _key_tile(k_base, v_base, flags_ptr, n0, num_keys, stride_ks, stride_vs, dims, BLOCK_N: tl.constexpr,
              SAFE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The key tile at n0 of a query program's walk: its columns and k, v ``[BLOCK_N, D]`` (zeros past
    the end; with SAFE, flagged k (v) rows load as zeros too: see "non-finite inputs")."""
    cols = n0 + tl.arange(0, BLOCK_N)
    load_k = cols < num_keys
    load_v = load_k
    if SAFE:
        bits = tl.load(flags_ptr + cols, mask=load_k, other=3)
        load_k &= (bits & 1) == 0
        load_v &= (bits & 2) == 0
    k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_ks + dims[None, :],
                mask=dim_mask(load_k, dims, HEAD_DIM, BLOCK_D), other=0.0)
    v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vs + dims[None, :],
                mask=dim_mask(load_v, dims, HEAD_DIM, BLOCK_D), other=0.0)
    return cols, k, v


@triton.jit
def _scores(a, b, scale, softcap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """log2-scaled scores of a [M, D] against b [N, D] (queries against keys; for dK/dV's
    transposed tiles, keys against queries), and the soft-cap's tanh (for backward)."""
    s = tl.dot(a, tl.trans(b), input_precision=PRECISION) * scale
    t = s
    if HAS_SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    return s * LOG2E, t


# ---- non-finite inputs ------------------------------------------------------------------
# The library's rule: a NaN or an infinity reaches exactly the results that depend on it.
# Inside a tile every dot sums over keys (P @ V, dS @ K) or over query rows (P^T @ dO,
# dS^T @ Q), and the pairs the mask excludes enter those sums as 0 * x: with x NaN or inf
# that is NaN, which would carry a hidden key's (a padding row's) NaN into rows (keys) that
# never see it. So no dot ever meets a non-finite entry where the mask excludes a pair, and
# what depends on a non-finite input is set to NaN afterwards, by row:
#   * _key_flags_kernel flags the keys whose k or v row is not finite, and running counts
#     of the flags tell with two loads whether a range of keys holds one: a program's key
#     range, or a row's interval;
#   * each kernel is launched twice, `SAFE=False` then `SAFE=True`, and each program does
#     its work in exactly one launch (in the other it loops over nothing and stores
#     nothing): programs whose key range (for dK/dV: query rows) holds no flagged row run the
#     unchanged loop in the first; the others run in the second, whose loop loads flagged
#     rows as zeros (a load mask from the flags). A second loop in the same kernel would
#     raise the common loop's registers and pipeline buffers; its own specialization costs
#     the common one nothing;
#   * forward: the output of a row is NaN when its interval holds a flagged key, or its q is
#     not finite (l_i starts at NaN: that survives a soft-cap, which makes infinite scores
#     finite); a row that sees nothing is 0 whatever its q;
#   * backward: _attn_bwd_prep_kernel gives each row its poison level (1: the row's q or dO
#     is not finite or its interval holds a flagged key; 2: the same, unless only values
#     were: they leave the probabilities, hence dV, finite), zeroes its delta, and
#     marks its interval (+1 at the start, -1 at the end) for a running sum over the keys;
#     dQ of a level-1 row is NaN, dK (dV) of a key that a level-1 (level-2) row sees is NaN.
#     The dK/dV kernel loads the q and dO rows that are not finite as zeros.
# Finite inputs pay the flags (a pass over K and V, and in backward over Q, dO and O, which
# also makes delta), a few loads per program, and a second launch per kernel whose programs
# only read their intervals and query rows (masking those reads too costs the loop
# registers); no tile's arithmetic changes.


@triton.jit
def _key_flags_kernel(k_ptr, v_ptr, flags_ptr, num_keys, kv_heads, stride_kb, stride_ks, stride_kh, stride_vb,
                      stride_vs, stride_vh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr):
    """int32 flags ``[B, Hkv, 3, Skv]`` per key: plane 0, bit 0 its k row holds a non-finite
    entry, bit 1 its v row does; plane 1, either does (0 / 1); plane 2, its k row does."""
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_h = bh % kv_heads
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < num_keys
    dims = tl.arange(0, BLOCK_D)
    offs = cols[:, None].to(tl.int64)
    load = dim_mask(col_ok, dims, HEAD_DIM, BLOCK_D)
    k = tl.load(k_ptr + b * stride_kb + kv_h * stride_kh + offs * stride_ks + dims[None, :], mask=load, other=0.0)
    v = tl.load(v_ptr + b * stride_vb + kv_h * stride_vh + offs * stride_vs + dims[None, :], mask=load, other=0.0)
    k_bad = _bad_rows(k)
    v_bad = _bad_rows(v)
    base = flags_ptr + bh.to(tl.int64) * 3 * num_keys + cols
    tl.store(base, k_bad.to(tl.int32) + 2 * v_bad.to(tl.int32), mask=col_ok)
    tl.store(base + num_keys, (k_bad | v_bad).to(tl.int32), mask=col_ok)
    tl.store(base + 2 * num_keys, k_bad.to(tl.int32), mask=col_ok)


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, start_ptr, end_ptr, flags_ptr, counts_ptr, seq_len, num_keys, heads,
    group, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh, stride_mask, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SAFE: tl.constexpr,
):
    bh, b, h, kv_h, rows, row_ok, start, end, nonempty, lo, hi, inner_lo, inner_hi = _query_program(
        start_ptr, end_ptr, seq_len, num_keys, heads, group, stride_mask, BLOCK_M)
    kv_bh = b * (heads // group) + kv_h
    counts_base = kv_bh * 2 * num_keys  # this kv head's running counts of flagged keys
    # this launch's program, or the other's: then it loops over nothing and stores nothing
    # (masks applied late, not an early return: either costs the loop registers)
    mine = (_flagged_keys(counts_ptr + counts_base, lo, hi, num_keys, BLOCK_N) > 0) == SAFE
    hi = tl.where(mine, hi, 0)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qs + dims[None, :],
                mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D), other=0.0)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    # a row whose own q is not finite is NaN (a soft-cap could make its scores finite): NaN in
    # l_i stays there, and costs the loop no register
    l_i = tl.where(_bad_rows(q), float("nan"), 0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):  # key tiles some row sees
        cols, k, v = _key_tile(k_base, v_base, flags_ptr + kv_bh * 3 * num_keys, n0, num_keys, stride_ks, stride_vs,
                               dims, BLOCK_N, SAFE, HEAD_DIM, BLOCK_D)
        s, _ = _scores(q, k, scale, softcap, HAS_SOFTCAP, PRECISION)
        if (n0 < inner_lo) | (n0 + BLOCK_N > inner_hi):  # not every row sees the whole tile
            visible = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    row_ok = tl.where(mine, row_ok, False)
    # a row that sees keys has l_i >= 1, or NaN when its q is not finite; one that sees nothing
    # (or is the other launch's) has acc = 0
    l_i = tl.where(nonempty & (l_i != 0), l_i, 1.0)
    out = acc / l_i[:, None]
    if SAFE:  # rows whose interval holds a flagged key (only this launch's programs have them)
        out = tl.where((_count_in(counts_ptr + counts_base, start, end, nonempty) > 0)[:, None], float("nan"),
                       out)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_os + dims[None, :],
             out.to(o_ptr.dtype.element_ty), mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D))
    lse2 = tl.where(nonempty, m_i + tl.log2(l_i), float("inf"))
    tl.store(lse_ptr + bh.to(tl.int64) * seq_len + rows, lse2, mask=row_ok)


@triton.jit
def _attn_bwd_prep_kernel(
    q_ptr, do_ptr, o_ptr, delta_ptr, row_flags_ptr, spans_ptr, start_ptr, end_ptr, counts_ptr, seq_len, num_keys,
    heads, group, stride_qb, stride_qs, stride_qh, stride_dob, stride_dos, stride_doh, stride_ob, stride_os,
    stride_oh, stride_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per query row, before the backward kernels: delta = dO . O (the softmax backward's row
    term; 0 for poisoned rows, so that it is finite), flags (bit 0: the row's q or dO is not
    finite; bits 1-2: its poison level), and the intervals of the poisoned rows as +1 at the
    start and -1 at the end, per kv head and level, for the dK/dV kernel."""
    bh, b, h, kv_h, rows, row_ok, start, end, nonempty, lo, hi, inner_lo, inner_hi = _query_program(
        start_ptr, end_ptr, seq_len, num_keys, heads, group, stride_mask, BLOCK_M)
    kv_bh = b * (heads // group) + kv_h
    dims = tl.arange(0, BLOCK_D)
    row_off = rows[:, None].to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + row_off * stride_qs + dims[None, :],
                mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D), other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + row_off * stride_dos + dims[None, :],
                 mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D), other=0.0).to(tl.float32)
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + row_off * stride_os + dims[None, :],
                mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D), other=0.0).to(tl.float32)
    own = _bad_rows(q) | _bad_rows(do)
    # poison level: 1, the row's dQ and the dK of the keys it sees are NaN; 2, their dV too
    # (the row's probabilities are affected: a non-finite q, dO or key, not just a value)
    counts = counts_ptr + kv_bh * 2 * num_keys
    level = (nonempty & (own | (_count_in(counts, start, end, nonempty) > 0))).to(tl.int32)
    level += (nonempty & (own | (_count_in(counts + num_keys, start, end, nonempty) > 0))).to(tl.int32)
    stats = bh.to(tl.int64) * seq_len + rows
    tl.store(delta_ptr + stats, tl.where(own | (level > 0), 0.0, tl.sum(do * o, 1)), mask=row_ok)
    tl.store(row_flags_ptr + stats, (own.to(tl.int32) + 2 * level).to(tl.int8), mask=row_ok)
    spans = spans_ptr + kv_bh * 2 * (num_keys + 1)
    tl.atomic_add(spans + start, 1, mask=row_ok & (level > 0))
    tl.atomic_add(spans + end, -1, mask=row_ok & (level > 0))
    tl.atomic_add(spans + num_keys + 1 + start, 1, mask=row_ok & (level > 1))
    tl.atomic_add(spans + num_keys + 1 + end, -1, mask=row_ok & (level > 1))


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, start_ptr, end_ptr, flags_ptr, counts_ptr,
    row_flags_ptr, seq_len, num_keys, heads, group,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh, stride_mask, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SAFE: tl.constexpr,
):
    bh, b, h, kv_h, rows, row_ok, start, end, nonempty, lo, hi, inner_lo, inner_hi = _query_program(
        start_ptr, end_ptr, seq_len, num_keys, heads, group, stride_mask, BLOCK_M)
    kv_bh = b * (heads // group) + kv_h
    counts_base = kv_bh * 2 * num_keys
    mine = (_flagged_keys(counts_ptr + counts_base, lo, hi, num_keys, BLOCK_N) > 0) == SAFE
    hi = tl.where(mine, hi, 0)  # the other launch's program: no loop, no store (masks applied late)
    dims = tl.arange(0, BLOCK_D)
    row_off = rows[:, None].to(tl.int64)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + row_off * stride_qs + dims[None, :],
                mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D), other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + row_off * stride_dos + dims[None, :],
                 mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D), other=0.0)
    stats = bh.to(tl.int64) * seq_len + rows
    lse2 = tl.load(lse_ptr + stats, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_ptr + stats, mask=row_ok, other=0.0)
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols, k, v = _key_tile(k_base, v_base, flags_ptr + kv_bh * 3 * num_keys, n0, num_keys, stride_ks, stride_vs,
                               dims, BLOCK_N, SAFE, HEAD_DIM, BLOCK_D)
        s, t = _scores(q, k, scale, softcap, HAS_SOFTCAP, PRECISION)
        p = tl.exp2(s - lse2[:, None])
        if (n0 < inner_lo) | (n0 + BLOCK_N > inner_hi):
            visible = (cols[None, :] >= start[:, None]) & (cols[None, :] < end[:, None])
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    row_ok = tl.where(mine, row_ok, False)
    # poisoned rows: NaN; a row that sees nothing passes no gradient, even with a non-finite q or dO
    poisoned = (tl.load(row_flags_ptr + stats, mask=row_ok, other=0) >> 1) > 0
    dq = tl.where(poisoned[:, None], float("nan"), tl.where(nonempty[:, None], dq * scale, 0.0))
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + row_off * stride_dqs + dims[None, :],
             dq.to(dq_ptr.dtype.element_ty), mask=dim_mask(row_ok, dims, HEAD_DIM, BLOCK_D))


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, start_ptr, end_ptr, first_ptr, last_ptr,
    flags_ptr, row_flags_ptr, row_counts_ptr, seen_ptr, seq_len, num_keys, heads, kv_heads, group,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    stride_mask, stride_tiles, scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SAFE: tl.constexpr, OUT_D: tl.constexpr,
):
    # OUT_D < BLOCK_D: the program writes dims [d0, d0 + OUT_D) of its keys' dK and dV (program
    # axis 0: key tile x slice). Its scores and dP still take the whole head dim; the slice keeps
    # its two fp32 accumulators at OUT_D columns (see attention._config).
    pid_n = tl.program_id(0) // (BLOCK_D // OUT_D)
    bh = tl.program_id(1)
    b = (bh // kv_heads).to(tl.int64)
    kv_h = bh % kv_heads
    first = tl.load(first_ptr + b * stride_tiles + pid_n)
    last = tl.load(last_ptr + b * stride_tiles + pid_n)
    rows_lo = first * BLOCK_M
    rows_hi = tl.minimum(last * BLOCK_M, seq_len)
    flagged = 0  # query rows of this range, over the group's heads, whose q or dO is not finite
    for g in range(0, group):
        flagged += _count_in(row_counts_ptr + (b * heads + kv_h * group + g) * seq_len, rows_lo, rows_hi,
                             rows_lo < rows_hi)
    mine = (flagged > 0) == SAFE  # else the other launch's program: it loads and stores nothing
    last = tl.where(mine, last, first)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = tl.where(mine, cols < num_keys, False)
    dims = tl.arange(0, BLOCK_D)
    col_off = cols[:, None].to(tl.int64)
    # this program's keys, flagged ones as zeros (their dK and dV: NaN where seen, else 0)
    bits = tl.load(flags_ptr + bh.to(tl.int64) * 3 * num_keys + cols, mask=col_ok, other=3)
    k = tl.load(k_ptr + b * stride_kb + kv_h * stride_kh + col_off * stride_ks + dims[None, :],
                mask=dim_mask(col_ok & ((bits & 1) == 0), dims, HEAD_DIM, BLOCK_D), other=0.0)
    v = tl.load(v_ptr + b * stride_vb + kv_h * stride_vh + col_off * stride_vs + dims[None, :],
                mask=dim_mask(col_ok & ((bits & 2) == 0), dims, HEAD_DIM, BLOCK_D), other=0.0)
    tile_lo = pid_n * BLOCK_N
    out_dims = dims
    if OUT_D != BLOCK_D:
        out_dims = (tl.program_id(0) % (BLOCK_D // OUT_D)) * OUT_D + tl.arange(0, OUT_D)

    dk = tl.zeros([BLOCK_N, OUT_D], tl.float32)
    dv = tl.zeros([BLOCK_N, OUT_D], tl.float32)
    # every query head that reads this kv head (g) x the query tiles whose rows may see this key
    # tile (m), as one loop: one pipeline across the group's heads, and fewer registers than nested
    # loops (the safe launch's loop is not pipelined: beside its row flags, pipeline buffers spill
    # fp32 tiles on sm_80)
    tiles = last - first
    for i in tl.range(0, group * tiles, num_stages=1 if SAFE else None):
        g = i // tiles
        m = first + i % tiles
        h = kv_h * group + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        stats = (b * heads + h) * seq_len
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < seq_len
        start, end, nonempty, lo, hi, inner_lo, inner_hi = _row_intervals(
            start_ptr + b * stride_mask, end_ptr + b * stride_mask, rows, row_ok, num_keys)
        row_load = row_ok
        if SAFE:  # rows whose q or dO is not finite load as zeros
            row_load &= (tl.load(row_flags_ptr + stats + rows, mask=row_ok, other=1) & 1) == 0
        row_off = rows[:, None].to(tl.int64)
        load = dim_mask(row_load, dims, HEAD_DIM, BLOCK_D)
        q = tl.load(q_base + row_off * stride_qs + dims[None, :], mask=load, other=0.0)
        do = tl.load(do_base + row_off * stride_dos + dims[None, :], mask=load, other=0.0)
        q_out, do_out = q, do
        if OUT_D != BLOCK_D:  # the slice's columns, for dK and dV (a power-of-two head dim: no padding)
            q_out = tl.load(q_base + row_off * stride_qs + out_dims[None, :], mask=row_load[:, None], other=0.0)
            do_out = tl.load(do_base + row_off * stride_dos + out_dims[None, :], mask=row_load[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + stats + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptr + stats + rows, mask=row_ok, other=0.0)
        # transposed tiles, [keys, rows]: the keys are the M of all four dots, and wgmma
        # takes M in 64-row warpgroup slices
        s, t = _scores(k, q, scale, softcap, HAS_SOFTCAP, PRECISION)
        p = tl.exp2(s - lse2[None, :])
        if (tile_lo < inner_lo) | (tile_lo + BLOCK_N > inner_hi):
            visible = (cols[:, None] >= start[None, :]) & (cols[:, None] < end[None, :])
            p = tl.where(visible, p, 0.0)
        dv = tl.dot(p.to(do.dtype), do_out, dv, input_precision=PRECISION)
        dp = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds = p * (dp - delta[None, :])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dk = tl.dot(ds.to(q.dtype), q_out, dk, input_precision=PRECISION)
    # keys a poisoned row sees (running sums of the dQ kernel's interval marks), per level
    seen = seen_ptr + bh.to(tl.int64) * 2 * (num_keys + 1) + cols
    dk_nan = tl.load(seen, mask=col_ok, other=0) > 0
    dv_nan = tl.load(seen + num_keys + 1, mask=col_ok, other=0) > 0
    tl.store(dk_ptr + b * stride_dkb + kv_h * stride_dkh + col_off * stride_dks + out_dims[None, :],
             tl.where(dk_nan[:, None], float("nan"), dk * scale).to(dk_ptr.dtype.element_ty),
             mask=dim_mask(col_ok, out_dims, HEAD_DIM, BLOCK_D))
    tl.store(dv_ptr + b * stride_dvb + kv_h * stride_dvh + col_off * stride_dvs + out_dims[None, :],
             tl.where(dv_nan[:, None], float("nan"), dv).to(dv_ptr.dtype.element_ty),
             mask=dim_mask(col_ok, out_dims, HEAD_DIM, BLOCK_D))
