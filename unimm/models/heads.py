"""Per-token output heads for continuous image tokens.

``DiffusionHead``: MAR's / UniFluid's small MLP diffusion model on every image position
(``SimpleMLPAdaLN`` + an improved-DDPM Gaussian diffusion with a cosine schedule and learned
variance range), trained with ``loss`` (``training_losses``) and sampled with ``sample``, which
hands the network's tensors to ``unimm.kernels.diffusion``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unimm.kernels import diffusion as kernels
from unimm.kernels._common import check_finite_real, check_tensors, is_int


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep features (256) -> Linear -> SiLU -> Linear (MAR / DiT)."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(kernels.timestep_features(t, self.frequencies).to(self.mlp[0].weight.dtype))


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

    def kernel_weights(self) -> kernels.DenoiserWeights:
        """The parameters, as the fused sampling loop takes them (the tensors themselves, no copies)."""
        def linear(layer: nn.Module) -> kernels.Linear:
            return layer.weight, layer.bias

        blocks = tuple(kernels.BlockWeights(norm=linear(block.in_ln), mlp_in=linear(block.mlp[0]),
                                            mlp_out=linear(block.mlp[2]), modulation=linear(block.adaLN_modulation[1]))
                       for block in self.res_blocks)
        return kernels.DenoiserWeights(
            time_in=linear(self.time_embed.mlp[0]), time_out=linear(self.time_embed.mlp[2]),
            cond_proj=linear(self.cond_proj), input_proj=linear(self.input_proj), blocks=blocks,
            final_modulation=linear(self.final_layer.adaLN_modulation[1]), final=linear(self.final_layer.linear))


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
        check_tensors({name: cond}, floating=True)
        if cond.dim() != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"{name} must be [rows, {self.cond_dim}], got {tuple(cond.shape)}")

    def loss(self, cond: torch.Tensor, target: torch.Tensor, *, mask: torch.Tensor | None = None,
             batch_mul: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean diffusion loss over the rows ``mask`` keeps (all by default; a float ``mask``
        weights the rows). No rows (or none kept): 0, with zero gradients. The rows ``mask`` drops
        take no part, so NaN / Inf there reach neither the loss nor the gradients; in a kept row
        they make the loss NaN / Inf (they propagate)."""
        self._check_cond(cond)
        check_tensors({"target": target}, floating=True)
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
        per_row = training_losses(self.schedule, self.net, target, t, noise, cond)
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
        if not is_int(num_steps):
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
            check_tensors({"noise": noise}, floating=True)
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise must be [num_steps + 1, M, token_dim] = {list(shape)}, "
                                 f"got {list(noise.shape)}")
            if noise.device != cond.device:
                raise ValueError(f"noise must be on cond's device {cond.device}, got {noise.device}")
        return kernels.sample_loop(self.net, self.net.kernel_weights(), self.schedule, cond, noise,
                                   num_steps=num_steps, cfg_scale=float(cfg_scale), temperature=float(temperature),
                                   clip_denoised=None if clip_denoised is None else float(clip_denoised))


def training_losses(schedule: kernels.DiffusionSchedule, denoiser, x_start: torch.Tensor, t: torch.Tensor,
                    noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Per-row loss of ``denoiser(x_t, t, cond) -> [eps, variance interpolation]`` on ``schedule``:
    MSE between the noise and the predicted noise, plus the variational bound (bits per dim) for
    the learned variance with the mean frozen (improved DDPM)."""
    full = schedule.full
    gather = lambda table: torch.as_tensor(table, dtype=torch.float32, device=x_start.device)[t][:, None]
    x_t = gather(np.sqrt(full.alphas_cumprod)) * x_start + gather(np.sqrt(1 - full.alphas_cumprod)) * noise
    out = denoiser(x_t, t, cond).float()
    eps, var_values = out.chunk(2, dim=-1)
    mse = (noise.float() - eps).square().mean(-1)
    # the bound trains only the variance: the mean's gradient comes from the MSE alone
    model_mean, model_log_var = _posterior_from_output(x_t.float(), eps.detach(), var_values, gather, full)
    true_mean = gather(full.coef1) * x_start + gather(full.coef2) * x_t
    true_log_var = gather(full.posterior_log_var)
    kl = _normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(-1) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x_start.float(), model_mean, 0.5 * model_log_var).mean(-1)
    vb = torch.where(t == 0, nll / math.log(2.0), kl)
    return mse + vb


def _posterior_from_output(x_t, eps, var_values, gather, tables):
    x0 = gather(tables.sqrt_recip_ac) * x_t - gather(tables.sqrt_recipm1_ac) * eps
    mean = gather(tables.coef1) * x0 + gather(tables.coef2) * x_t
    frac = (var_values + 1) / 2
    log_var = frac * gather(tables.log_betas) + (1 - frac) * gather(tables.posterior_log_var)
    return mean, log_var


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2).square() * torch.exp(-logvar2))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """ADM's likelihood of data in [-1, 1] discretised to 255 bins (the bound's t = 0 term)."""
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v.pow(3))))
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _check_positive_int(name: str, value) -> None:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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
        check_tensors({"cond": cond, "target": target}, floating=True)
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
        check_finite_real("cfg_scale", cfg_scale)
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
