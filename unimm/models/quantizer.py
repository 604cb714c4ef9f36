"""VectorQuantizer: the codebook layer of a VQ image tokenizer (VQGAN / LlamaGen / Emu3 style).

Nearest-code search and lookup run through ``unimm.kernels.vq_quantize`` / ``vq_lookup``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from unimm.kernels import vq_lookup, vq_quantize
from unimm.kernels._common import check_tensors, is_int, is_real
from unimm.kernels.reference.vq import METRICS, NORMALIZE_EPS, max_exponents, pow2


def _normalize(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1, eps=NORMALIZE_EPS)``, differentiable, without overflow or underflow
    in the norm at any finite magnitude: each vector is first scaled by a power of two (exact, a
    constant for autograd); float16 is computed in float32."""
    work = x.float() if x.dtype == torch.float16 else x
    wide = work.dtype == torch.float64
    exponent, _ = max_exponents(work.detach(), *((-1000, 1000) if wide else (-100, 126)))
    scale = pow2(-exponent, torch.float64 if wide else torch.float32).to(work.dtype)[..., None]
    scaled = work * scale
    out = scaled / torch.maximum(scaled.norm(dim=-1, keepdim=True), NORMALIZE_EPS * scale)
    return out.to(x.dtype)


@dataclass
class QuantizerOutput:
    """What one ``VectorQuantizer`` forward returns. Stats are 0-dim tensors (no host sync)."""

    quantized: torch.Tensor  # [..., d] straight-through: forward = code, gradient flows to z
    loss: torch.Tensor  # codebook_loss + beta * commitment_loss
    indices: torch.Tensor  # int64 [...]
    codebook_loss: torch.Tensor  # mean ||sg(z) - e||^2: moves codes to the encoder outputs
    commitment_loss: torch.Tensor  # mean ||z - sg(e)||^2 (unscaled): keeps z near its code
    perplexity: torch.Tensor  # exp(entropy of this batch's code histogram), 1..num_codes (1: no codes)
    codes_used: torch.Tensor  # distinct codes in this batch
    dead_codes: torch.Tensor  # codes unused for the last `dead_after` training batches


class VectorQuantizer(nn.Module):
    """Maps vectors to their nearest code, with the VQ-VAE losses and straight-through gradient.

    Args:
        num_codes: codebook size K.
        code_dim: vector size d; inputs are channels-last ``[..., d]``.
        metric: ``"l2"``, or ``"cosine"``: inputs and codes are L2-normalised before the search,
            the losses and the output (LlamaGen's tokenizer).
        beta: weight of the commitment loss (VQ-VAE's beta, 0.25 by default).
        dead_after: a code counts as dead after this many training forwards without use.

    ``forward(z)`` returns a :class:`QuantizerOutput`. Usage is tracked in training mode only;
    ``reset_dead_codes(z)`` re-seeds dead codes from encoder outputs, the usual restart trick.

    ``forward`` never reads tensor data on the host (no device synchronisation). Empty input
    gives losses 0 (with zero gradients) and perplexity 1. A vector of ``z`` holding NaN or Inf
    gets index -1 (``vq_quantize``): its ``quantized`` row is NaN, the losses (means over every
    vector) are NaN, and it counts towards no code's usage.
    """

    def __init__(self, num_codes: int, code_dim: int, *, metric: str = "l2", beta: float = 0.25,
                 dead_after: int = 100):
        super().__init__()
        for name, value in (("num_codes", num_codes), ("code_dim", code_dim), ("dead_after", dead_after)):
            if not is_int(value):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be >= 1, got {num_codes} and {code_dim}")
        if not isinstance(metric, str) or metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not is_real(beta):
            raise TypeError(f"beta must be a real number, got {type(beta).__name__}")
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be finite and >= 0, got {beta}")
        if dead_after < 1:
            raise ValueError(f"dead_after must be >= 1, got {dead_after}")
        num_codes, code_dim, dead_after, beta = int(num_codes), int(code_dim), int(dead_after), float(beta)
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.metric = metric
        self.beta = beta
        self.dead_after = dead_after
        # VQGAN's init: uniform in +-1/K (then unit norm for cosine, as LlamaGen).
        self.codebook = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        if metric == "cosine":
            with torch.no_grad():
                self.codebook.copy_(_normalize(self.codebook))
        self.register_buffer("batches_since_used", torch.zeros(num_codes, dtype=torch.int64), persistent=True)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, code_dim={self.code_dim}, metric={self.metric!r}, beta={self.beta}"

    def codes(self) -> torch.Tensor:
        """The codebook as the search sees it (unit rows for cosine), differentiable."""
        if self.metric == "cosine":
            return _normalize(self.codebook)
        return self.codebook

    def _check_z(self, z, name: str = "z") -> None:
        check_tensors({name: z}, floating=True, kind="a floating tensor (float16, bfloat16, float32, float64)")
        if z.dim() == 0 or z.shape[-1] != self.code_dim:
            raise ValueError(f"{name} must be [..., {self.code_dim}] (channels last), got shape {tuple(z.shape)}")
        if z.device != self.codebook.device:
            raise ValueError(f"{name} must be on the codebook's device {self.codebook.device}, got {z.device}")

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        self._check_z(z)
        if self.metric == "cosine":
            z = _normalize(z)
        codes = self.codes()
        indices = vq_quantize(z.detach(), codes.detach().to(z.dtype), metric="l2")
        code_vectors = vq_lookup(indices, codes).to(z.dtype)
        count = max(1, z.numel())  # mean over elements; empty input: sum 0 / 1, still in the graph
        codebook_loss = (code_vectors.float() - z.detach().float()).square().sum() / count
        commitment_loss = (z.float() - code_vectors.detach().float()).square().sum() / count
        quantized = z + (code_vectors - z).detach()

        # usage histogram without a host sync (bincount reads the indices back): index -1 (a
        # non-finite vector) lands in an extra slot that is dropped
        flat = indices.reshape(-1)
        slots = torch.where(flat >= 0, flat, self.num_codes)
        counts = torch.zeros(self.num_codes + 1, dtype=torch.int64, device=flat.device)
        counts = counts.index_add_(0, slots, torch.ones_like(slots))[:self.num_codes]
        if self.training:
            with torch.no_grad():
                self.batches_since_used.add_(1).masked_fill_(counts > 0, 0)
        probs = counts.float() / counts.sum().clamp_min(1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()
        return QuantizerOutput(
            quantized=quantized,
            loss=codebook_loss + self.beta * commitment_loss,
            indices=indices,
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            perplexity=entropy.exp(),
            codes_used=(counts > 0).sum(),
            dead_codes=(self.batches_since_used >= self.dead_after).sum(),
        )

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices ``[...]`` to code vectors ``[..., d]`` (decoding generated tokens)."""
        return vq_lookup(indices, self.codes())

    @torch.no_grad()
    def reset_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Re-seeds every dead code with a random vector of ``z [..., d]``; returns how many
        (reading that count back is a host synchronisation: call it between steps, not in one)."""
        self._check_z(z)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        dead = (self.batches_since_used >= self.dead_after).nonzero().squeeze(-1)
        vectors = z.detach().reshape(-1, self.code_dim)
        if dead.numel() == 0 or vectors.shape[0] == 0:
            return 0
        pick = torch.randint(vectors.shape[0], (dead.numel(),), device=vectors.device, generator=generator)
        self.codebook[dead] = vectors[pick].to(self.codebook.dtype)
        self.batches_since_used[dead] = 0
        return int(dead.numel())
