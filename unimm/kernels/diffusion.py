"""Per-token diffusion (MAR / UniFluid): the improved-DDPM Gaussian diffusion with a cosine
schedule and learned variance range, and its sampling loop. The training loss is the model's
(``unimm.models.heads``); this module knows the network only as a callable and as the plain
tensors of ``DenoiserWeights``.

The sampling loop is the hot path: ~100 denoising steps of a small MLP on every image token.
  * reference: the eager loop over the denoiser callable (the model's ``SimpleMLPAdaLN``; what
    ``UNIMM_BACKEND=reference`` runs);
  * triton (``_diffusion_triton``): the same network, from its ``DenoiserWeights``, each residual
    block's MLP as two fused GEMMs (``_linear_kernel``: the adaLN-modulated LayerNorm folded into
    the first one at few rows, or its own kernel before it, and bias + SiLU in its epilogue; bias +
    gate + residual in the second's), split over K where the output tiles are fewer than the SMs,
    and the whole per-step update (guidance, x0, posterior mean, learned variance, noise:
    ``_step_kernel``) fused; the timestep MLP of every step is computed once per call and every
    block's adaLN modulation of a step in one GEMM over the concatenated weights; on a GPU the
    whole loop is captured in a CUDA graph per (rows, steps, guidance) and replayed.
    Kernels per step at few rows: the modulations, the input projection, two GEMMs per block, the
    final GEMM and the update (2 depth + 4; with the LayerNorms apart, 3 depth + 5), plus one
    reduction per split GEMM.
Schedule tables live on the device; the loop makes no host synchronisation and no host-to-device
copy. Its meaning is the reference loop: both take the same ``noise`` and agree to rounding.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from unimm.kernels import dispatch
from unimm.kernels._common import capture_cuda_graph, check_finite_real, lru_per_owner

try:
    from unimm.kernels import _diffusion_triton as kernels
except ImportError:  # no triton: the Triton backend is then not live (dispatch says why)
    kernels = None


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------

def cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: beta_i = 1 - abar((i+1)/T) / abar(i/T), capped."""
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta) for i in range(steps)])


def spaced_timesteps(train_steps: int, num_steps: int) -> list[int]:
    """``num_steps`` of ``train_steps`` timesteps from 0 to the last, increasing: ADM's respacing
    as MAR samples with it (``space_timesteps(train_steps, str(num_steps))``, one section).

    The rule, to the bit: a float position starts at 0.0 and grows by the float stride
    ``(train_steps - 1) / (num_steps - 1)`` (1 for a single step) once per step, and each step takes
    ``round(position)`` (Python's round: ties to even). The position is accumulated, not computed
    as ``i * stride``: the two round differently at 278 of the step counts 1-1000 (21 steps take
    timestep 499, not 500)."""
    if not (isinstance(train_steps, numbers.Integral) and isinstance(num_steps, numbers.Integral)
            and 1 <= num_steps <= train_steps):
        raise ValueError(f"num_steps must be an int in [1, train_steps = {train_steps}], got {num_steps!r}")
    stride = (train_steps - 1) / (num_steps - 1) if num_steps > 1 else 1
    position, taken = 0.0, []
    for _ in range(num_steps):
        taken.append(round(position))
        position += stride
    return sorted(set(taken))


def check_sampling_options(cfg_scale, temperature, clip_denoised=None, *,
                           names: tuple[str, str, str] = ("cfg_scale", "temperature", "clip_denoised")) -> None:
    """The Python-scalar options of diffusion sampling (``DiffusionHead.sample``; ``ImageSpec``'s
    ``cfg_scale``, ``diffusion_temperature``, ``clip_denoised`` under ``names``): ``cfg_scale`` a
    finite real, ``temperature`` a finite real >= 0, ``clip_denoised`` None or a finite real > 0.

    Raises:
        TypeError: an option that is not a real number (bools included).
        ValueError: NaN, Inf or a value out of range; the message names the option.
    """
    real = check_finite_real
    cfg_name, temperature_name, clip_name = names
    real(cfg_name, cfg_scale)
    real(temperature_name, temperature)
    if temperature < 0:
        raise ValueError(f"{temperature_name} must be >= 0, got {temperature!r}")
    if clip_denoised is not None:
        real(clip_name, clip_denoised)
        if clip_denoised <= 0:
            raise ValueError(f"{clip_name} must be a positive number or None, got {clip_denoised!r}")


