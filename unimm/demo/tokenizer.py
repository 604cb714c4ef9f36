"""The demo's image tokenizers: an image is a grid of non-overlapping square patches.

With 4 x 4 patches a 32 x 32 RGB image is 8 x 8 = 64 tokens of 48 numbers each.

``PatchVQTokenizer`` (discrete): a ``VectorQuantizer`` codebook of patch vectors fitted by
k-means (k-means++ seeding, then Lloyd iterations); a token is the index of the nearest code,
and decoding is a codebook lookup (``vq_lookup``) put back into a grid. There is no encoder
network: on these flat-coloured shapes the patches themselves are a good code space.

``PatchFeatureTokenizer`` (continuous): each patch vector standardised per dimension (mean 0,
std 1 over the fitted images), optionally projected on its leading principal components first
(``dims``); decoding inverts that exactly (up to the dropped components).

Images go in as uint8 ``[N, H, W, 3]`` (numpy or torch) or float in [0, 1], and come out of
``decode`` as float ``[N, H, W, 3]`` in [0, 1]; ``to_uint8`` turns them back into pixels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from unimm.kernels import vq_quantize
from unimm.models import VectorQuantizer


def as_float_images(images, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) ``[N, H, W, 3]``, numpy or torch -> float32 torch in [0, 1]."""
    tensor = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if tensor.dim() != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {tuple(tensor.shape)}")
    tensor = tensor.to(device) if device is not None else tensor
    if tensor.dtype == torch.uint8:
        return tensor.float() / 255.0
    if not tensor.is_floating_point():
        raise TypeError(f"images must be uint8 or floating, got {tensor.dtype}")
    return tensor.float()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float ``[N, H, W, 3]`` in [0, 1] -> uint8 numpy pixels (rounded, clipped)."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, H, W, C] -> [N, (H / p) * (W / p), p * p * C]``, patches in row-major grid order,
    each flattened as (row, column, channel)."""
    n, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of patch_size {patch_size}")
    grid = images.reshape(n, height // patch_size, patch_size, width // patch_size, patch_size, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, -1, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, image_size: int, patch_size: int, channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify`` for square images: ``[N, L, p * p * C] -> [N, S, S, C]``."""
    side = image_size // patch_size
    grid = patches.reshape(patches.shape[0], side, side, patch_size, patch_size, channels)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(patches.shape[0], image_size, image_size, channels)


