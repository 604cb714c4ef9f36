"""Per-token output heads for continuous image tokens.

``DiffusionHead``: MAR's / UniFluid's small MLP diffusion model on every image position
(``SimpleMLPAdaLN`` + an improved-DDPM Gaussian diffusion with a cosine schedule and learned
variance range), trained with ``loss`` and sampled with ``sample``.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from unimm.kernels import diffusion as kernels


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (256) -> Linear -> SiLU -> Linear (MAR / DiT)."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(embedding, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t, self.frequencies).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """``x + gate * MLP(LayerNorm(x) (1 + scale) + shift)``, (shift, scale, gate) from SiLU(y)."""

    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """MAR's denoiser: ``(x_t, t, cond) -> [eps, variance interpolation]``, ``2 token_dim`` wide."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_proj = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self._initialize()

    def _initialize(self):
        # MAR: xavier-uniform linears with zero bias, N(0, 0.02) timestep MLP, zero adaLN and output
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.res_blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        y = self.time_embed(t) + self.cond_proj(cond)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


class DiffusionHead(nn.Module):
    """A per-token diffusion head (MAR, UniFluid): predicts a continuous token from the decoder's
    hidden state at that position.

    Args:
        token_dim: size of the continuous token (VAE latent channels, SigLIP feature).
        cond_dim: size of the conditioning vector (the decoder's hidden size).
        width, depth: the MLP's width and number of residual blocks (MAR-B: 1024 / 6).
        train_steps: diffusion steps of the cosine schedule (1000).

    ``loss(cond, target, mask=None, batch_mul=4)``: the improved-DDPM loss (MSE on the noise plus
    the variational bound for the learned variance), each row repeated ``batch_mul`` times with
    independent timesteps. ``sample(cond, num_steps=100, cfg_scale=1.0, temperature=1.0, ...)``:
    ancestral sampling on the schedule respaced to ``num_steps`` (MAR's respacing), with
    classifier-free guidance.

    Tensor data is never read on the host (no device synchronisation): NaN / Inf in ``cond``,
    ``target`` or ``noise`` propagate, as in PyTorch, to the outputs that depend on them (the
    loss, a sampled row) and no others (rows ``mask`` drops, other sampled rows). Python-scalar
    options are checked: TypeError / ValueError naming the option.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, *, train_steps: int = 1000):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("cond_dim", cond_dim), ("width", width),
                            ("depth", depth), ("train_steps", train_steps)):
            _check_positive_int(name, value)
        self.token_dim = token_dim
        self.cond_dim = cond_dim
        self.train_steps = train_steps
        self.net = SimpleMLPAdaLN(token_dim, cond_dim, width, depth)
        self.schedule = kernels.DiffusionSchedule(train_steps)

    def extra_repr(self) -> str:
        return f"token_dim={self.token_dim}, cond_dim={self.cond_dim}, train_steps={self.train_steps}"

    def _check_cond(self, cond: torch.Tensor, name: str = "cond") -> None:
        """Type and shape only: values are not read (no host synchronisation)."""
        _check_float_tensor(name, cond)
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"{name} must be [rows, {self.cond_dim}], got {tuple(cond.shape)}")

    def loss(self, cond: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None,
             batch_mul: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean diffusion loss over the rows ``mask`` keeps (all by default; a float ``mask``
        weights the rows). No rows (or none kept): 0, with zero gradients. The rows ``mask`` drops
        take no part, so NaN / Inf there reach neither the loss nor the gradients; in a kept row
        they make the loss NaN / Inf (they propagate)."""
        self._check_cond(cond)
        _check_float_tensor("target", target)
        if target.dim() != 2 or target.shape != (cond.shape[0], self.token_dim):
            raise ValueError(f"target must be [{cond.shape[0]}, {self.token_dim}], got {tuple(target.shape)}")
        if target.device != cond.device:
            raise ValueError(f"target must be on cond's device {cond.device}, got {target.device}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
            if mask.shape != (cond.shape[0],):
                raise ValueError(f"mask must be [{cond.shape[0]}], got {tuple(mask.shape)}")
            if mask.device != cond.device:
                raise ValueError(f"mask must be on cond's device {cond.device}, got {mask.device}")
        _check_positive_int("batch_mul", batch_mul)
        if mask is not None:
            # dropped rows are zeroed before the network sees them: their values never matter
            kept = (mask != 0)[:, None]
            cond = torch.where(kept, cond, torch.zeros((), dtype=cond.dtype, device=cond.device))
            target = torch.where(kept, target, torch.zeros((), dtype=target.dtype, device=target.device))
        cond = cond.repeat(batch_mul, 1)
        target = target.repeat(batch_mul, 1)
        rows = target.shape[0]
        t = torch.randint(0, self.train_steps, (rows,), device=target.device, generator=generator)
        noise = torch.randn(target.shape, device=target.device, generator=generator, dtype=target.dtype)
        per_row = self.schedule.training_losses(self.net, target, t, noise, cond)
        if mask is None:
            return per_row.mean() if rows else per_row.sum()  # no rows: 0, still in the graph
        keep = mask.float().repeat(batch_mul)
        return (per_row * keep).sum() / keep.sum().clamp_min(1.0)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, num_steps: int = 100, cfg_scale: float = 1.0, temperature: float = 1.0,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               clip_denoised: float | None = None) -> torch.Tensor:
        """Tokens ``[M, token_dim]``; with ``cfg_scale != 1``, ``cond`` is ``[cond; uncond]`` (2M
        rows). ``noise [num_steps + 1, M, token_dim]`` (start, then one per step) makes the result
        reproducible across backends; otherwise noise is drawn from ``generator``.

        ``clip_denoised=c`` clamps every step's estimate of the clean token to ``[-c, c]``
        (improved DDPM's ``clip_denoised``; MAR samples without it, the default). The cosine
        schedule ends at alpha_bar ~ 2e-9, where x0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar)
        multiplies any error in eps by ~2e4: a head that is not yet fully trained (early
        checkpoints, small demos) throws its first steps far off unless x0 is bounded. Use a bound
        a few times the data's range, e.g. 3-5 for standardised tokens.

        Options (``kernels.check_sampling_options``): ``cfg_scale`` finite, ``temperature`` finite
        and >= 0, ``clip_denoised`` None or finite and > 0. Rows are independent: NaN / Inf in a
        row of ``cond`` (or of its uncond row) or of ``noise`` make that token NaN / Inf only."""
        self._check_cond(cond)
        if not isinstance(num_steps, numbers.Integral) or isinstance(num_steps, bool):
            raise TypeError(f"num_steps must be an int, got {type(num_steps).__name__}")
        if not 1 <= num_steps <= self.train_steps:
            raise ValueError(f"num_steps must be an int in [1, {self.train_steps}], got {num_steps!r}")
        kernels.check_sampling_options(cfg_scale, temperature, clip_denoised)
        num_steps = int(num_steps)
        guided = cfg_scale != 1.0
        if guided and cond.shape[0] % 2:
            raise ValueError(f"with cfg_scale != 1, cond must hold [cond; uncond] halves: an even row count, "
                             f"got {cond.shape[0]}")
        rows = cond.shape[0] // 2 if guided else cond.shape[0]
        shape = (num_steps + 1, rows, self.token_dim)
        if noise is None:
            noise = torch.randn(shape, device=cond.device, generator=generator, dtype=torch.float32)
        else:
            _check_float_tensor("noise", noise)
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must be [num_steps + 1, M, token_dim] = {list(shape)}, "
                                 f"got {list(noise.shape)}")
            if noise.device != cond.device:
                raise ValueError(f"noise must be on cond's device {cond.device}, got {noise.device}")
        return kernels.sample_loop(self.net, self.schedule, cond, noise, num_steps=num_steps,
                                   cfg_scale=float(cfg_scale), temperature=float(temperature),
                                   clip_denoised=None if clip_denoised is None else float(clip_denoised))


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")


