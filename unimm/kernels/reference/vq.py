"""The meaning of the VQ kernels, in plain PyTorch (fp64).

``vq_quantize``: for every row of ``z [..., d]`` the index of the nearest row of
``codebook [K, d]`` by squared L2 distance; with ``metric="cosine"`` both sides are first
L2-normalised (``x / max(||x||, 1e-12)``, as ``F.normalize``), so the distance is
``|z_n|^2 + |e_n|^2 - 2 z.e / (max(|z|, eps) max(|e|, eps))`` with ``|x_n|^2 = 1`` for any
vector of norm >= eps. Ties go to the lowest index. ``vq_lookup``: ``codebook[indices]``.

Non-finite values (the library's rule: NaN / Inf propagate to exactly the outputs that depend on
them; an index cannot hold NaN, so it is defined here). A row or a code that holds NaN or +-Inf
has no finite distance to anything: such a code is never returned, and a row with no code at a
finite distance (a row holding NaN or Inf, or any row when every code holds one) gets index -1.
``vq_lookup`` of -1, or of any index outside ``[0, K)``, is a NaN vector, so a non-finite row of
``z`` comes back from quantize-then-lookup as NaN.

Distances are evaluated element by element in fp64 (no matmul, whose blocking may round two
equal columns differently), so equal codes, and codes equally far by exact arithmetic on small
integers, give bit-equal distances. fp64 has the range for every float16 / bfloat16 / float32
input; float64 inputs are first scaled by powers of two (exact; see ``_fp64_scales``) so that no
finite input loses its nearest code to overflow. Rows and codes are taken in bounded chunks with
a running minimum over code chunks, so the reference also serves as the CPU fallback at real
sizes.
"""

from __future__ import annotations

import math

import torch

METRICS = ("l2", "cosine")
NORMALIZE_EPS = 1e-12
_CHUNK_ELEMENTS = 1 << 22  # fp64 products held at once: 32 MiB
_FP64_EXPONENTS = (-1000, 1000)  # scales 2**-e of float64 inputs stay normal numbers


def unit_norm_squared(norm: torch.Tensor) -> torch.Tensor:
    """``|x / max(|x|, eps)|^2`` from ``|x|``: exactly 1 unless the vector is shorter than eps."""
    return torch.where(norm >= NORMALIZE_EPS, torch.ones_like(norm), (norm / NORMALIZE_EPS).square())


def pow2(exponent: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2 ** exponent`` exactly, built from its bits (``exponent`` int, within the normal range of
    ``dtype``: float32 [-126, 127], float64 [-1022, 1023])."""
    if dtype == torch.float32:
        return ((exponent.to(torch.int32) + 127) << 23).view(torch.float32)
    if dtype == torch.float64:
        return ((exponent.to(torch.int64) + 1023) << 52).view(torch.float64)
    raise TypeError(f"pow2 builds float32 or float64, not {dtype}")


def max_exponents(x: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x [..., d]``: (int32 ``e`` with ``max|x| = m 2**e``, ``m`` in [0.5, 1) — ``low``
    for an all-zero or non-finite row — clamped to [low, high]; whether the row is all finite).
    No host synchronisation."""
    amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1)  # NaN propagates
    if amax.dtype != torch.float64:
        amax = amax.float()
    finite = amax.isfinite()
    exponent = torch.frexp(amax).exponent
    exponent = torch.where(finite & (amax > 0), exponent, low).clamp(low, high)
    return exponent, finite


