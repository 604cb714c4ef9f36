"""The Triton kernel of ``unimm.kernels.sampling`` (which launches it) and its jit helpers.

Imported only where triton is. It follows ``unimm.kernels.reference.sampling`` rule by rule, with
the same integer weights, so equal uniforms give equal tokens (up to ``exp`` rounding on a GPU).

One program serves ``BLOCK_R`` output rows and walks their vocab block in ``BLOCK_V`` tiles, each
pass re-reading the logits and recomputing ``g``, ``z`` and the weights (nothing V-sized is
written). The thresholds are found by search, not sort: the order-preserving key of ``z`` (the
bits of ``-z``, an integer in [0, 0x7F800000] that grows as ``z`` falls) is located four bits
per pass, each pass counting (top-k) or weighing (top-p) the tokens at or below 16 candidate keys
at once. Passes per row: the max (1); greedy: the first maximum (1); else top-k (8), top-p (8,
whose first pass also yields the top-k survivors' total), the survivors' total (1, without
top-p: with it the last top-p pass yields it), and the inverse-CDF draw (1, an in-tile prefix
sum carried across tiles). Cost model: ``passes * n * (1 or 2 with CFG) * bytes per logit`` read
per row, from L2 after the first pass for vocabularies of a few 100k: about 19 reads of the row
for top-k with top-p, 3 for plain temperature sampling, 2 for greedy; with one row per program
and a handful of rows (batch 1-2 with CFG) it is bound by one SM's L2 bandwidth, which makes it a
fallback for installs without the CUDA extension rather than the fast path.

Exactness: the guidance ``u + s * (c - u)`` must round twice like the reference, so the launch
turns off fp contraction (``enable_fp_fusion=False``); ``round(p * 2**40)`` rounds half to even
by the fp64 add-and-subtract of 2**52; ``top_p`` arrives as three fp32 parts whose fp64 sum is
the Python float exactly (a scalar float argument would be rounded to fp32).
"""

import triton
import triton.language as tl

FIXED_POINT_SCALE = tl.constexpr(2.0**40)  # reference.FIXED_POINT_BITS
ROUND_MAGIC = tl.constexpr(2.0**52)  # x + 2**52 - 2**52 rounds x in [0, 2**52) half to even
KEY_NONE = tl.constexpr(2**40)  # above every key and every threshold the searches test (< 2**33)


@triton.jit
def _guided_tile(logits_ptr, cond_rows, uncond_rows, row_ok, start, n, cfg_scale,
                 CFG: tl.constexpr, BLOCK_V: tl.constexpr):
    """Rule 1 on one tile: ``g`` fp32 ``[BLOCK_R, BLOCK_V]`` (NaN outside the block: no candidate)
    and the in-block column mask."""
    cols = start + tl.arange(0, BLOCK_V)
    inside = row_ok[:, None] & (cols < n)[None, :]
    c = tl.load(logits_ptr + cond_rows[:, None] + cols[None, :], mask=inside, other=float("nan")).to(tl.float32)
    g = c
    if CFG:
        u = tl.load(logits_ptr + uncond_rows[:, None] + cols[None, :], mask=inside,
                    other=float("nan")).to(tl.float32)
        g = tl.where(c == u, c, u + cfg_scale * (c - u))
    return g, cols, inside


