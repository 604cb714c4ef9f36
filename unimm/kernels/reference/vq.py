"""The meaning of the VQ kernels, in plain PyTorch (fp64).

``vq_quantize``: for every row of ``z [..., d]`` the index of the nearest row of
``codebook [K, d]`` by squared L2 distance; with ``metric="cosine"`` both sides are first
L2-normalised (``x / max(||x||, 1e-12)``, as ``F.normalize``), so the distance is
``|z_n|^2 + |e_n|^2 - 2 z.e / (max(|z|, eps) max(|e|, eps))`` with ``|x_n|^2 = 1`` for any
vector of norm >= eps. Ties go to the lowest index. ``vq_lookup``: ``codebook[indices]``.

Distances are evaluated element by element in fp64 (no matmul, whose blocking may round two
equal columns differently), so equal codes, and codes equally far by exact arithmetic on small
integers, give bit-equal distances. Rows and codes are taken in bounded chunks with a running
minimum over code chunks, so the reference also serves as the CPU fallback at real sizes.
"""

from __future__ import annotations

import torch

METRICS = ("l2", "cosine")
NORMALIZE_EPS = 1e-12
_CHUNK_ELEMENTS = 1 << 22  # fp64 products held at once: 32 MiB


def unit_norm_squared(norm: torch.Tensor) -> torch.Tensor:
    """``|x / max(|x|, eps)|^2`` from ``|x|``: exactly 1 unless the vector is shorter than eps."""
    return torch.where(norm >= NORMALIZE_EPS, torch.ones_like(norm), (norm / NORMALIZE_EPS).square())


def pair_distances(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Distance between broadcastable fp64 vectors ``a [..., d]`` and ``b [..., d]`` -> ``[...]``."""
    if metric == "l2":
        return (a - b).square().sum(-1)
    a_norm, b_norm = a.norm(dim=-1), b.norm(dim=-1)
    cos = (a * b).sum(-1) / (a_norm.clamp_min(NORMALIZE_EPS) * b_norm.clamp_min(NORMALIZE_EPS))
    return unit_norm_squared(a_norm) + unit_norm_squared(b_norm) - 2.0 * cos


def _distances(z: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """fp64 ``[n, k]`` distances of z rows ``[n, d]`` to ``codes [k, d]``, both fp64."""
    return pair_distances(z[:, None, :], codes[None, :, :], metric)


def vq_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """All distances ``[N, K]`` in fp64 (rows of ``z`` flattened). Materialised: tests only."""
    return _distances(z.reshape(-1, z.shape[-1]).double(), codebook.double(), metric)


def vq_quantize(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    lead_shape = z.shape[:-1]
    zf = z.reshape(-1, z.shape[-1]).double()
    cf = codebook.double()
    n, d = zf.shape
    k = cf.shape[0]
    codes_per_chunk = max(1, min(k, _CHUNK_ELEMENTS // d))
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // (codes_per_chunk * d))
    best_dist = torch.full((n,), float("inf"), dtype=torch.float64, device=z.device)
    best_idx = torch.zeros(n, dtype=torch.int64, device=z.device)
    for c0 in range(0, k, codes_per_chunk):
        codes = cf[c0:c0 + codes_per_chunk]
        for r0 in range(0, n, rows_per_chunk):
            rows = slice(r0, r0 + rows_per_chunk)
            dist = _distances(zf[rows], codes, metric)
            idx = dist.argmin(-1)  # first minimum: lowest index on ties within the chunk
            value = dist.gather(-1, idx[:, None]).squeeze(-1)
            better = value < best_dist[rows]  # strict: earlier chunks keep ties
            best_dist[rows] = torch.where(better, value, best_dist[rows])
            best_idx[rows] = torch.where(better, idx + c0, best_idx[rows])
    return best_idx.reshape(lead_shape)


def vq_lookup(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook[indices]
