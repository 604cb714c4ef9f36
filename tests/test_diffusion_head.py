"""DiffusionHead: the fused sampling path against the eager reference, CFG, the loss, learning; on a
GPU, the captured sampler against the eager fused loop and a MAR-B-sized bf16 head against fp32."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unimm.kernels import diffusion
from unimm.models import DiffusionHead
from unimm.models.heads import training_losses
from unimm.testing import DEVICE, available_backends, rel_err, seeded

kernels = diffusion.kernels  # the Triton loop's kernels (None without triton)


def make_head(token_dim=4, cond_dim=8, width=32, depth=2, seed=0):
    torch.manual_seed(seed)
    head = DiffusionHead(token_dim, cond_dim, width, depth).to(DEVICE)
    with torch.no_grad():  # MAR zero-initialises the output layers: give every weight a value
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=seeded(seed + p.numel())) * 0.3 / math.sqrt(max(1, p.shape[-1])))
    return head


def sample(head, backend, monkeypatch, cond, **kwargs):
    monkeypatch.setenv("UNIMM_BACKEND", backend)
    return head.sample(cond, **kwargs)


@pytest.mark.parametrize("num_steps", [1, 2, 25])
@pytest.mark.parametrize("cfg_scale, temperature, clip_denoised", [(1.0, 1.0, None), (3.0, 0.9, None), (2.0, 1.0, 0.5)])
def test_fused_matches_reference(monkeypatch, num_steps, cfg_scale, temperature, clip_denoised):
    if "triton" not in available_backends():
        pytest.skip("triton backend not live here")
    head = make_head()
    rows = 5
    cond = torch.randn(rows * (2 if cfg_scale != 1 else 1), 8, generator=seeded(1)).to(DEVICE)
    noise = torch.randn(num_steps + 1, rows, 4, generator=seeded(2)).to(DEVICE)
    options = dict(num_steps=num_steps, cfg_scale=cfg_scale, temperature=temperature, noise=noise,
                   clip_denoised=clip_denoised)
    want = sample(head, "reference", monkeypatch, cond, **options)
    got = sample(head, "triton", monkeypatch, cond, **options)
    assert got.shape == (rows, 4) and torch.isfinite(got).all()
    assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_guidance_at_scale_one_is_the_conditional_half(backend):
    head = make_head()
    cond = torch.randn(4, 8, generator=seeded(3)).to(DEVICE)
    uncond = torch.randn(4, 8, generator=seeded(4)).to(DEVICE)
    noise = torch.randn(11, 4, 4, generator=seeded(5)).to(DEVICE)
    alone = head.sample(cond, num_steps=10, noise=noise)
    guided = head.sample(torch.cat([cond, uncond]), num_steps=10, cfg_scale=1.0 + 1e-6, noise=noise)
    torch.testing.assert_close(guided, alone, rtol=1e-4, atol=1e-4)


def test_noise_and_generator_reproducibility(backend):
    head = make_head()
    cond = torch.randn(3, 8, generator=seeded(6)).to(DEVICE)
    first = head.sample(cond, num_steps=4, generator=torch.Generator(DEVICE).manual_seed(7))
    second = head.sample(cond, num_steps=4, generator=torch.Generator(DEVICE).manual_seed(7))
    assert torch.equal(first, second)
    cold = head.sample(cond, num_steps=4, temperature=0.0, noise=torch.zeros(5, 3, 4, device=DEVICE))
    warm = head.sample(cond, num_steps=4, temperature=0.0, noise=torch.randn(5, 3, 4, device=DEVICE))
    assert not torch.equal(cold, warm)  # the start noise counts; temperature scales only step noise


def test_schedule_matches_improved_ddpm():
    betas = diffusion.cosine_betas(1000)
    assert betas.shape == (1000,) and betas.max() <= 0.999 and (np.diff(betas) >= 0).all()
    assert diffusion.spaced_timesteps(1000, 100)[:3] == [0, 10, 20] and diffusion.spaced_timesteps(1000, 100)[-1] == 999
    assert diffusion.spaced_timesteps(1000, 1) == [0]
    assert 499 in diffusion.spaced_timesteps(1000, 21)  # MAR's accumulated stride, not round(10 * 49.95)
    schedule = diffusion.DiffusionSchedule(1000)
    timesteps, table = schedule.sampling_tables(1000, DEVICE)
    assert torch.equal(timesteps.cpu(), torch.arange(1000))  # no respacing: the full schedule
    full = schedule.full
    torch.testing.assert_close(table[:, 2].cpu(), torch.tensor(full.coef1, dtype=torch.float32))
    assert torch.isfinite(table).all()


@pytest.mark.parametrize("num_steps", [100, 50])
def test_sampler_with_an_oracle_denoiser(monkeypatch, num_steps):
    """For data N(mu, sigma^2) the optimal noise prediction is known in closed form: the sampler
    driven by it must reproduce the data distribution (the learned variance at its lower end)."""
    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    schedule = diffusion.DiffusionSchedule(100)
    alphas_cumprod = torch.tensor(schedule.full.alphas_cumprod, dtype=torch.float32)
    mu, sigma = torch.tensor([0.3, -0.2]), 0.1

    class Oracle(torch.nn.Module):  # not MAR's MLP: no weights for the fused loop, the reference runs it
        def forward(self, x, t, cond):
            abar = alphas_cumprod[t][:, None]
            eps = (x - abar.sqrt() * mu) * (1 - abar).sqrt() / (abar * sigma**2 + 1 - abar)
            return torch.cat([eps, -torch.ones_like(eps)], -1)

    noise = torch.randn(num_steps + 1, 4096, 2, generator=seeded(16))
    x = diffusion.sample_loop(Oracle(), None, schedule, torch.zeros(4096, 1), noise, num_steps=num_steps,
                              cfg_scale=1.0, temperature=1.0)
    assert (x.mean(0) - mu).abs().max() < 0.01
    assert ((x.std(0) - sigma).abs() < 0.03).all(), x.std(0)


def test_loss_and_gradients():
    head = make_head()
    cond = torch.randn(6, 8, generator=seeded(8)).to(DEVICE)
    target = torch.randn(6, 4, generator=seeded(9)).to(DEVICE)
    loss = head.loss(cond, target, generator=torch.Generator(DEVICE).manual_seed(10))
    again = head.loss(cond, target, generator=torch.Generator(DEVICE).manual_seed(10))
    assert torch.isfinite(loss) and loss.item() == again.item()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())
    # the mask drops rows: a masked-out row may hold anything finite
    mask = torch.tensor([1, 1, 1, 0, 0, 0], device=DEVICE)
    shifted = target.clone()
    shifted[3:] += 100.0
    gen = lambda: torch.Generator(DEVICE).manual_seed(11)
    torch.testing.assert_close(head.loss(cond, target, mask=mask, generator=gen()),
                               head.loss(cond, shifted, mask=mask, generator=gen()))


def test_loss_terms_match_improved_ddpm():
    """The per-row loss is MSE(noise, eps) + KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) / log 2,
    written here from the formulas, with the model's output fixed."""
    schedule = diffusion.DiffusionSchedule(50)
    x0 = torch.rand(4, 3, generator=seeded(12)) * 1.6 - 0.8
    noise = torch.randn(4, 3, generator=seeded(13))
    t = torch.tensor([0, 7, 30, 49])
    output = torch.randn(4, 6, generator=seeded(14)) * 0.5
    losses = training_losses(schedule, lambda x, tt, c: output, x0, t, noise, None)
    full = schedule.full
    for row, step in enumerate(t.tolist()):
        eps, v = output[row, :3].double(), output[row, 3:].double()
        abar = full.alphas_cumprod[step]
        xt = math.sqrt(abar) * x0[row].double() + math.sqrt(1 - abar) * noise[row].double()
        x0_hat = xt / math.sqrt(abar) - math.sqrt(1 / abar - 1) * eps
        mean = full.coef1[step] * x0_hat + full.coef2[step] * xt
        log_var = (v + 1) / 2 * math.log(full.betas[step]) + (1 - v) / 2 * full.posterior_log_var[step]
        mse = (noise[row].double() - eps).square().mean()
        if step == 0:
            cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
            inv = torch.exp(-0.5 * log_var)
            prob = cdf(inv * (x0[row].double() - mean + 1 / 255)) - cdf(inv * (x0[row].double() - mean - 1 / 255))
            vb = -torch.log(prob.clamp_min(1e-12)).mean() / math.log(2)
        else:
            true_mean = full.coef1[step] * x0[row].double() + full.coef2[step] * xt
            true_log_var = full.posterior_log_var[step]
            kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                        + (true_mean - mean).square() * torch.exp(-log_var))
            vb = kl.mean() / math.log(2)
        assert abs(losses[row].item() - (mse + vb).item()) < 1e-4 * max(1.0, abs((mse + vb).item()))