@triton.jit
def _key_weight(g, top, inv_t):
    """Rule 5: the candidate mask, the int64 key of ``z`` (KEY_NONE for non-candidates) and the
    int64 weight ``round(p * 2**40)`` (0 for non-candidates)."""
    candidate = g == g
    z = tl.where(g == top, 0.0, (g - top) * inv_t)
    z = tl.where(candidate, z, float("-inf"))  # weight 0, and no NaN to convert to an integer
    # -z >= 0, so its bits order like its value; z == 0 maps to key 0 whatever its sign bit
    key = tl.where(z == 0, 0, (-z).to(tl.int32, bitcast=True)).to(tl.int64)
    key = tl.where(candidate, key, KEY_NONE)
    p = tl.where(z == 0, 1.0, tl.exp(z))
    scaled = p.to(tl.float64) * FIXED_POINT_SCALE
    q = ((scaled + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int64)
    return candidate, key, q


@triton.jit
def _sample_tokens_kernel(logits_ptr, uniforms_ptr, tokens_ptr, rows_out, n, lo, row_stride, cfg_scale, inv_t,
                          top_k, top_p_hi, top_p_mid, top_p_lo,
                          CFG: tl.constexpr, GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < rows_out
    logits_ptr += lo
    cond_rows = rows.to(tl.int64) * row_stride
    uncond_rows = (rows + rows_out).to(tl.int64) * row_stride

    # the row max of the candidates and their count (rule 3: no candidate -> -1)
    top = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    candidates = tl.zeros((BLOCK_R,), tl.int32)
    for start in range(0, n, BLOCK_V):
        g, cols, inside = _guided_tile(logits_ptr, cond_rows, uncond_rows, row_ok, start, n, cfg_scale,
                                       CFG, BLOCK_V)
        top = tl.maximum(top, tl.max(tl.where(g == g, g, float("-inf")), 1))
        candidates += tl.sum((g == g).to(tl.int32), 1)

    if GREEDY:  # rule 4: the first candidate equal to the max (-inf rows: the first candidate)
        best = tl.full((BLOCK_R,), 2**31 - 1, tl.int32)
        for start in range(0, n, BLOCK_V):
            g, cols, inside = _guided_tile(logits_ptr, cond_rows, uncond_rows, row_ok, start, n, cfg_scale,
                                           CFG, BLOCK_V)
            best = tl.minimum(best, tl.min(tl.where(g == top[:, None], cols[None, :], 2**31 - 1), 1))
        token = lo + best.to(tl.int64)
    else:
        digits = tl.arange(0, 16).to(tl.int64)
        top_k_key = tl.full((BLOCK_R,), KEY_NONE, tl.int64)
        if TOP_K:  # rule 6: the smallest key with at least top_k candidates at or below it
            prefix = tl.zeros((BLOCK_R,), tl.int64)
            for level in tl.static_range(8):
                thresholds = prefix[:, None] + ((digits[None, :] + 1) << (28 - 4 * level)) - 1
                counts = tl.zeros((BLOCK_R, 16), tl.int64)
                for start in range(0, n, BLOCK_V):
                    g, cols, inside = _guided_tile(logits_ptr, cond_rows, uncond_rows, row_ok, start, n,
                                                   cfg_scale, CFG, BLOCK_V)
                    candidate, key, q = _key_weight(g, top[:, None], inv_t)
                    counts += tl.sum((key[:, :, None] <= thresholds[:, None, :]).to(tl.int64), 1)
                # past the last level a row with fewer than top_k candidates keeps them all
                prefix += tl.sum((counts < top_k).to(tl.int64), 1) << (28 - 4 * level)
            top_k_key = prefix
        if TOP_P:  # rule 7: the smallest key whose survivors at or below it weigh >= need
            top_p = tl.cast(top_p_hi, tl.float64) + tl.cast(top_p_mid, tl.float64) + tl.cast(top_p_lo, tl.float64)
            prefix = tl.zeros((BLOCK_R,), tl.int64)
            need = tl.zeros((BLOCK_R,), tl.int64)
            for level in tl.static_range(8):
                thresholds = prefix[:, None] + ((digits[None, :] + 1) << (28 - 4 * level)) - 1
                weights = tl.zeros((BLOCK_R, 16), tl.int64)
                for start in range(0, n, BLOCK_V):
                    g, cols, inside = _guided_tile(logits_ptr, cond_rows, uncond_rows, row_ok, start, n,
                                                   cfg_scale, CFG, BLOCK_V)
                    candidate, key, q = _key_weight(g, top[:, None], inv_t)
                    q = tl.where(key <= top_k_key[:, None], q, 0)
                    below = key[:, :, None] <= thresholds[:, None, :]
                    weights += tl.sum(tl.where(below, q[:, :, None], 0), 1)
                if level == 0:  # the last threshold, 2**32 - 1, holds every top-k survivor
                    kept = tl.sum(tl.where(digits[None, :] == 15, weights, 0), 1)
                    need = tl.ceil(top_p * kept.to(tl.float64)).to(tl.int64)
                    need = tl.minimum(tl.maximum(need, 1), kept)
                digit = tl.sum((weights < need[:, None]).to(tl.int64), 1)
                prefix += digit << (28 - 4 * level)
            # the last level's thresholds are prefix + digit: the survivors' total is at `digit`
            total = tl.sum(tl.where(digits[None, :] == digit[:, None], weights, 0), 1)
            keep_key = prefix
        else:
            total = tl.zeros((BLOCK_R,), tl.int64)
            for start in range(0, n, BLOCK_V):
                g, cols, inside = _guided_tile(logits_ptr, cond_rows, uncond_rows, row_ok, start, n, cfg_scale,
                                               CFG, BLOCK_V)
                candidate, key, q = _key_weight(g, top[:, None], inv_t)
                total += tl.sum(tl.where(key <= top_k_key[:, None], q, 0), 1)
            keep_key = top_k_key
        # rule 8: the first survivor whose running weight exceeds the target
        uniform = tl.load(uniforms_ptr + rows, mask=row_ok, other=0.0)
        target = tl.floor(uniform.to(tl.float64) * total.to(tl.float64)).to(tl.int64)
        target = tl.minimum(target, total - 1)
        carry = tl.zeros((BLOCK_R,), tl.int64)
        before = tl.zeros((BLOCK_R,), tl.int64)
        for start in range(0, n, BLOCK_V):
            g, cols, inside = _guided_tile(logits_ptr, cond_rows, uncond_rows, row_ok, start, n, cfg_scale,
                                           CFG, BLOCK_V)
            candidate, key, q = _key_weight(g, top[:, None], inv_t)
            q = tl.where(key <= keep_key[:, None], q, 0)
            running = tl.cumsum(q, 1) + carry[:, None]
            before += tl.sum(((running <= target[:, None]) & inside).to(tl.int64), 1)
            carry += tl.sum(q, 1)
        token = lo + before
    tl.store(tokens_ptr + rows, tl.where(candidates > 0, token, -1), mask=row_ok)