class RegressionHead(nn.Module):
    """MetaMorph's vision head: a linear map from the decoder's hidden state to a continuous
    token (a SigLIP feature), trained with the cosine loss ``1 - cos(pred, target)``.

    Same interface as ``DiffusionHead``: ``token_dim``, ``cond_dim``, ``loss(cond, target,
    mask=None)``, ``sample(cond, cfg_scale=1.0)``; ``forward(cond)`` is the prediction.
    """

    def __init__(self, token_dim: int, cond_dim: int, *, bias: bool = True):
        super().__init__()
        for name, value in (("token_dim", token_dim), ("cond_dim", cond_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.token_dim = token_dim
        self.cond_dim = cond_dim
        self.proj = nn.Linear(cond_dim, token_dim, bias=bias)

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        if cond.shape[-1] != self.cond_dim:
            raise ValueError(f"cond must be [..., {self.cond_dim}], got {tuple(cond.shape)}")
        return self.proj(cond)

    def loss(self, cond: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean of ``1 - cos(self(cond), target)`` over the rows, weighted by ``mask`` (bool or
        float ``[rows]``) when given; computed in fp32. No rows (or none kept): 0, with zero
        gradients; NaN / Inf in a dropped row reach neither the loss nor the gradients."""
        _check_float_tensor("cond", cond)
        _check_float_tensor("target", target)
        if cond.dim() != 2 or target.shape != (cond.shape[0], self.token_dim):
            raise ValueError(f"cond must be [rows, {self.cond_dim}] and target [rows, {self.token_dim}], got "
                             f"{tuple(cond.shape)} and {tuple(target.shape)}")
        if mask is None:
            per_row = 1.0 - F.cosine_similarity(self(cond).float(), target.float(), dim=-1)
            return per_row.mean() if per_row.numel() else per_row.sum()
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.shape != (cond.shape[0],):
            raise ValueError(f"mask must be [{cond.shape[0]}], got {tuple(mask.shape)}")
        kept = (mask != 0)[:, None]
        cond = torch.where(kept, cond, torch.zeros((), dtype=cond.dtype, device=cond.device))
        target = torch.where(kept, target, torch.zeros((), dtype=target.dtype, device=target.device))
        per_row = 1.0 - F.cosine_similarity(self(cond).float(), target.float(), dim=-1)
        keep = mask.float()
        return (per_row * keep).sum() / keep.sum().clamp_min(1e-12)

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, *, cfg_scale: float = 1.0) -> torch.Tensor:
        """The predicted tokens; with ``cfg_scale != 1`` (a finite number), ``cond`` is
        ``[cond; uncond]`` and the result is ``u + cfg_scale (c - u)`` of the two predictions."""
        kernels.check_finite_real("cfg_scale", cfg_scale)
        prediction = self(cond)
        if cfg_scale == 1.0:
            return prediction
        if cond.shape[0] % 2:
            raise ValueError(f"with cfg_scale != 1, cond must hold [cond; uncond] halves, got {cond.shape[0]} rows")
        conditional, unconditional = prediction.chunk(2)
        return unconditional + cfg_scale * (conditional - unconditional)


class FeatureProjector(nn.Module):
    """Input projector for continuous tokens: ``Linear -> GELU -> Linear`` to the decoder's
    hidden size (LLaVA's ``mlp2x_gelu``, MetaMorph's adapter)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(f"features must be [..., {self.in_dim}], got {tuple(features.shape)}")
        return self.net(features)