@pytest.mark.parametrize("call, error, match", [
    (lambda h: h.sample(torch.randn(3, 8), cfg_scale=2.0), ValueError, "even row count"),
    (lambda h: h.sample(torch.randn(3, 7)), ValueError, r"cond must be \[rows, 8\]"),
    (lambda h: h.sample(torch.randn(3, 8), num_steps=0), ValueError, "num_steps"),
    (lambda h: h.sample(torch.randn(3, 8), num_steps=1001), ValueError, "num_steps"),
    (lambda h: h.sample(torch.randn(3, 8), num_steps=4, noise=torch.randn(4, 3, 4)), ValueError, "noise must be"),
    (lambda h: h.sample(torch.randint(0, 3, (3, 8))), TypeError, "floating"),
    (lambda h: h.sample(torch.randn(3, 8), cfg_scale=float("nan")), ValueError, "cfg_scale must be finite"),
    (lambda h: h.sample(torch.randn(3, 8), temperature=float("nan")), ValueError, "temperature must be finite"),
    (lambda h: h.sample(torch.randn(3, 8), temperature=-1.0), ValueError, "temperature must be >= 0"),
    (lambda h: h.loss(torch.randn(3, 8), torch.ones(3, 4, dtype=torch.long)), TypeError, "target must be a floating"),
    (lambda h: h.loss(torch.randn(3, 8), torch.randn(3, 5)), ValueError, "target must be"),
    (lambda h: h.loss(torch.randn(3, 8), torch.randn(3, 4), batch_mul=0), ValueError, "batch_mul"),
    (lambda h: h.loss(torch.randn(3, 8), torch.randn(3, 4), mask=torch.ones(2)), ValueError, "mask must be"),
    (lambda h: DiffusionHead(4, 8, 0, 2), ValueError, "width"),
    (lambda h: h.sample(torch.randn(3, 8), clip_denoised=0.0), ValueError, "clip_denoised"),
])
def test_bad_input(call, error, match):
    head = DiffusionHead(4, 8, 16, 1)
    with pytest.raises(error, match=match):
        call(head)