def pair_distances(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance between broadcastable fp64 vectors ``a [..., d]`` and ``b [..., d]`` -> ``[...]``."""
    if metric == "l2":
        return (a - b).square().sum(-1)
    a_norm, b_norm = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (a_norm.clamp_min(NORMALIZE_EPS) * b_norm.clamp_min(NORMALIZE_EPS))
    return unit_norm_squared(a_norm) + unit_norm_squared(b_norm) - 2.0 * cos


def _distances(z: torch.Tensor, codes: torch.Tensor, metric: str,
               row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp64 ``[n, k]`` distances of z rows ``[n, d]`` to ``codes [k, d]``, both fp64. ``row_scale``
    ``[n]`` (l2 only): each row and, for that row, every code are multiplied by it first."""
    if row_scale is None:
        return pair_distances(z[:, None, :], codes[None, :, :], metric)
    scale = row_scale[:, None, None]
    return pair_distances(z[:, None, :] * scale, codes[None, :, :] * scale, metric)


def vq_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """All distances ``[N, K]`` in fp64 (rows of ``z`` flattened). Materialised: tests only."""
    return _distances(z.reshape(-1, z.shape[-1]).double(), codebook.double(), metric)


def nearest_scale_exponents(row_exp: torch.Tensor, code_exp: torch.Tensor, code_finite: torch.Tensor,
                            high: int) -> torch.Tensor:
    """Per row, the exponent ``m_n = max(e_n, e_min)`` of the scale ``2**-m_n`` under which row n
    and its nearest code are both O(1): ``e_min`` is the smallest exponent of a finite code (the
    nearest code is no farther than the smallest one, so it is at most a few times ``2**m_n``).
    Codes far larger than that may overflow to an infinite distance: they are not the nearest."""
    return torch.maximum(row_exp, torch.where(code_finite, code_exp, high).min())


def _fp64_scales(zf: torch.Tensor, cf: torch.Tensor, metric: str):
    """Powers of two that keep float64 inputs in range: (z rows, codes, per-row l2 scale or None)."""
    low, high = _FP64_EXPONENTS
    row_exp, _ = max_exponents(zf, low, high)
    code_exp, code_finite = max_exponents(cf, low, high)
    if metric == "cosine":
        # cos is the same for any positive scale of either side, and |x| >= eps stays true for
        # vectors scaled down from max|x| >= 1: only those are scaled (to max|x| in [0.5, 1)).
        def shrink(x, exponent):
            return x * pow2(-exponent.clamp_min(0), torch.float64)[:, None]
        return shrink(zf, row_exp), shrink(cf, code_exp), None
    # l2: row n and, for it, every code are scaled by 2**-m_n
    return zf, cf, pow2(-nearest_scale_exponents(row_exp, code_exp, code_finite, high), torch.float64)


def vq_quantize(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    lead_shape = z.shape[:-1]
    zf = z.reshape(-1, z.shape[-1]).double()
    cf = codebook.double()
    row_scale = None
    if z.dtype == torch.float64 and zf.numel() and cf.numel():
        zf, cf, row_scale = _fp64_scales(zf, cf, metric)
    n, d = zf.shape
    k = cf.shape[0]
    codes_per_chunk = max(1, min(k, _CHUNK_ELEMENTS // d))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (codes_per_chunk * d))
    best_dist = torch.full((n,), float("inf"), dtype=torch.float64, device=z.device)
    best_idx = torch.full((n,), -1, dtype=torch.int64, device=z.device)
    for c0 in range(0, k, codes_per_chunk):
        codes = cf[c0:c0 + codes_per_chunk]
        for r0 in range(0, n, rows_per_chunk):
            rows = slice(r0, r0 + rows_per_chunk)
            dist = _distances(zf[rows], codes, metric, None if row_scale is None else row_scale[rows])
            dist = dist.masked_fill(dist.isnan(), float("inf"))  # no finite distance: never chosen
            idx = dist.argmin(-1)  # first minimum: lowest index on ties within the chunk
            value = dist.gather(-1, idx[:, None]).squeeze(-1)
            better = value < best_dist[rows]  # strict: earlier chunks keep ties; inf never wins
            best_dist[rows] = torch.where(better, value, best_dist[rows])
            best_idx[rows] = torch.where(better, idx + c0, best_idx[rows])
    return best_idx.reshape(lead_shape)


def vq_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    num_codes = codebook.shape[0]
    valid = (indices >= 0) & (indices < num_codes)
    if num_codes == 0:
        return codebook.new_full((*indices.shape, codebook.shape[1]), float("nan"))
    vectors = codebook[indices.long().clamp(0, num_codes - 1)]
    return vectors.masked_fill(~valid[..., None], float("nan"))
