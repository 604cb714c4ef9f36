"""Hostile input for VQ, sampling, VectorQuantizer and DiffusionHead (issue 14): magnitudes past
fp32's square range, outliers, non-finite values under the library's rule (propagate to exactly
the outputs that depend on them; discrete outputs define it), empty input, bad Python scalars, and
MAR's diffusion step respacing. Every public entry point on every backend live here (the
reference; Triton through the interpreter in fp32 / fp16); the CUDA kernels' arithmetic is checked
through a model of it where no GPU runs them."""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unimm.kernels import diffusion, sample_tokens, vq, vq_lookup, vq_quantize
from unimm.kernels.reference import sampling as sampling_reference
from unimm.kernels.reference import vq as vq_reference
from unimm.models import DiffusionHead, RegressionHead, VectorQuantizer
from unimm.testing import DEVICE, HAS_GPU, seeded

NAN, INF = float("nan"), float("inf")
FLT_MAX = 2.0**128 - 2.0**104
HYPOTHESIS = settings(max_examples=12, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # Triton's interpreter runs kernels in numpy, which warns on every NaN it makes on purpose here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RuntimeWarning)
        yield


def device_generator(seed):
    return torch.Generator(DEVICE).manual_seed(seed)


def randn(shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=seeded(seed), dtype=torch.float64) * scale).to(DEVICE, dtype)


# ---- vq_quantize / vq_lookup --------------------------------------------------------------------

def assert_nearest(z, codebook, got, metric, rel_tol=2e-5):
    """Every pick is a nearest code up to fp32 rounding relative to (|z_n| + |e_nearest|)^2 (l2;
    cosine distances are O(1)), and -1 exactly where the reference says so."""
    want = vq_reference.vq_quantize(z, codebook, metric).reshape(-1)
    got = got.reshape(-1)
    assert got.dtype == torch.int64 and torch.equal(got == -1, want == -1)
    rows, codes = z.reshape(-1, z.shape[-1]).double()[want >= 0], codebook.double()
    got, want = got[want >= 0], want[want >= 0]
    scale = 4.0 if metric == "cosine" else (rows.norm(dim=-1) + codes[want].norm(dim=-1)).square()
    gap = (vq_reference.pair_distances(rows, codes[got], metric)
           - vq_reference.pair_distances(rows, codes[want], metric))
    assert (gap / scale <= rel_tol).all(), f"picks farther than the nearest by {(gap / scale).max().item():.3g}"
    return got


# bfloat16 has fp32's range; the interpreter's tl.dot on bf16 is unreliable, so only on a GPU
WIDE_DTYPES = [torch.float32] + ([torch.bfloat16] if HAS_GPU else [])