def test_clip_denoised_bounds_every_x0_estimate(monkeypatch):
    """Two steps, t = 999 then t = 0: an untrained head's eps is off by O(1), which the first
    x0 estimate multiplies by ~2e4; clamped, the last step (whose mean is x0 itself) stays in
    [-c, c]."""
    head = make_head()
    cond = torch.randn(6, 8, generator=seeded(11)).to(DEVICE)
    noise = torch.randn(3, 6, 4, generator=seeded(12)).to(DEVICE)
    free = sample(head, "reference", monkeypatch, cond, num_steps=2, noise=noise)
    clipped = sample(head, "reference", monkeypatch, cond, num_steps=2, noise=noise, clip_denoised=0.25)
    assert free.abs().max() > 10
    assert clipped.abs().max() <= 0.25 + 1e-5


def test_learns_a_conditional_distribution(monkeypatch):
    """A few hundred training steps on targets = cond @ A + 0.2 noise: samples for a fixed cond
    centre on its mean with the right spread."""
    monkeypatch.setenv("UNIMM_BACKEND", "reference")  # training speed; the fused sampler is checked above
    torch.manual_seed(0)
    token_dim, cond_dim, spread, steps = 16, 8, 0.2, 400
    mixing = torch.randn(cond_dim, token_dim) * 0.5
    head = DiffusionHead(token_dim, cond_dim, 128, 2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.0)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    first = None
    for _ in range(steps):
        cond = torch.randn(256, cond_dim)
        loss = head.loss(cond, cond @ mixing + spread * torch.randn(256, token_dim))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
    assert loss.item() < 0.5 * first
    conds = torch.randn(4, cond_dim, generator=seeded(13))
    samples = head.sample(conds.repeat_interleave(500, 0), num_steps=50, generator=seeded(14),
                          clip_denoised=4.0).view(4, 500, token_dim)
    centre_error = samples.median(dim=1).values - conds @ mixing
    assert centre_error.square().mean().sqrt() < 0.1, centre_error
    assert 0.7 * spread < samples.std(dim=1).median() < 1.5 * spread


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("epilogue", ["plain", "silu", "gated"])
def test_fused_linear_epilogues(epilogue, dtype):
    if "triton" not in available_backends():
        pytest.skip("triton backend not live here")
    rows, k, n = 37, 45, 70  # odd sizes: partial tiles on every axis
    x = torch.randn(rows, k, generator=seeded(20)).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=seeded(21)) / k ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=seeded(22)).to(DEVICE, dtype)
    mods = torch.randn(rows, 3 * n, generator=seeded(23)).to(DEVICE, dtype)
    residual, gate = mods[:, :n].contiguous(), mods[:, 2 * n:]  # gate: a strided column slice
    want = x.double() @ weight.double().T + bias.double()
    if epilogue == "silu":
        want = F.silu(want)
    if epilogue == "gated":
        want = residual.double() + gate.double() * want
    got = kernels.fused_linear(x, weight, bias, silu=epilogue == "silu",
                                 residual=residual if epilogue == "gated" else None,
                                 gate=gate if epilogue == "gated" else None)
    assert got.dtype == dtype and got.shape == (rows, n) and torch.isfinite(got).all()
    error = ((got.double() - want).norm() / want.norm()).item()
    assert error < (1e-5 if dtype == torch.float32 else 2e-3), error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows, split", [(37, None), (37, 3), (150, None), (150, 2)],
                         ids=["folded", "folded-split-k", "layernorm-kernel", "layernorm-kernel-split-k"])