def psnr(images, reference) -> float:
    """Peak signal-to-noise ratio (dB) of ``images`` against ``reference`` over the whole set,
    both as ``as_float_images`` takes them (peak 1.0)."""
    a, b = as_float_images(images), as_float_images(reference).to(as_float_images(images).device)
    if a.shape != b.shape:
        raise ValueError(f"images and reference must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a - b).square().mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code (squared L2) for every row of ``vectors [N, d]``.

    On a GPU this is unimm's ``vq_quantize`` kernel. On the CPU the kernel's reference, exact
    element by element in fp64, is ~70x slower than a matmul at the demo's sizes, so the CPU
    search is ``|z|^2 - 2 z.e + |e|^2`` in fp32 chunks instead (ties can round differently;
    the picks are equally near to within fp32 rounding).
    """
    if vectors.is_cuda:
        return vq_quantize(vectors, codebook)
    code_norms = codebook.square().sum(-1)
    chunks = [(code_norms - 2 * rows @ codebook.T).argmin(-1) for rows in vectors.split(16384)]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)


class _PatchTokenizer(nn.Module):
    """What both tokenizers share: a ``fitted`` flag (a buffer, so it travels in state dicts)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("fitted", torch.tensor(False))

    def _check_fitted(self):
        if not bool(self.fitted):
            raise RuntimeError("the tokenizer has not been fitted: call fit(images) first")


class PatchVQTokenizer(_PatchTokenizer):
    """Discrete patch tokens: the index of the nearest of ``num_codes`` patch vectors.

    Args:
        num_codes: codebook size K (the image vocabulary of the unified model).
        image_size: side of the square images.
        patch_size: side of a patch; ``(image_size / patch_size)**2`` tokens per image.

    Call ``fit(images)`` before ``encode`` / ``decode``.
    """

    def __init__(self, num_codes: int = 256, *, image_size: int = 32, patch_size: int = 4):
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size must be a positive int dividing image_size {image_size}, got {patch_size!r}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.quantizer = VectorQuantizer(num_codes, patch_size * patch_size * 3)

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @torch.no_grad()
    def fit(self, images, *, iterations: int = 15, max_patches: int = 32768,
            generator: torch.Generator | None = None) -> list[float]:
        """k-means on (at most ``max_patches`` randomly chosen) patches of ``images``: k-means++
        seeding on ``16 * num_codes`` of them, then up to ``iterations`` Lloyd steps on all (fewer
        if the assignment stops changing); a code left without patches moves to the patch worst
        served. Returns the mean squared error per patch element after each step."""
        device = self.quantizer.codebook.device
        patches = patchify(as_float_images(images, device), self.patch_size).reshape(-1, self.quantizer.code_dim)
        if patches.shape[0] < self.num_codes:
            raise ValueError(f"images must hold at least num_codes={self.num_codes} patches, got {patches.shape[0]}")
        patches = patches[torch.randperm(patches.shape[0], generator=generator)[:max_patches].to(device)]
        codebook = _kmeans_plus_plus(patches[:16 * self.num_codes], self.num_codes, generator)
        errors, assigned = [], None
        for _ in range(iterations):
            indices = nearest_codes(patches, codebook)
            if assigned is not None and torch.equal(indices, assigned):
                break
            assigned = indices
            counts = torch.bincount(indices, minlength=self.num_codes)
            sums = torch.zeros_like(codebook).index_add_(0, indices, patches)
            codebook = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], codebook)
            residual = (patches - codebook[indices]).square().sum(-1)
            empty = (counts == 0).nonzero().squeeze(-1)
            if empty.numel():
                codebook[empty] = patches[residual.topk(empty.numel()).indices]
            errors.append(residual.mean().item() / patches.shape[1])
        self.quantizer.codebook.copy_(codebook)
        self.fitted.fill_(True)
        return errors

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images -> int64 codes ``[N, grid, grid]``."""
        self._check_fitted()
        device = self.quantizer.codebook.device
        patches = patchify(as_float_images(images, device), self.patch_size)
        codes = nearest_codes(patches.reshape(-1, patches.shape[-1]), self.quantizer.codes())
        return codes.reshape(-1, self.grid, self.grid)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[N, grid, grid]`` (or ``[N, grid * grid]``) -> float images in [0, 1]."""
        self._check_fitted()
        if codes.shape[-1] * (codes.shape[-2] if codes.dim() == 3 else 1) != self.tokens_per_image:
            raise ValueError(f"codes must be [N, {self.grid}, {self.grid}] or [N, {self.tokens_per_image}], "
                             f"got {tuple(codes.shape)}")
        patches = self.quantizer.lookup(codes.reshape(codes.shape[0], -1).to(self.quantizer.codebook.device))
        return unpatchify(patches, self.image_size, self.patch_size).clamp(0, 1)


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to the squared
    distance to the nearest centre so far, so flat, frequent patches do not take every code."""
    norms = points.square().sum(-1)
    draws = torch.rand(k, generator=generator, dtype=torch.float64).tolist()
    picks = [min(int(draws[0] * points.shape[0]), points.shape[0] - 1)]
    nearest = (norms - 2 * points @ points[picks[0]] + norms[picks[0]]).clamp_min(0)
    for draw in draws[1:]:
        cumulative = nearest.double().cumsum(0)
        if cumulative[-1] <= 0:  # fewer distinct points than codes: repeat one (Lloyd moves it later)
            pick = picks[-1]
        else:
            pick = min(int(torch.searchsorted(cumulative, draw * cumulative[-1])), points.shape[0] - 1)
        picks.append(pick)
        nearest = torch.minimum(nearest, (norms - 2 * points @ points[pick] + norms[pick]).clamp_min(0))
    return points[picks].clone()


class PatchFeatureTokenizer(_PatchTokenizer):
    """Continuous patch tokens: standardised patch vectors, optionally on fewer dimensions.

    Args:
        image_size: side of the square images.
        patch_size: side of a patch.
        dims: keep this many principal components of the patches (whitened: each has std 1);
            None keeps all ``patch_size**2 * 3`` dimensions, standardised one by one, and
            ``decode(encode(x))`` is ``x`` up to float rounding.

    Call ``fit(images)`` before ``encode`` / ``decode``; ``token_dim`` is the feature size.
    """

    def __init__(self, *, image_size: int = 32, patch_size: int = 4, dims: int | None = None):
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1 or image_size % patch_size:
            raise ValueError(f"patch_size must be a positive int dividing image_size {image_size}, got {patch_size!r}")
        patch_dim = patch_size * patch_size * 3
        if dims is not None and (not isinstance(dims, int) or not 1 <= dims <= patch_dim):
            raise ValueError(f"dims must be None or an int in [1, {patch_dim}], got {dims!r}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.dims = dims
        self.token_dim = dims or patch_dim
        self.register_buffer("mean", torch.zeros(patch_dim))
        # [patch_dim, token_dim], orthonormal columns
        self.register_buffer("basis", torch.eye(patch_dim, self.token_dim))
        self.register_buffer("scale", torch.ones(self.token_dim))

    @property
    def tokens_per_image(self) -> int:
        return self.grid * self.grid

    @torch.no_grad()
    def fit(self, images) -> float:
        """Mean, basis and scales from ``images``; returns the fraction of the patch variance the
        kept dimensions hold (1.0 without ``dims``)."""
        patches = patchify(as_float_images(images, self.mean.device), self.patch_size).reshape(-1, self.mean.numel())
        mean = patches.mean(0)
        centred = (patches - mean).double()
        if self.dims is None:
            basis = torch.eye(self.mean.numel(), dtype=torch.float64, device=patches.device)
            variance = centred.square().mean(0)
            kept = 1.0
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(centred.T @ centred / centred.shape[0])
            order = eigenvalues.argsort(descending=True)[:self.dims]
            basis, variance = eigenvectors[:, order], eigenvalues[order]
            kept = (variance.sum() / eigenvalues.clamp_min(0).sum()).item()
        self.mean.copy_(mean)
        self.basis.copy_(basis.float())
        self.scale.copy_(variance.clamp_min(1e-12).sqrt().float())
        self.fitted.fill_(True)
        return kept

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images -> float features ``[N, grid * grid, token_dim]``."""
        self._check_fitted()
        patches = patchify(as_float_images(images, self.mean.device), self.patch_size)
        return (patches - self.mean) @ self.basis / self.scale

    @torch.no_grad()
    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """float ``[N, grid * grid, token_dim]`` -> float images in [0, 1]."""
        self._check_fitted()
        if features.dim() != 3 or features.shape[1:] != (self.tokens_per_image, self.token_dim):
            raise ValueError(f"features must be [N, {self.tokens_per_image}, {self.token_dim}], "
                             f"got {tuple(features.shape)}")
        patches = (features.float().to(self.mean.device) * self.scale) @ self.basis.T + self.mean
        return unpatchify(patches, self.image_size, self.patch_size).clamp(0, 1)