@pytest.mark.parametrize("dtype", WIDE_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("scale", [1e20, 1e30, 3e36, 1e-20, 1e-30])
def test_vq_magnitudes_past_fp32_squares(backend, metric, scale, dtype):
    """vq_quantize(z * 1e20, cb * 1e20) gave all zeros on Triton: |z|^2 + |e|^2 - 2 z.e overflowed."""
    z, codebook = randn((45, 9), 1, dtype, scale), randn((130, 9), 2, dtype, scale)
    assert_nearest(z, codebook, vq_quantize(z, codebook, metric=metric), metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vq_outliers(backend, metric):
    """A row 1e30 times the rest, a code 1e30 times and one 1e-30 times: every pick is nearest,
    and the outlier row changes no other row (nor, for l2, the far code any row it is not
    nearest to)."""
    z, codebook = randn((40, 8), 5), randn((100, 8), 6)
    clean = vq_quantize(z, codebook, metric=metric)
    far = codebook.clone()
    far[33] *= 1e30
    if metric == "l2":
        keep = clean != 33
        assert torch.equal(vq_quantize(z, far, metric=metric)[keep], clean[keep])
    far[61] *= 1e-30
    wild = z.clone()
    wild[17] *= 1e30
    got = vq_quantize(wild, far, metric=metric)
    assert_nearest(wild, far, got, metric)
    others = torch.arange(40, device=DEVICE) != 17
    assert torch.equal(got[others], vq_quantize(z, far, metric=metric)[others])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vq_non_finite_rule(backend, metric, dtype):
    """NaN / Inf are not checked (no host sync): a row holding one gets -1, which vq_lookup turns
    into NaN; a code holding one is never picked; a codebook of such codes gives -1 everywhere."""
    z, codebook = randn((30, 6), 7, dtype), randn((50, 6), 8, dtype)
    clean = vq_quantize(z, codebook, metric=metric)
    z[2, 0], z[4, 5], z[6] = NAN, INF, -INF
    codebook[clean[10], 3] = NAN
    codebook[clean[11], 0] = -INF
    got = vq_quantize(z, codebook, metric=metric)
    assert torch.equal(got, vq_reference.vq_quantize(z, codebook, metric))
    assert got[[2, 4, 6]].tolist() == [-1, -1, -1] and (got[:2] >= 0).all()
    assert not torch.isin(got, clean[[10, 11]]).any()
    vectors = vq_lookup(got, codebook)
    assert torch.equal(vectors.isnan().all(-1), got == -1)
    assert (vq_quantize(z, torch.full_like(codebook, NAN), metric=metric) == -1).all()
    assert (vq_quantize(z, torch.full_like(codebook, INF), metric=metric) == -1).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@HYPOTHESIS
@given(shift=st.integers(-100, 100), seed=st.integers(0, 2**16))
def test_vq_power_of_two_scaling_is_exact(backend, metric, shift, seed):
    """Scaling both sides by 2**shift changes nothing (the kernels compute on exactly scaled
    values; cosine only while the vectors stay longer than F.normalize's eps 1e-12)."""
    if metric == "cosine":
        shift = max(shift, -25)
    z, codebook = randn((20, 5), seed), randn((40, 5), seed + 1)
    factor = 2.0 ** shift
    scaled = vq_quantize(z * factor, codebook * factor, metric=metric)
    assert torch.equal(scaled, vq_quantize(z, codebook, metric=metric))


def emulate_cuda_small_d(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """csrc/vq.cu's arithmetic in fp32 on the CPU: row scales s from part_dist, s z by one fp32
    multiply, diff = fmaf(-s, e, s z), dist = fmaf(diff, diff, dist) over j in order, a strict <
    over codes in order from +inf, then the caller's combine (-1 for an infinite best)."""
    s = vq._cuda_row_scales(z, codebook).double()
    zs = (z.double() * s[:, None]).float().double()
    diff = (zs[:, None, :] - s[:, None, None] * codebook.double()[None]).float().double()  # one rounding
    dist = torch.zeros(diff.shape[:2], dtype=torch.float64)
    for j in range(diff.shape[-1]):
        dist = (diff[..., j] * diff[..., j] + dist).float().double()
    dist = dist.float().masked_fill(dist.isnan(), INF)  # NaN never passes the strict <
    best, idx = dist.min(-1)  # first minimum, as the in-order strict <
    return vq._combine_splits(best[None], idx[None])


@pytest.mark.skipif(HAS_GPU, reason="a model of the CUDA kernel for machines that cannot run it")
@pytest.mark.parametrize("case", ["huge", "tiny", "outliers", "non_finite", "cosine_huge"])
def test_vq_cuda_kernel_arithmetic_model(case):
    z, codebook = randn((40, 4), 9), randn((300, 4), 10)
    metric = "l2"
    if case in ("huge", "cosine_huge"):
        z, codebook = z * 1e30, codebook * 1e30
    elif case == "tiny":
        z, codebook = z * 1e-33, codebook * 1e-33
    elif case == "outliers":
        z[3] *= 1e35
        codebook[7] *= 1e35
        codebook[8] *= 1e-35
    else:
        z[1, 2], z[5, 0] = NAN, INF
        codebook[11, 1], codebook[12, 3] = NAN, -INF
    if case == "cosine_huge":  # the CUDA cosine path: normalised fp32 copies, then the l2 kernel
        metric = "cosine"
        got = emulate_cuda_small_d(vq._normalized(z), vq._normalized(codebook))
    else:
        got = emulate_cuda_small_d(z, codebook)
    assert_nearest(z, codebook, got, metric)


# ---- sample_tokens --------------------------------------------------------------------------------

@pytest.mark.parametrize("logits, temperature", [
    ([50.0, 40.0], 1e-37),  # 50 * 1e37 overflowed to inf, tying with 40 * 1e37
    ([3e38, -3e38], 0.5),
    ([3e38, 2.9e38], 0.5),
    ([-3e38, 3.3e38, 3.4e38, -INF], 1e-30),
])
def test_sampling_does_not_overflow(logits, temperature):
    row = torch.tensor(logits, device=DEVICE)
    want = int(row.argmax())
    tokens = sample_tokens(row.expand(2000, -1), temperature=temperature, generator=device_generator(1))
    assert (tokens == want).all()
    guided = torch.cat([row.expand(500, -1), (row.flip(0) * 0.5).expand(500, -1)])  # [cond; uncond]
    tokens = sample_tokens(guided, temperature=temperature, cfg_scale=1.0, generator=device_generator(2))
    assert (tokens == want).all()


def test_sampling_huge_logits_keep_their_distribution():
    """Logits near fp32's limit a few units apart: the same distribution as the same gaps near 0."""
    gaps = torch.tensor([0.0, -1.0, -2.0, -40.0], dtype=torch.float64)
    near_top = (torch.tensor(3e38, dtype=torch.float64) + gaps * 2.0**104).float()  # ulp(3e38) = 2**104
    tokens = sample_tokens(near_top.to(DEVICE).expand(20000, -1), temperature=2.0**104,
                           generator=device_generator(3))
    freq = torch.bincount(tokens.cpu(), minlength=4).double() / 20000
    assert (freq - torch.softmax(gaps, 0)).abs().max() < 0.02 and freq[3] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("options", [dict(), dict(temperature=0), dict(top_k=2), dict(top_p=0.3),
                                     dict(temperature=1e-30)])
def test_sampling_nan_rule(options, dtype):
    """NaN (in the logits or from guidance) is never returned, on every device and with no host
    check; a row with no non-NaN logit in its block gives -1 (greedy too)."""
    logits = torch.tensor([[NAN, 1.0, NAN, 0.5], [NAN, NAN, NAN, NAN], [NAN, -INF, NAN, -INF], [INF, 2.0, NAN, INF]],
                          device=DEVICE, dtype=dtype).repeat(300, 1)
    tokens = sample_tokens(logits, generator=device_generator(4), **options).view(300, 4)
    assert set(tokens[:, 0].tolist()) <= {1, 3} and (tokens[:, 1] == -1).all()
    assert set(tokens[:, 2].tolist()) <= {1, 3} and set(tokens[:, 3].tolist()) <= {0, 3}
    if options.get("temperature") == 0:
        assert tokens[0].tolist() == [1, -1, 1, 0]
    assert (sample_tokens(logits, vocab_range=(1, 3), **options).view(300, 4)[:, 1] == -1).all()
    # guidance of opposite infinities is NaN: never sampled
    cond = torch.tensor([[INF, 0.0, 1.0]], device=DEVICE).expand(200, -1)
    uncond = torch.tensor([[-INF, 0.0, 1.0]], device=DEVICE).expand(200, -1)
    tokens = sample_tokens(torch.cat([cond, uncond]), cfg_scale=3.0, generator=device_generator(5),
                           **options)
    assert (tokens != 0).all()


FP32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)


@HYPOTHESIS
@given(values=st.lists(st.one_of(FP32, st.sampled_from([NAN, INF, -INF, 3.4e38, -3.4e38])), min_size=1, max_size=12),
       temperature=st.sampled_from([0.0, 1e-38, 1e-20, 0.3, 1.0, 7.0, 1e30]), top_k=st.sampled_from([None, 1, 3]),
       top_p=st.sampled_from([None, 0.5, 1e-9]), seed=st.integers(0, 2**16))
def test_sampling_property_candidates_only(values, temperature, top_k, top_p, seed):
    row = torch.tensor(values, dtype=torch.float32)
    tokens = sample_tokens(row.expand(64, -1).to(DEVICE), temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=device_generator(seed)).cpu()
    if row.isnan().all():
        assert (tokens == -1).all()
        return
    assert ((tokens >= 0) & (tokens < len(values))).all() and not row[tokens].isnan().any()
    finite_top = row.masked_fill(row.isnan(), -INF).max()
    if finite_top > -INF:
        assert (row[tokens] > -INF).all()  # a finite or +inf candidate exists: -inf weighs 0


@HYPOTHESIS
@given(values=st.lists(st.one_of(st.just(0.0), st.floats(2.0**-66, FLT_MAX, width=32),
                                 st.floats(-FLT_MAX, -(2.0**-66), width=32)), min_size=2, max_size=10, unique=True),
       temperature=st.sampled_from([3e-39, 1e-37, 1e-30]))
def test_sampling_property_tiny_temperature_is_greedy(values, temperature):
    """Distinct fp32 logits of magnitude 0 or >= 2**-66 (~1.4e-20), so at least ~2**-89 apart: at
    temperature 1e-30 or below every gap weighs exp(-1e3) or less, so sampling is the argmax."""
    row = torch.tensor(values, dtype=torch.float32).to(DEVICE)
    tokens = sample_tokens(row.expand(32, -1), temperature=temperature, generator=device_generator(6))
    assert (tokens == int(row.argmax())).all()


def test_sampling_reference_weights_stay_finite():
    g = torch.tensor([[3.4e38, -3.4e38, 0.0, -INF, INF], [-INF, -INF, NAN, -INF, NAN]])
    z = sampling_reference.tempered_logits(g, 1e38)
    assert z[0].tolist() == [-INF, -INF, -INF, -INF, 0.0] and z[1, [0, 1, 3]].tolist() == [0.0, 0.0, 0.0]
    q = sampling_reference.fixed_point_weights(z)
    assert q[0].tolist() == [0, 0, 0, 0, 2**40] and q[1].tolist() == [2**40, 2**40, 0, 2**40, 0]


# ---- VectorQuantizer --------------------------------------------------------------------------------

def quantizer(metric="l2", **kwargs):
    vq_layer = VectorQuantizer(20, 8, metric=metric, **kwargs).to(DEVICE)
    with torch.no_grad():
        vq_layer.codebook.copy_(randn((20, 8), 11))
    return vq_layer


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_quantizer_empty_input(backend, metric, shape):
    layer = quantizer(metric)
    z = torch.zeros(shape, device=DEVICE, requires_grad=True)
    out = layer(z)
    assert out.loss.item() == 0 and out.codebook_loss.item() == 0 and out.commitment_loss.item() == 0
    assert out.perplexity.item() == 1 and out.codes_used.item() == 0 and out.indices.shape == shape[:-1]
    out.loss.backward()
    assert (layer.codebook.grad == 0).all() and z.grad.shape == shape


@pytest.mark.parametrize("call, error, match", [
    (lambda: VectorQuantizer(20.0, 8), TypeError, "num_codes must be an int"),
    (lambda: VectorQuantizer(20, True), TypeError, "code_dim must be an int"),
    (lambda: VectorQuantizer(20, 8, dead_after=1.5), TypeError, "dead_after must be an int"),
    (lambda: VectorQuantizer(20, 8, beta=NAN), ValueError, "beta must be finite"),
    (lambda: VectorQuantizer(20, 8, beta=INF), ValueError, "beta must be finite"),
    (lambda: VectorQuantizer(20, 8, beta="0.25"), TypeError, "beta must be a real number"),
    (lambda: VectorQuantizer(20, 8, metric=None), ValueError, "metric must be one of"),
    (lambda: quantizer("cosine")(torch.ones(3, 8, dtype=torch.long, device=DEVICE)), TypeError,
     "z must be a floating tensor"),
    (lambda: quantizer()(torch.ones(3, 8, dtype=torch.long, device=DEVICE)), TypeError, "z must be a floating tensor"),
    (lambda: quantizer()([0.0] * 8), TypeError, "z must be a torch.Tensor"),
    (lambda: quantizer().reset_dead_codes(torch.randn(4, 16, device=DEVICE)), ValueError, r"z must be \[\.\.\., 8\]"),
    (lambda: quantizer().reset_dead_codes(torch.randn(4, 3, device=DEVICE)), ValueError, r"z must be \[\.\.\., 8\]"),
    (lambda: quantizer().reset_dead_codes(torch.randn(4, 8, device=DEVICE), generator=7), TypeError, "generator"),
])
def test_quantizer_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_quantizer_non_finite_and_huge_input(backend, metric):
    """A NaN / Inf vector gets -1, a NaN quantized row, NaN losses, and no usage; the other
    vectors are as without it. Magnitudes past fp32's squares quantize like the unscaled ones."""
    layer = quantizer(metric)
    z = randn((12, 8), 12)
    clean = layer(z)
    dirty = z.clone()
    dirty[4, 1], dirty[9, 0] = NAN, -INF
    out = layer(dirty)
    keep = torch.ones(12, dtype=torch.bool, device=DEVICE)
    keep[[4, 9]] = False
    assert out.indices[[4, 9]].tolist() == [-1, -1] and torch.equal(out.indices[keep], clean.indices[keep])
    assert out.quantized[~keep].isnan().all() and torch.equal(out.quantized[keep], clean.quantized[keep])
    assert out.loss.isnan() and out.codes_used.item() == clean.indices[keep].unique().numel()
    scaled = quantizer(metric)
    with torch.no_grad():
        scaled.codebook.mul_(1e20 if metric == "l2" else 1.0)
    assert torch.equal(scaled(z * 1e20).indices, clean.indices)


# ---- DiffusionHead -----------------------------------------------------------------------------------

def head(seed=0):
    torch.manual_seed(seed)
    h = DiffusionHead(4, 8, 16, 1).to(DEVICE)
    with torch.no_grad():  # MAR zero-initialises the output layers: give every weight a value
        for p in h.parameters():
            p.copy_(torch.randn(p.shape, generator=seeded(seed + p.numel())) * 0.3 / math.sqrt(max(1, p.shape[-1])))
    return h


def test_diffusion_loss_empty_is_zero_with_zero_gradients():
    h = head()
    for mask in (None, torch.zeros(0, dtype=torch.bool, device=DEVICE)):
        h.zero_grad(set_to_none=True)
        loss = h.loss(torch.zeros(0, 8, device=DEVICE), torch.zeros(0, 4, device=DEVICE), mask=mask)
        assert loss.item() == 0
        loss.backward()
        assert all(p.grad is not None and (p.grad == 0).all() for p in h.parameters())
    h.zero_grad(set_to_none=True)
    cond, target = torch.randn(3, 8, device=DEVICE), torch.randn(3, 4, device=DEVICE)
    loss = h.loss(cond, target, mask=torch.zeros(3, device=DEVICE))  # no row kept
    loss.backward()
    assert loss.item() == 0 and all((p.grad == 0).all() for p in h.parameters())


def test_diffusion_loss_nan_propagates_to_what_depends_on_it():
    h = head()
    cond, target = randn((6, 8), 13), randn((6, 4), 14)
    target[2, 1] = NAN
    cond[4, 0] = INF
    gen = lambda: torch.Generator(DEVICE).manual_seed(15)
    assert h.loss(cond, target, generator=gen()).isnan()  # kept rows: the mean depends on them
    mask = torch.tensor([1, 1, 0, 1, 0, 1], device=DEVICE)
    loss = h.loss(cond, target, mask=mask, generator=gen())
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in h.parameters())
    clean_cond, clean_target = cond.clone(), target.clone()
    clean_cond[[2, 4]], clean_target[[2, 4]] = 0.0, 0.0
    assert loss.item() == h.loss(clean_cond, clean_target, mask=mask, generator=gen()).item()


@pytest.mark.parametrize("call, error, match", [
    (lambda h: h.sample(torch.randn(2, 8), cfg_scale=NAN), ValueError, "cfg_scale must be finite"),
    (lambda h: h.sample(torch.randn(2, 8), cfg_scale=INF), ValueError, "cfg_scale must be finite"),
    (lambda h: h.sample(torch.randn(2, 8), cfg_scale="2"), TypeError, "cfg_scale must be a real number"),
    (lambda h: h.sample(torch.randn(2, 8), temperature=NAN), ValueError, "temperature must be finite"),
    (lambda h: h.sample(torch.randn(2, 8), temperature=INF), ValueError, "temperature must be finite"),
    (lambda h: h.sample(torch.randn(2, 8), temperature=-0.5), ValueError, "temperature must be >= 0"),
    (lambda h: h.sample(torch.randn(2, 8), temperature=None), TypeError, "temperature must be a real number"),
    (lambda h: h.sample(torch.randn(2, 8), clip_denoised=NAN), ValueError, "clip_denoised must be finite"),
    (lambda h: h.sample(torch.randn(2, 8), clip_denoised=True), TypeError, "clip_denoised must be a real number"),
    (lambda h: h.sample(torch.randn(2, 8), num_steps=True), TypeError, "num_steps must be an int"),
    (lambda h: h.sample(torch.randn(2, 8), num_steps=2.0), TypeError, "num_steps must be an int"),
    (lambda h: h.sample(torch.randn(2, 8), num_steps=2, noise=torch.zeros(3, 2, 4, dtype=torch.long)), TypeError,
     "noise must be a floating tensor"),
    (lambda h: h.loss(torch.randn(2, 8), torch.ones(2, 4, dtype=torch.long)), TypeError, "target must be a floating"),
    (lambda h: h.loss(torch.randn(2, 8), [[0.0] * 4] * 2), TypeError, "target must be a torch.Tensor"),
    (lambda h: h.loss(torch.randn(2, 8), torch.randn(2, 4), mask=[1, 0]), TypeError, "mask must be a torch.Tensor"),
    (lambda h: h.loss(torch.randn(2, 8), torch.randn(2, 4), batch_mul=True), TypeError, "batch_mul must be an int"),
    (lambda h: DiffusionHead(4.0, 8, 16, 1), TypeError, "token_dim must be an int"),
    (lambda h: diffusion.sample_loop(h.net, h.net.kernel_weights(), h.schedule, torch.randn(2, 8),
                                     torch.randn(3, 2, 4), num_steps=2, cfg_scale=NAN, temperature=1.0), ValueError,
     "cfg_scale must be finite"),
])
def test_diffusion_bad_scalars(call, error, match):
    with pytest.raises(error, match=match):
        call(DiffusionHead(4, 8, 16, 1))


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_diffusion_sample_nan_stays_in_its_row(backend, cfg_scale):
    """NaN in a cond row (or its uncond row) or in a noise row makes that token NaN and no other."""
    h = head()
    rows, steps = 5, 3
    cond = randn((rows * (2 if cfg_scale != 1 else 1), 8), 16)
    noise = randn((steps + 1, rows, 4), 17)
    clean = h.sample(cond, num_steps=steps, cfg_scale=cfg_scale, noise=noise)
    cond[1, 3] = NAN
    cond[-1, 0] = INF  # the last uncond row with guidance, the last row without
    noise[2, 3, 1] = NAN
    got = h.sample(cond, num_steps=steps, cfg_scale=cfg_scale, noise=noise)
    bad = torch.tensor([False, True, False, True, True], device=DEVICE)
    assert (~torch.isfinite(got[bad])).any(-1).all() and torch.isfinite(got[~bad]).all()
    torch.testing.assert_close(got[~bad], clean[~bad], rtol=0, atol=0)
    assert h.sample(cond[:0], num_steps=steps).shape == (0, 4)


def test_regression_head_same_rules():
    """DiffusionHead's sibling follows the same rules: empty loss 0 with zero gradients, dropped
    rows' NaN reaches nothing, cfg_scale must be finite."""
    h = RegressionHead(4, 8).to(DEVICE)
    loss = h.loss(torch.zeros(0, 8, device=DEVICE), torch.zeros(0, 4, device=DEVICE))
    loss.backward()
    assert loss.item() == 0 and all((p.grad == 0).all() for p in h.parameters())
    h.zero_grad(set_to_none=True)
    cond, target = randn((3, 8), 18), randn((3, 4), 19)
    target[1] = NAN
    assert h.loss(cond, target).isnan()
    loss = h.loss(cond, target, mask=torch.tensor([True, False, True], device=DEVICE))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in h.parameters())
    with pytest.raises(ValueError, match="cfg_scale must be finite"):
        h.sample(torch.randn(2, 8, device=DEVICE), cfg_scale=NAN)
    with pytest.raises(TypeError, match="target must be a floating tensor"):
        h.loss(cond, target.long())