@pytest.mark.parametrize("affine, silu", [(True, True), (False, False)], ids=["affine-silu", "plain"])
def test_fused_linear_with_layernorm(monkeypatch, dtype, rows, split, affine, silu):
    """``norm=``: the adaLN-modulated LayerNorm before the GEMM, folded into it at up to FOLD_ROWS
    rows (37 here) and by its own kernel above (150), with the K range whole or split (the
    reduction kernel then runs the epilogue), against LayerNorm, modulation and linear in fp64.
    The rows have a mean of about 1 std (the folded form subtracts mu times a product)."""
    if "triton" not in available_backends():
        pytest.skip("triton backend not live here")
    monkeypatch.setattr(kernels, "SPLIT_K", split)
    k, n = 45, 70
    gen = seeded(24)
    x = (torch.randn(rows, k, generator=gen) * 2 + 2).to(DEVICE, dtype)
    weight = (torch.randn(n, k, generator=gen) / k ** 0.5).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)
    mods = torch.randn(rows, 2 * k, generator=gen).to(DEVICE, dtype)
    shift, scale = mods[:, :k], mods[:, k:]  # strided column slices, as the step's modulations are
    ln_weight = (1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE, dtype) if affine else None
    ln_bias = (0.1 * torch.randn(k, generator=gen)).to(DEVICE, dtype) if affine else None
    normed = F.layer_norm(x.double(), (k,), ln_weight.double() if affine else None,
                          ln_bias.double() if affine else None, eps=1e-6)
    want = (normed * (1 + scale.double()) + shift.double()) @ weight.double().T + bias.double()
    want = F.silu(want) if silu else want
    got = kernels.fused_linear(x, weight, bias, silu=silu, norm=(shift, scale, ln_weight, ln_bias))
    assert got.dtype == dtype and got.shape == (rows, n) and torch.isfinite(got).all()
    error = ((got.double() - want).norm() / want.norm()).item()
    assert error < (1e-5 if dtype == torch.float32 else 2e-3), error


def test_split_k_plan(monkeypatch):
    """Split-K only where the output tiles leave SMs idle and the weights are big enough to pay for
    the reduction's launch; each split keeps at least 4 K steps."""
    if kernels is None:
        pytest.skip("triton is not installed")
    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels, "multiprocessor_count", lambda device: 132)
    assert kernels.split_k(32, 1024, 64, 8 << 20, cuda) == 4  # 64 rows x 1024 columns in 32-wide tiles
    assert kernels.split_k(32, 1024, 64, 2 << 20, cuda) == 1  # a 2 MiB weight: whole
    assert kernels.split_k(256, 1024, 64, 8 << 20, cuda) == 1  # every SM already busy
    assert kernels.split_k(8, 1024, 64, 8 << 20, cuda) == 4  # capped by 4 steps per split


# ---- GPU ----------------------------------------------------------------------------------------
#
# Fast tier (`pytest -m gpu`), counted for a cold Triton cache. On a GPU `DiffusionHead.sample` runs
# the Triton loop captured in a CUDA graph (`diffusion._graphed_loop`). Its kernels specialise on
# constexprs and on the int classes (1 / divisible by 16 / other) of rows, widths and strides,
# and on 16-byte pointer alignment:
#   * test_gpu_bf16_sampler: a MAR-B head (width 1024, depth 6, 16-dim tokens) at 128 model rows
#     (64 guided tokens, then 128 unguided ones: the same GEMM tiles; 128 rows fold the LayerNorms
#     into the GEMMs, and 2 MiB weights are not split over K): `_linear_kernel` plain / gated
#     residual / LayerNorm + SiLU / LayerNorm without affine = 4, `_step_kernel` guided and
#     unguided, each twice (the step table's rows of 6 fp32 are 16-byte aligned on every other
#     step) = 4.
# Total: 8 Triton compiles (~11 s); the sampling itself (fp32 and bf16 eager references, the
# eager fused loop, capture and replays) takes a few seconds.
# Full tier (`pytest -m gpu_full`): test_gpu_sampler_sweep, dtype x rows (odd ones too) x guidance.

