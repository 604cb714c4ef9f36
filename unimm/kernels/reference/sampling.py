"""The meaning of ``sample_tokens``, in plain PyTorch: every rule the CUDA kernel follows, step by step.

Given logits ``[R, V]`` and one uniform ``u`` in [0, 1) per output row:

1. Guidance (``cfg_scale = s``): rows are ``[cond; uncond]`` halves; per token, in fp32,
   ``g = c if c == u else u + s * (c - u)`` (each operation rounded; the ``c == u`` case is the
   formula's own value for finite logits, and keeps a token masked with -inf in both halves at
   -inf instead of NaN; a result past fp32's range is +-inf). Without guidance ``g`` is the row
   in fp32.
2. ``vocab_range = (lo, hi)``: only columns ``[lo, hi)`` take part; returned ids are absolute.
3. NaN ``g`` (a NaN logit in either half, or guidance of opposite infinities) is not a candidate:
   such a token is never returned and takes no part in any rule below. A row with no candidate
   (all NaN) returns -1. Nothing is checked on the host (no device synchronisation).
4. ``temperature == 0``: the candidate with the largest ``g``, lowest index on ties; no uniform
   is used.
5. Otherwise, with ``m`` the largest candidate ``g`` and ``inv_t = float32(1 / temperature)``,
   ``z = 0 if g == m else (g - m) * inv_t`` (two fp32 operations). Subtracting the maximum
   first means neither a huge logit nor a tiny temperature overflows: ``z`` lies in [-inf, 0], is
   0 exactly at the maximum, and is -inf only for tokens whose weight is 0 anyway (the ordering of
   ``g`` is kept). Each candidate's weight is ``p = 1 if z == 0 else exp(z)`` in fp32 (so +inf
   logits share all the mass, and a row of -inf only is uniform), held as the integer
   ``q = round(p * 2**FIXED_POINT_BITS)``. Integer weights make every sum exact, so totals do not
   depend on summation order: the kernel's parallel sums and this reference's agree to the bit.
6. top-k: candidates with ``z`` below the k-th largest candidate value drop out (ties with it
   stay; fewer than k candidates: all stay).
7. top-p (nucleus): among the top-k survivors, ``need = clamp(ceil(top_p * Q1), 1, Q1)`` with
   ``Q1`` their total weight (the product in float64); keep every token whose value is at least
   the largest ``t`` such that the tokens with value ``>= t`` weigh ``>= need``. That is the
   smallest set of highest-probability tokens holding mass ``top_p``, with ties at its edge kept.
8. Draw: ``Q2`` = total weight of the survivors, ``target = min(floor(u * Q2), Q2 - 1)`` (float64
   product), and the token is the first survivor in increasing index order whose running weight
   exceeds ``target`` (inverse CDF).

The CUDA kernel and this reference can disagree only where ``exp`` rounds differently on the
two devices (a unit in the last place of one weight), which moves a boundary by far less than one
token's weight: a mismatch needs ``u`` within ~1e-7 of a CDF edge.
"""

from __future__ import annotations

import math
import struct

import torch

FIXED_POINT_BITS = 40  # p in [0, 1] -> integer q in [0, 2**40]: exact for p >= 2**-16, 0 below 2**-41
MAX_BLOCK = 1 << 23  # vocab block size limit: the integer weights of a row then sum below 2**63