def mar_space_timesteps(num_timesteps: int, spacing: str) -> list[int]:
    """MAR's sampling steps, recomputed from its rule (ADM's respacing, which MAR calls with the
    step count as a string): split the schedule into equal sections (one here), and in each take
    ``section_count`` steps at ``round(cursor)`` with a float cursor starting at 0 and advanced by
    ``(size - 1) / (section_count - 1)`` after every step (a stride of 1 for one step)."""
    counts = [int(part) for part in spacing.split(",")]
    base, rest = divmod(num_timesteps, len(counts))
    chosen, offset = set(), 0
    for section, count in enumerate(counts):
        size = base + (section < rest)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cursor = 0.0
        for _ in range(count):
            chosen.add(offset + round(cursor))
            cursor += stride
        offset += size
    return sorted(chosen)


def test_diffusion_respacing_matches_mar_for_every_step_count():
    unrounded = 0
    for count in range(1, 1001):
        want = mar_space_timesteps(1000, str(count))
        assert diffusion.spaced_timesteps(1000, count) == want, count
        stride = 999 / (count - 1) if count > 1 else 1
        unrounded += [round(i * stride) for i in range(count)] != want
    assert unrounded == 278  # the counts where round(i * stride) drifts from MAR's table (21: 500 vs 499)
    timesteps, _ = diffusion.DiffusionSchedule(1000).sampling_tables(21, DEVICE)
    assert timesteps.tolist() == mar_space_timesteps(1000, "21") and 499 in timesteps.tolist()
    for train_steps in (50, 250, 4000):
        for count in (1, 2, 7, 21, 49, train_steps):
            assert diffusion.spaced_timesteps(train_steps, count) == mar_space_timesteps(train_steps, str(count))