def mar_head(token_dim=16, cond_dim=1024, width=1024, depth=6, seed=0, dtype=torch.bfloat16):
    """A MAR-B-sized head with every weight random (MAR zero-initialises its output layers):
    unit-gain linears, adaLN modulations of half that gain, LayerNorm affines near identity."""
    torch.manual_seed(seed)
    head = DiffusionHead(token_dim, cond_dim, width, depth)
    gen = seeded(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "adaLN" in name else 1.0) / math.sqrt(p.shape[1]))
            elif name.endswith("in_ln.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return head.to(DEVICE, dtype)


def check_sampler(monkeypatch, head, rows, cfg_scale, clip_denoised, *, num_steps=100, seed=0):
    """On the automatic (Triton, graphed) path: the graph replays to exactly the eager fused loop,
    for the capturing call and for a second call with new inputs; and both agree with the fp32
    reference loop as closely as PyTorch's own eager loop in the head's dtype does."""
    dtype = head.net.input_proj.weight.dtype
    gen = seeded(seed)
    options = dict(num_steps=num_steps, cfg_scale=cfg_scale, temperature=1.0, clip_denoised=clip_denoised)
    timesteps, table = head.schedule.sampling_tables(num_steps, DEVICE)
    cond_rows = 2 * rows if cfg_scale != 1.0 else rows
    graphs_before = len(diffusion._GRAPHS.get(head.net, {}))
    for call in range(2):  # capture, then replay with new inputs
        cond = torch.randn(cond_rows, head.cond_dim, generator=gen).to(DEVICE)
        noise = torch.randn(num_steps + 1, rows, head.token_dim, generator=gen).to(DEVICE)
        eager = diffusion._fused_steps(head.net.kernel_weights(), cond, noise, timesteps, table, cfg_scale, 1.0,
                                       clip_denoised)
        graphed = head.sample(cond, noise=noise, **options)
        assert graphed.shape == (rows, head.token_dim) and graphed.dtype == torch.float32
        assert torch.isfinite(graphed).all()
        assert torch.equal(graphed, eager), f"call {call}: graph replay differs from the eager loop"
    assert len(diffusion._GRAPHS[head.net]) == graphs_before + 1, "one capture per call shape, then replays"

    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    want = copy.deepcopy(head).float().sample(cond, noise=noise, **options)  # fp32, the same weights
    torch_path = head.sample(cond, noise=noise, **options)
    monkeypatch.delenv("UNIMM_BACKEND")
    floor = 1e-3 if dtype == torch.float32 else 2e-3
    error, torch_error = rel_err(graphed, want), rel_err(torch_path, want)
    assert error <= max(3 * torch_error, floor), f"fused {error:.3g} vs PyTorch's {dtype} loop {torch_error:.3g}"


@pytest.mark.gpu
def test_gpu_bf16_sampler(monkeypatch):
    head = mar_head()
    check_sampler(monkeypatch, head, 64, 3.0, 3.0)  # 64 tokens with classifier-free guidance
    check_sampler(monkeypatch, head, 128, 1.0, 3.0, seed=1)  # 128 tokens without


# (dtype, cfg_scale, clip_denoised). Unclipped, a random head's samples grow to ~1e5 (each x0
# estimate multiplies its error in eps by up to ~2e4): past float16's range, so no float16 case.
SWEEP = [(dtype, cfg_scale, clip) for dtype in (torch.bfloat16, torch.float16, torch.float32)
         for cfg_scale, clip in ((1.0, 5.0), (4.0, 3.0))] + [(torch.bfloat16, 1.0, None), (torch.float32, 1.0, None)]


@pytest.mark.gpu_full
@pytest.mark.parametrize("dtype, cfg_scale, clip_denoised", SWEEP,
                         ids=[f"{str(d).split('.')[-1]}-cfg{c}-clip{k}" for d, c, k in SWEEP])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_gpu_sampler_sweep(monkeypatch, dtype, cfg_scale, clip_denoised, rows):
    head = mar_head(token_dim=32, cond_dim=768, seed=2, dtype=dtype)
    check_sampler(monkeypatch, head, rows, cfg_scale, clip_denoised, num_steps=50, seed=3)
