"""VectorQuantizer: the codebook layer of a VQ image tokenizer (VQGAN / LlamaGen / Emu3 style).

Nearest-code search and lookup run through ``unimm.kernels.vq_quantize`` / ``vq_lookup``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unimm.kernels import vq_lookup, vq_quantize
from unimm.kernels.reference.vq import METRICS, NORMALIZE_EPS


@dataclass
class QuantizerOutput:
    """What one ``VectorQuantizer`` forward returns. Stats are 0-dim tensors (no host sync)."""

    quantized: torch.Tensor  # [..., d] straight-through: forward = code, gradient flows to z
    loss: torch.Tensor  # codebook_loss + beta * commitment_loss
    indices: torch.Tensor  # int64 [...]
    codebook_loss: torch.Tensor  # mean ||sg(z) - e||^2: moves codes to the encoder outputs
    commitment_loss: torch.Tensor  # mean ||z - sg(e)||^2 (unscaled): keeps z near its code
    perplexity: torch.Tensor  # exp(entropy of this batch's code histogram), 1..num_codes
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
    """

    def __init__(self, num_codes: int, code_dim: int, *, metric: str = "l2", beta: float = 0.25,
                 dead_after: int = 100):
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be >= 1, got {num_codes} and {code_dim}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if dead_after < 1:
            raise ValueError(f"dead_after must be >= 1, got {dead_after}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.metric = metric
        self.beta = beta
        self.dead_after = dead_after
        # VQGAN's init: uniform in +-1/K (then unit norm for cosine, as LlamaGen).
        self.codebook = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))
        if metric == "cosine":
            with torch.no_grad():
                self.codebook.copy_(F.normalize(self.codebook, dim=-1))
        self.register_buffer("batches_since_used", torch.zeros(num_codes, dtype=torch.int64), persistent=True)

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, code_dim={self.code_dim}, metric={self.metric!r}, beta={self.beta}"

    def codes(self) -> torch.Tensor:
        """The codebook as the search sees it (unit rows for cosine), differentiable."""
        if self.metric == "cosine":
            return F.normalize(self.codebook, dim=-1, eps=NORMALIZE_EPS)
        return self.codebook

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.shape[-1] != self.code_dim:
            raise ValueError(f"z must be [..., {self.code_dim}] (channels last), got shape {tuple(z.shape)}")
        if self.metric == "cosine":
            z = F.normalize(z, dim=-1, eps=NORMALIZE_EPS)
        codes = self.codes()
        indices = vq_quantize(z.detach(), codes.detach().to(z.dtype), metric="l2")
        code_vectors = vq_lookup(indices, codes).to(z.dtype)
        codebook_loss = F.mse_loss(code_vectors.float(), z.detach().float())
        commitment_loss = F.mse_loss(z.float(), code_vectors.detach().float())
        quantized = z + (code_vectors - z).detach()

        counts = torch.bincount(indices.reshape(-1), minlength=self.num_codes)
        if self.training:
            with torch.no_grad():
                self.batches_since_used.add_(1).masked_fill_(counts > 0, 0)
        probs = counts.float() / max(1, indices.numel())
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
        """Re-seeds every dead code with a random vector of ``z [..., d]``; returns how many."""
        dead = (self.batches_since_used >= self.dead_after).nonzero().squeeze(-1)
        vectors = z.detach().reshape(-1, self.code_dim)
        if dead.numel() == 0 or vectors.shape[0] == 0:
            return 0
        pick = torch.randint(vectors.shape[0], (dead.numel(),), device=vectors.device, generator=generator)
        self.codebook[dead] = vectors[pick].to(self.codebook.dtype)
        self.batches_since_used[dead] = 0
        return int(dead.numel())