def to_float32(value: float) -> float:
    """``value`` rounded to the nearest fp32 number, as a Python float; inf when that overflows."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def inverse_temperature(temperature: float) -> float:
    """``float32(1 / temperature)`` (round to nearest) as a Python float; inf when that overflows."""
    return to_float32(1.0 / temperature)


def guided_logits(logits: torch.Tensor, *, vocab_range: tuple[int, int] | None = None,
                  cfg_scale: float | None = None) -> torch.Tensor:
    """Steps 1-2: fp32 ``[rows_out, hi - lo]`` guided logits of the block (NaN: not a candidate)."""
    lo, hi = (0, logits.shape[1]) if vocab_range is None else vocab_range
    block = logits[:, lo:hi].float()
    if cfg_scale is not None:
        half = block.shape[0] // 2
        cond, uncond = block[:half], block[half:]
        scale = torch.tensor(cfg_scale, dtype=torch.float32, device=block.device)
        block = torch.where(cond == uncond, cond, uncond + scale * (cond - uncond))
    return block


def tempered_logits(g: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """Step 5's ``z``: ``0 if g == m else (g - m) * inv_t`` in fp32, ``m`` the row's largest
    non-NaN ``g``; NaN ``g`` gives NaN."""
    top = g.masked_fill(g.isnan(), float("-inf")).max(-1, keepdim=True).values
    inv_t = torch.tensor(inv_temperature, dtype=torch.float32, device=g.device)
    return torch.where(g == top, torch.zeros_like(g), (g - top) * inv_t)


def fixed_point_weights(z: torch.Tensor) -> torch.Tensor:
    """Step 5: int64 ``q = round(p * 2**40)`` with ``p = 1 if z == 0 else exp(z)`` (``z <= 0``, its
    row maximum 0); NaN ``z`` weighs 0."""
    p = torch.where(z == 0, torch.ones_like(z), torch.exp(z)).nan_to_num(nan=0.0)
    return torch.round(p.double() * 2.0**FIXED_POINT_BITS).long()


def nucleus_need(top_p: float, total: torch.Tensor) -> torch.Tensor:
    """Step 7: ``clamp(ceil(top_p * total), 1, total)`` per row, the product in float64."""
    return torch.minimum(torch.ceil(top_p * total.double()).long().clamp_min(1), total)


def sample_tokens(logits: torch.Tensor, uniforms: torch.Tensor | None, *, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, vocab_range: tuple[int, int] | None = None,
                  cfg_scale: float | None = None) -> torch.Tensor:
    """int64 ``[rows_out]`` absolute token ids (-1: no candidate); ``uniforms`` fp32 ``[rows_out]``
    (unused when greedy)."""
    lo = 0 if vocab_range is None else vocab_range[0]
    g = guided_logits(logits, vocab_range=vocab_range, cfg_scale=cfg_scale)
    candidate = ~g.isnan()
    any_candidate = candidate.any(-1)
    if temperature == 0:
        masked = g.masked_fill(~candidate, float("-inf"))
        best = masked.argmax(-1)  # first maximum: lowest index on ties
        # a row whose candidates are all -inf: its first candidate, not a NaN before it
        best = torch.where(masked.max(-1).values == float("-inf"), candidate.byte().argmax(-1), best)
        return torch.where(any_candidate, lo + best, -1)
    z = tempered_logits(g, inverse_temperature(temperature))
    q = fixed_point_weights(z)
    keep = candidate.clone()
    ranked = z.masked_fill(~candidate, float("-inf"))  # non-candidates rank last and stay out via keep
    if top_k is not None and top_k < z.shape[1]:
        kth = ranked.topk(top_k, dim=-1).values[:, -1:]
        keep &= ranked >= kth
    if top_p is not None and top_p < 1:
        kept = q * keep
        need = nucleus_need(top_p, kept.sum(-1))
        values, order = ranked.masked_fill(~keep, float("-inf")).sort(-1, descending=True)
        running = kept.gather(-1, order).cumsum(-1)
        edge = (running < need[:, None]).sum(-1, keepdim=True).clamp_max(z.shape[1] - 1)
        keep &= ranked >= values.gather(-1, edge)
    running = (q * keep).cumsum(-1)
    total = running[:, -1]
    target = torch.minimum((uniforms.double() * total.double()).floor().long(), total - 1)
    return torch.where(any_candidate, lo + (running <= target[:, None]).sum(-1), -1)