class _Tables:
    """Diffusion quantities of a (possibly respaced) beta schedule, computed in fp64."""

    def __init__(self, betas: np.ndarray):
        alphas_cumprod = np.cumprod(1.0 - betas)
        prev = np.append(1.0, alphas_cumprod[:-1])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_recip_ac = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / alphas_cumprod - 1)
        posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
        self.posterior_log_var = np.log(np.append(posterior_variance[1], posterior_variance[1:])) if len(
            betas) > 1 else np.log(np.maximum(posterior_variance, 1e-20))
        self.coef1 = betas * np.sqrt(prev) / (1.0 - alphas_cumprod)
        self.coef2 = (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self.log_betas = np.log(betas)

    def step_table(self, device) -> torch.Tensor:
        """fp32 ``[steps, 6]``: what one sampling step needs, indexed on the device."""
        columns = (self.sqrt_recip_ac, self.sqrt_recipm1_ac, self.coef1, self.coef2, self.posterior_log_var,
                   self.log_betas)
        return torch.tensor(np.stack(columns, axis=1), dtype=torch.float32, device=device)


class DiffusionSchedule:
    """The cosine schedule of ``train_steps`` steps, and its respacings for sampling."""

    def __init__(self, train_steps: int):
        self.train_steps = train_steps
        self.full = _Tables(cosine_betas(train_steps))
        self._device_tables: dict = {}

    def sampling_tables(self, num_steps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps int64 ``[num_steps]``: the original timestep of each respaced step,
        step table fp32 ``[num_steps, 6]``), cached on the device."""
        key = (num_steps, str(device))
        if key not in self._device_tables:
            use = spaced_timesteps(self.train_steps, num_steps)
            used, betas, last = set(use), [], 1.0
            for i, alpha_cumprod in enumerate(self.full.alphas_cumprod):
                if i in used:
                    betas.append(1 - alpha_cumprod / last)
                    last = alpha_cumprod
            tables = _Tables(np.array(betas))
            self._device_tables[key] = (torch.tensor(use, dtype=torch.int64, device=device),
                                        tables.step_table(device))
        return self._device_tables[key]


# ---------------------------------------------------------------------------------------------
# The denoiser's weights
# ---------------------------------------------------------------------------------------------

Linear = tuple[torch.Tensor, torch.Tensor]  # (weight [out, in], bias [out])


@dataclasses.dataclass(frozen=True)
class BlockWeights:
    """One residual block: ``h + gate * mlp_out(SiLU(mlp_in(LayerNorm(h) (1 + scale) + shift)))``,
    ``(shift, scale, gate) = modulation(SiLU(y))``."""

    norm: Linear  # the LayerNorm's (weight, bias), eps 1e-6
    mlp_in: Linear
    mlp_out: Linear
    modulation: Linear  # width -> 3 width


@dataclasses.dataclass(frozen=True)
class DenoiserWeights:
    """The tensors of MAR's denoiser (``SimpleMLPAdaLN``, whose ``kernel_weights`` builds this) that
    the fused loop reads: ``y = time_out(SiLU(time_in(features(t)))) + cond_proj(cond)``,
    ``h = input_proj(x)``, the blocks, then ``final(LayerNorm(h) (1 + scale) + shift)`` with
    ``(shift, scale) = final_modulation(SiLU(y))`` (that LayerNorm has no affine)."""

    time_in: Linear  # the sinusoidal features (``timestep_features``, as many as its input) -> width
    time_out: Linear
    cond_proj: Linear
    input_proj: Linear
    blocks: tuple[BlockWeights, ...]
    final_modulation: Linear  # width -> 2 width
    final: Linear  # width -> 2 token_dim: [eps, variance interpolation]

    @property
    def dtype(self) -> torch.dtype:
        return self.input_proj[0].dtype

    def tensors(self) -> list[torch.Tensor]:
        linears = [self.time_in, self.time_out, self.cond_proj, self.input_proj, self.final_modulation, self.final]
        for block in self.blocks:
            linears += [block.norm, block.mlp_in, block.mlp_out, block.modulation]
        return [tensor for pair in linears for tensor in pair]


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """fp32 ``[len(t), dim]`` sinusoidal features of the timesteps (MAR / DiT): cosines then sines."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

def sample_loop(denoiser, weights: DenoiserWeights | None, schedule: DiffusionSchedule, cond: torch.Tensor,
                noise: torch.Tensor, *, num_steps: int, cfg_scale: float, temperature: float,
                clip_denoised: float | None = None) -> torch.Tensor:
    """``noise[0]`` denoised over ``num_steps`` respaced steps; step k (k = 1..num_steps) injects
    ``noise[k]``. With ``cfg_scale != 1``, cond is ``[cond; uncond]`` and eps is guided.
    ``clip_denoised=c`` clamps each step's x0 estimate to [-c, c] (improved DDPM's clip_denoised).

    ``denoiser(x, t, cond) -> [eps, variance interpolation]`` is the network in plain PyTorch: the
    reference backend calls it, its inputs cast to ``weights.dtype``. ``weights``: the same
    network's tensors, which the Triton backend reads; None (a denoiser that is not MAR's MLP):
    the reference only, in fp32. On a GPU the Triton loop is captured in a CUDA graph, cached
    per ``denoiser`` (weakly: the graphs go with it).

    Rows are independent: NaN / Inf in a row of ``cond`` (or its uncond row) or of ``noise``
    reaches that output row only; nothing is checked on the host."""
    check_sampling_options(cfg_scale, temperature, clip_denoised)
    if noise.shape[1] == 0:  # no token: nothing to launch
        return noise.new_empty(noise.shape[1:], dtype=torch.float32)
    if weights is None:
        unsupported = "no weights were given for the fused loop (a denoiser other than MAR's MLP)"
    elif weights.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        unsupported = f"parameters in {weights.dtype} are served by the reference only"
    else:
        unsupported = None
    backend = dispatch.select("diffusion_sample", cond.device, implemented=("triton",),
                              unsupported={"triton": unsupported})
    timesteps, table = schedule.sampling_tables(num_steps, cond.device)
    options = (cfg_scale, temperature, clip_denoised)
    if backend == "reference":
        dtype = weights.dtype if weights is not None else torch.float32
        return _reference_loop(denoiser, dtype, cond, noise, timesteps, table, *options)
    if cond.is_cuda and not torch.cuda.is_current_stream_capturing():
        return _graphed_loop(denoiser, weights, cond, noise, timesteps, table, *options)
    return _fused_steps(weights, cond, noise, timesteps, table, *options)


def _guide(out, token_dim, cfg_scale):
    """(eps, variance interpolation) of the model output; with guidance eps = u + s (c - u) and the
    variance of the conditional half (MAR's forward_with_cfg)."""
    eps, var_values = out[:, :token_dim].float(), out[:, token_dim:].float()
    if cfg_scale == 1.0:
        return eps, var_values
    rows = out.shape[0] // 2
    eps_cond, eps_uncond = eps[:rows], eps[rows:]
    return eps_uncond + cfg_scale * (eps_cond - eps_uncond), var_values[:rows]


def _reference_loop(denoiser, dtype, cond, noise, timesteps, table, cfg_scale, temperature, clip_denoised):
    num_steps = timesteps.shape[0]
    token_dim = noise.shape[-1]
    x = noise[0].float()
    for i in reversed(range(num_steps)):
        model_in = torch.cat([x, x]) if cfg_scale != 1.0 else x
        t = timesteps[i].expand(model_in.shape[0])
        out = denoiser(model_in.to(dtype), t, cond.to(dtype))
        eps, var_values = _guide(out, token_dim, cfg_scale)
        a, b, c1, c2, min_log, max_log = table[i]
        x0 = a * x - b * eps
        if clip_denoised is not None:
            x0 = x0.clamp(-clip_denoised, clip_denoised)
        mean = c1 * x0 + c2 * x
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x = mean + (float(i > 0) * temperature) * torch.exp(0.5 * log_var) * noise[num_steps - i].float()
    return x


def _fused_steps(weights: DenoiserWeights, cond, noise, timesteps, table, cfg_scale, temperature, clip_denoised):
    """The Triton loop, eagerly (what ``_graphed_loop`` captures)."""
    num_steps = timesteps.shape[0]
    dtype = weights.dtype
    cond = cond.to(dtype)
    guided = cfg_scale != 1.0
    c_emb = F.linear(cond, *weights.cond_proj)
    # every step's timestep embedding in one call
    features = timestep_features(timesteps, weights.time_in[0].shape[1]).to(weights.time_in[0].dtype)
    t_emb = F.linear(F.silu(F.linear(features, *weights.time_in)), *weights.time_out)
    # every adaLN modulation of a step reads the same SiLU(y): one GEMM over all their weights
    modulations = [block.modulation for block in weights.blocks] + [weights.final_modulation]
    mod_weight = torch.cat([weight for weight, _ in modulations])
    mod_bias = torch.cat([bias for _, bias in modulations])
    width = weights.input_proj[0].shape[0]
    x = noise[0].float().clone()
    linear = kernels.fused_linear
    for i in reversed(range(num_steps)):
        model_in = torch.cat([x, x]) if guided else x
        mods = linear(F.silu(t_emb[i] + c_emb), mod_weight, mod_bias).split(width, dim=-1)
        h = linear(model_in.to(dtype), *weights.input_proj)
        for k, block in enumerate(weights.blocks):
            shift, scale, gate = mods[3 * k:3 * k + 3]
            hidden = linear(h, *block.mlp_in, silu=True, norm=(shift, scale, *block.norm))
            h = linear(hidden, *block.mlp_out, residual=h, gate=gate)
        shift, scale = mods[-2:]
        out = linear(h, *weights.final, norm=(shift, scale, None, None))
        x = kernels.denoise_step(x, out, noise[num_steps - i], table[i], cfg_scale, temperature if i > 0 else 0.0,
                                 clip_denoised)
    return x


_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # denoiser -> OrderedDict[call key -> graph]
MAX_CACHED_GRAPHS = 16  # per denoiser, least recently used dropped: row counts vary with the rows in an image


def _graphed_loop(denoiser, weights, cond, noise, timesteps, table, cfg_scale, temperature, clip_denoised):
    """Captures the whole loop once per (denoiser, weights, shapes, steps, guidance, temperature) and
    replays it: one launch per sampled token batch instead of ~100 x (depth x 6) kernels."""
    # the graph reads the weights where they were at capture: their addresses are part of the key
    key = (tuple(t.data_ptr() for t in weights.tensors()), tuple(cond.shape), cond.dtype, tuple(noise.shape),
           timesteps.shape[0], cfg_scale, temperature, clip_denoised, cond.device)

    def capture():
        static_cond, static_noise = cond.clone(), noise.clone()
        graph, static_out = capture_cuda_graph(
            lambda: _fused_steps(weights, static_cond, static_noise, timesteps, table, cfg_scale, temperature,
                                 clip_denoised), cond.device)
        return graph, static_cond, static_noise, static_out

    graph, static_cond, static_noise, static_out = lru_per_owner(_GRAPHS, denoiser, key, MAX_CACHED_GRAPHS, capture)
    static_cond.copy_(cond)
    static_noise.copy_(noise)
    graph.replay()
    return static_out.clone()
