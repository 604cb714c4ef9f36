"""sample_tokens: the reference's rules by construction, its distribution, bad input; on a GPU the
CUDA kernel against the reference token for token, and inside a CUDA graph."""

import importlib

import pytest
import torch

from unimm import _ext
from unimm.kernels import BackendUnavailable, dispatch, sample_tokens
from unimm.kernels.reference import sampling as reference
from unimm.testing import DEVICE, seeded


def random(shape, seed, dtype=torch.float32, scale=1.0, device=DEVICE):
    # drawn on DEVICE with a generator of DEVICE (torch refuses a CUDA generator for CPU draws)
    return (torch.randn(shape, generator=device_generator(seed), device=DEVICE) * scale).to(device, dtype)


def device_generator(seed):
    return torch.Generator(device=DEVICE).manual_seed(seed)


def exact_probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """float64 probabilities of one row after temperature, top-k and top-p, renormalised."""
    z = logits.double() / temperature
    p = torch.softmax(z, -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k is not None and top_k < len(z):
        keep &= z >= z.topk(top_k).values[-1]
    if top_p is not None:
        masses = torch.where(keep, p, torch.zeros_like(p))
        order = masses.argsort(descending=True)
        running = masses[order].cumsum(0) / masses.sum()
        size = int((running < top_p - 1e-12).sum()) + 1
        keep &= z >= z[order[size - 1]]
    p = torch.where(keep, p, torch.zeros_like(p))
    return p / p.sum()


# ---- rules by construction ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_is_argmax(dtype):
    logits = random((7, 300), 1, dtype, scale=3)
    assert torch.equal(sample_tokens(logits, temperature=0), logits.float().argmax(-1))
    assert torch.equal(sample_tokens(logits, temperature=0, top_k=3, top_p=0.1), logits.float().argmax(-1))
    block = sample_tokens(logits, temperature=0, vocab_range=(50, 120))
    assert torch.equal(block, 50 + logits[:, 50:120].float().argmax(-1))


def test_greedy_ties_go_to_lowest_index():
    logits = torch.zeros(3, 10, device=DEVICE)
    logits[0, [2, 5, 7]] = 1.0
    logits[1, [9, 4]] = float("inf")
    logits[2] = float("-inf")  # a fully masked row: its first id
    assert sample_tokens(logits, temperature=0).tolist() == [2, 4, 0]
    assert sample_tokens(logits, temperature=0, vocab_range=(3, 10)).tolist() == [5, 4, 3]


def test_top_k_one_and_tiny_top_p_are_argmax():
    logits = random((64, 500), 2, scale=2)
    want = logits.argmax(-1)
    for seed in range(3):
        assert torch.equal(sample_tokens(logits, top_k=1, generator=device_generator(seed)), want)
        assert torch.equal(sample_tokens(logits, top_p=1e-9, generator=device_generator(seed)), want)
        assert torch.equal(sample_tokens(logits, temperature=5.0, top_k=50, top_p=1e-9,
                                         generator=device_generator(seed)), want)


def test_vocab_range_confines_ids():
    logits = torch.zeros(4096, 100, device=DEVICE)
    logits[:, :30] = 50.0  # the most likely tokens lie outside the block
    tokens = sample_tokens(logits, vocab_range=(40, 47), generator=device_generator(3))
    assert tokens.min() >= 40 and tokens.max() < 47
    assert set(tokens.tolist()) == set(range(40, 47))  # uniform over the block: all show up


def test_cfg_scale_one_samples_the_cond_half():
    # Multiples of 1/64 in a small range: u + 1 * (c - u) == c exactly in fp32.
    gen = seeded(4)
    cond = torch.randint(-512, 512, (16, 200), generator=gen).float().div(64).to(DEVICE)
    uncond = torch.randint(-512, 512, (16, 200), generator=gen).float().div(64).to(DEVICE)
    options = dict(temperature=0.8, top_k=40, top_p=0.9, vocab_range=(5, 180))
    guided = sample_tokens(torch.cat([cond, uncond]), cfg_scale=1.0, generator=device_generator(5), **options)
    assert torch.equal(guided, sample_tokens(cond, generator=device_generator(5), **options))


def test_guidance_formula():
    cond, uncond = random((6, 400), 6, scale=2), random((6, 400), 7, scale=2)
    cond[:, :3] = uncond[:, :3] = float("-inf")  # masked in both halves: stays masked
    scale = 2.5
    guided = reference.guided_logits(torch.cat([cond, uncond]), cfg_scale=scale)
    want = uncond.double() + scale * (cond.double() - uncond.double())
    assert guided.dtype == torch.float32 and guided.shape == (6, 400)
    assert (guided[:, :3] == float("-inf")).all()
    torch.testing.assert_close(guided[:, 3:].double(), want[:, 3:], rtol=1e-6, atol=1e-5)
    # Sampling with guidance is sampling the guided logits.
    options = dict(temperature=1.2, top_k=100, top_p=0.8)
    with_cfg = sample_tokens(torch.cat([cond, uncond]), cfg_scale=scale, generator=device_generator(8), **options)
    assert torch.equal(with_cfg, sample_tokens(guided, generator=device_generator(8), **options))
    assert (with_cfg >= 3).all()


def test_reproducible_with_generator():
    logits = random((32, 1000), 9)
    first = sample_tokens(logits, top_p=0.95, generator=device_generator(10))
    assert torch.equal(first, sample_tokens(logits, top_p=0.95, generator=device_generator(10)))
    assert not torch.equal(first, sample_tokens(logits, top_p=0.95, generator=device_generator(11)))
    torch.manual_seed(12)
    default = sample_tokens(logits)
    torch.manual_seed(12)
    assert torch.equal(default, sample_tokens(logits))


def test_strided_rows_and_empty():
    wide = random((6, 333), 13)
    rows = wide[::2, 7:300]  # row stride 666, offset start
    want = sample_tokens(rows.contiguous(), top_k=20, generator=device_generator(14))
    assert torch.equal(sample_tokens(rows, top_k=20, generator=device_generator(14)), want)
    assert sample_tokens(wide[:0]).shape == (0,)
    assert sample_tokens(wide[:0], cfg_scale=3.0).shape == (0,)


# ---- distribution -------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, None, None), (0.7, None, None), (1.5, 4, None), (1.0, None, 0.75), (1.3, 5, 0.6), (1.0, 2, 0.999),
])
def test_frequencies_match_renormalised_softmax(temperature, top_k, top_p):
    row = torch.tensor([1.2, -0.3, 0.8, 2.0, -1.5, 0.1, 1.9])
    draws = 40_000
    tokens = sample_tokens(row.expand(draws, -1).to(DEVICE), temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=device_generator(15))
    freq = torch.bincount(tokens.cpu(), minlength=len(row)).double() / draws
    want = exact_probabilities(row, temperature, top_k, top_p)
    assert (freq[want == 0] == 0).all()
    assert (freq - want).abs().max() < 0.012  # ~5 standard deviations at p = 1/2


def test_top_p_keeps_ties_at_the_edge():
    row = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0, 3.0]])
    # The three 3.0 tokens hold ~0.9 of the mass; top_p 0.5 cuts inside the tie, which stays whole.
    tokens = sample_tokens(row.expand(3000, -1).to(DEVICE), top_p=0.5, generator=device_generator(16))
    assert set(tokens.tolist()) == {0, 2, 5}
    tokens = sample_tokens(row.expand(3000, -1).to(DEVICE), top_k=2, generator=device_generator(17))
    assert set(tokens.tolist()) == {0, 2, 5}


def test_extreme_logits():
    huge = torch.tensor([[1e4, -1e4, 0.0, float("-inf"), 9900.0]]).expand(4000, -1).to(DEVICE)
    tokens = sample_tokens(huge, generator=device_generator(18))
    assert (tokens == 0).all()  # the others weigh below 2^-41 of it: exactly 0
    tokens = sample_tokens(huge, temperature=1e4, generator=device_generator(19))
    freq = torch.bincount(tokens.cpu(), minlength=5).double() / 4000
    assert freq[3] == 0 and (freq - exact_probabilities(huge[0].cpu(), 1e4)).abs().max() < 0.03
    infinite = torch.tensor([[float("inf"), 5.0, float("inf"), float("-inf")]]).expand(2000, -1).to(DEVICE)
    tokens = sample_tokens(infinite, top_k=3, generator=device_generator(20))
    assert set(tokens.tolist()) == {0, 2}  # +inf logits share all the mass
    masked = torch.full((2000, 5), float("-inf"), device=DEVICE)
    assert set(sample_tokens(masked, vocab_range=(1, 4), generator=device_generator(21)).tolist()) == {1, 2, 3}


def test_fixed_point_weights_are_exact_probabilities():
    z = torch.tensor([[0.0, -1.0, -30.0, float("-inf"), -5.5]])
    q = reference.fixed_point_weights(z)
    assert q[0, 0] == 2**40 and q[0, 2] == 0 and q[0, 3] == 0
    assert q[0, 1] == round(float(torch.exp(torch.tensor(-1.0))) * 2**40)
    assert reference.nucleus_need(0.5, torch.tensor([7])).item() == 4
    assert reference.nucleus_need(1e-30, torch.tensor([7])).item() == 1


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, options, error, match", [
    (lambda x: x.tolist(), {}, TypeError, "logits must be a torch.Tensor"),
    (lambda x: x.long(), {}, TypeError, "logits must be float32"),
    (lambda x: x.double(), {}, TypeError, "logits must be float32"),
    (lambda x: x[0], {}, ValueError, "logits must be 2-D"),
    (lambda x: x[:, :0], {}, ValueError, "empty vocab"),
    (lambda x: x, {"temperature": -0.5}, ValueError, "temperature must be finite and >= 0"),
    (lambda x: x, {"temperature": float("nan")}, ValueError, "temperature must be finite"),
    (lambda x: x, {"temperature": 1e-45}, ValueError, "temperature .* is too small"),
    (lambda x: x, {"temperature": "1"}, TypeError, "temperature must be a real number"),
    (lambda x: x, {"top_k": 0}, ValueError, "top_k must be >= 1"),
    (lambda x: x, {"top_k": 2.0}, TypeError, "top_k must be an int"),
    (lambda x: x, {"top_k": True}, TypeError, "top_k must be an int"),
    (lambda x: x, {"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    (lambda x: x, {"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
    (lambda x: x, {"top_p": "0.9"}, TypeError, "top_p must be a real number"),
    (lambda x: x, {"vocab_range": (5, 5)}, ValueError, "vocab_range must be"),
    (lambda x: x, {"vocab_range": (-1, 5)}, ValueError, "vocab_range must be"),
    (lambda x: x, {"vocab_range": (0, 21)}, ValueError, "vocab_range must be"),
    (lambda x: x, {"vocab_range": (0.0, 5)}, TypeError, "vocab_range must be a pair of ints"),
    (lambda x: x, {"vocab_range": (0, 5, 9)}, TypeError, "vocab_range must be a pair of ints"),
    (lambda x: x[:3], {"cfg_scale": 2.0}, ValueError, "even row count"),
    (lambda x: x, {"cfg_scale": float("inf")}, ValueError, "cfg_scale must be finite"),
    (lambda x: x, {"cfg_scale": "2"}, TypeError, "cfg_scale must be a real number"),
    (lambda x: x, {"generator": 3}, TypeError, "generator must be a torch.Generator"),
    (lambda x: x.to("meta"), {"generator": torch.Generator()}, ValueError, "generator is on cpu"),
])
def test_bad_input(make, options, error, match):
    with pytest.raises(error, match=match):
        sample_tokens(make(random((4, 20), 30)), **options)


def test_nan_is_never_sampled():
    """No host check on any device: a NaN logit is never returned, a row of NaN only gives -1."""
    logits = random((4, 20), 31)
    logits[2, 7] = float("nan")
    logits[3] = float("nan")
    logits[3, 19] = float("-inf")  # the only candidate of row 3
    for options in [dict(), dict(temperature=0), dict(top_k=3, top_p=0.5), dict(temperature=50.0)]:
        tokens = sample_tokens(logits.expand(4, -1).repeat(50, 1), generator=device_generator(32), **options)
        assert (tokens.view(50, 4)[:, 2] != 7).all() and (tokens.view(50, 4)[:, 3] == 19).all()
    logits[3, 19] = float("nan")
    assert sample_tokens(logits, generator=device_generator(33))[3] == -1
    assert sample_tokens(logits, temperature=0)[3] == -1


def test_forced_cuda_on_cpu_fails_loudly(monkeypatch):
    monkeypatch.setenv("UNIMM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="sample_tokens"):
        sample_tokens(random((2, 10), 33, device="cpu"))
    monkeypatch.setenv("UNIMM_BACKEND", "triton")
    if dispatch.backend_unavailable("triton", torch.device("cpu")) is not None:
        with pytest.raises(BackendUnavailable, match="sample_tokens"):
            sample_tokens(random((2, 10), 33, device="cpu"))


# ---- Triton kernel (the interpreter on the CPU) ---------------------------------------------------

def _triton_live():
    why = dispatch.backend_unavailable("triton", torch.device(DEVICE))
    if why is not None:
        pytest.skip(why)


def _forced(monkeypatch, backend, *args):
    monkeypatch.setenv("UNIMM_BACKEND", backend)
    try:
        return _op(*args)
    finally:
        monkeypatch.delenv("UNIMM_BACKEND")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_matches_reference_token_for_token(monkeypatch, dtype):
    """Every rule combination at odd sizes, with -inf, NaN and ties, one uniform per row: the
    Triton kernel returns the reference's token on every row (the CPU has one exp)."""
    _triton_live()
    gen = seeded(50)
    shapes = [(6, 1), (10, 37), (14, 300), (2, 129), (8, 1000)] if dtype == torch.float32 else [(10, 37), (8, 1000)]
    for case, (rows, vocab) in enumerate(shapes):
        logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype)
        if case % 2:
            logits = logits.float().round().to(dtype)  # ties at every threshold
        logits[:, ::7] = float("-inf")
        logits[0, vocab // 2] = float("nan")
        logits[1, :] = float("nan")  # no candidate: -1
        logits = logits.to(DEVICE)
        lo = vocab // 5
        for temperature, top_k, top_p, cfg_scale in [(1.0, None, None, None), (0.7, 5, None, 2.5),
                                                     (1.3, None, 0.8, None), (0.9, 17, 0.5, 1.5),
                                                     (0.0, None, None, 3.0), (2.0, 1, 0.3, None),
                                                     (1e-37, None, None, None), (1e30, 40, 0.9, 4.0)][::1 + case % 2]:
            out_rows = rows // 2 if cfg_scale else rows
            uniforms = torch.rand(out_rows, generator=gen).to(DEVICE)
            args = (logits, uniforms, temperature, top_k, top_p, (lo, vocab), cfg_scale)
            want = reference.sample_tokens(logits, uniforms, temperature=temperature,
                                           top_k=min(top_k or vocab, vocab - lo), top_p=top_p or 1.0,
                                           vocab_range=(lo, vocab), cfg_scale=cfg_scale)
            got = _forced(monkeypatch, "triton", *args)
            assert torch.equal(got, want), (case, temperature, top_k, top_p, cfg_scale)


def test_triton_writes_every_row_of_a_strided_view(monkeypatch):
    _triton_live()
    wide = random((9, 301), 51)
    rows = wide[::2, 5:290]  # row stride 602, offset start
    uniforms = torch.rand(5, generator=device_generator(52), device=DEVICE)
    want = reference.sample_tokens(rows, uniforms, top_k=20, top_p=0.9, vocab_range=(0, 285))
    assert torch.equal(_forced(monkeypatch, "triton", rows, uniforms, 1.0, 20, 0.9, (0, 285), None), want)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_extreme_temperature_and_logits_do_not_overflow(monkeypatch, backend):
    """(40 - 50) / 1e-37 and 3e38 - (-3e38) leave fp32's range: the maximum is subtracted first, so
    the largest logit takes all the mass instead of a NaN or a coin toss."""
    if backend == "triton":
        _triton_live()
    monkeypatch.setenv("UNIMM_BACKEND", backend)
    rows = 64
    tiny = torch.tensor([[50.0, 40.0]], device=DEVICE).expand(rows, -1)
    assert (sample_tokens(tiny, temperature=1e-37, generator=device_generator(53)) == 0).all()
    assert (sample_tokens(tiny.flip(1), temperature=1e-37, generator=device_generator(54)) == 1).all()
    huge = torch.tensor([[3e38, -3e38], [-3e38, 3e38]], device=DEVICE).repeat(rows, 1)
    tokens = sample_tokens(huge, temperature=0.5, generator=device_generator(55))
    assert torch.equal(tokens, torch.tensor([0, 1], device=DEVICE).repeat(rows))
    tokens = sample_tokens(huge, temperature=1e-37, top_k=1, top_p=0.5, generator=device_generator(56))
    assert torch.equal(tokens, torch.tensor([0, 1], device=DEVICE).repeat(rows))


def test_compile_sees_one_op():
    logits = random((4, 50), 34)
    uniforms = torch.rand(2, generator=device_generator(35)).to(DEVICE)
    for args in [(logits, uniforms, 0.9, 10, 0.8, 3, 40, 1.5), (logits, None, 0.0, 50, 1.0, 0, 50, None)]:
        out = torch.library.opcheck(torch.ops.unimm.sample_tokens.default, args)
        assert all(v == "SUCCESS" for v in out.values())


def test_build_constants_match_the_reference():
    if not _ext.has("sample_tokens"):
        pytest.skip("unimm._C has no sample_tokens")
    assert _ext.lib().SAMPLING_FIXED_POINT_BITS == reference.FIXED_POINT_BITS
    assert _ext.lib().SAMPLING_MAX_BLOCK == reference.MAX_BLOCK


def test_cuda_split_plan(monkeypatch):
    """Several CTAs per row only when rows are few: one wave of one CTA per SM, each CTA at least
    one 8192-token tile, at least 4 CTAs per row or one."""
    kernels = importlib.import_module("unimm.kernels.sampling")
    monkeypatch.setattr(kernels, "multiprocessor_count", lambda device: 132)

    def plan(rows, n):
        return kernels.cuda_splits(rows, n, DEVICE)
    assert plan(1, 161_280) == 20 and plan(2, 262_144) == 32 and plan(1, 2**23) == 132
    assert plan(33, 161_280) == 4 and plan(34, 161_280) == 1 and plan(64, 161_280) == 1
    assert plan(1, 3 * 8192) == 1 and plan(1, 3 * 8192 + 1) == 4 and plan(4096, 100) == 1


# ---- GPU ----------------------------------------------------------------------------------------
#
# Fast tier (`pytest -m gpu`): the CUDA kernel is precompiled and the fp32 reference is a few sorts
# and scans. The tier runs bf16 logits through every rule combination (test_gpu_matches_reference[bf16]),
# the agreement rate and greedy ids, non-finite rows, the raw entry point into poisoned outputs and
# CUDA-graph capture, and the Triton kernel against the reference (its variants compile once); the
# several-CTAs-per-row path at batch 1, 2 and 64 with 161k and 262k vocabularies (precompiled: no
# compile). Full tier (`pytest -m gpu_full`): the same checks with fp32 and fp16 logits.

def _cuda_live():
    if not _ext.has("sample_tokens") or _ext.serves_device(DEVICE) is not None:
        pytest.skip("CUDA sample_tokens not live")


def _op(logits, uniforms, temperature, top_k, top_p, vocab_range, cfg_scale):
    lo, hi = vocab_range
    return torch.ops.unimm.sample_tokens(logits, uniforms, temperature, min(top_k or hi - lo, hi - lo),
                                         1.0 if top_p is None else top_p, lo, hi, cfg_scale)


GPU_CASES = [  # temperature, top_k, top_p, vocab_range, cfg_scale
    (1.0, None, None, None, None), (0.8, 50, None, None, None), (1.0, None, 0.9, None, None),
    (0.7, 4096, 0.95, None, 3.0), (1.3, 1000, 0.5, (128_256, 160_000), None), (1.0, None, 0.99, (3, 150_001), 1.5),
    (1.0, 1, None, None, 7.5), (0.9, 20, 0.8, (77, 32_845), 2.0), (2.0, None, 0.3, None, None),
]
# bf16 logits in the fast tier, the other dtypes in the full one
TIERED_DTYPES = [pytest.param(torch.bfloat16, marks=pytest.mark.gpu, id="bf16"),
                 pytest.param(torch.float32, marks=pytest.mark.gpu_full, id="fp32"),
                 pytest.param(torch.float16, marks=pytest.mark.gpu_full, id="fp16")]


@pytest.mark.parametrize("dtype", TIERED_DTYPES)
@pytest.mark.parametrize("temperature, top_k, top_p, vocab_range, cfg_scale", GPU_CASES)
def test_gpu_matches_reference(monkeypatch, dtype, temperature, top_k, top_p, vocab_range, cfg_scale):
    _cuda_live()
    rows = 32
    for vocab, scale in [(160_000, 4.0), (160_003, 1.5)]:  # 160_003: unaligned rows, scalar loads
        logits = random((rows, vocab), rows + vocab, dtype, scale=scale)
        span = vocab_range or (0, vocab)
        uniforms = torch.rand(rows // 2 if cfg_scale else rows, generator=device_generator(vocab), device=DEVICE)
        want = reference.sample_tokens(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                                       vocab_range=span, cfg_scale=cfg_scale)
        monkeypatch.setenv("UNIMM_BACKEND", "cuda")
        got = _op(logits, uniforms, temperature, top_k, top_p, span, cfg_scale)
        monkeypatch.delenv("UNIMM_BACKEND")
        assert got.dtype == torch.int64 and got.shape == want.shape
        assert ((got >= span[0]) & (got < span[1])).all()
        assert (got != want).sum() <= 1  # a mismatch needs a uniform within float rounding of a CDF edge


@pytest.mark.parametrize("dtype", TIERED_DTYPES)
@pytest.mark.parametrize("temperature, top_k, top_p, vocab_range, cfg_scale", GPU_CASES)
def test_gpu_triton_matches_reference(monkeypatch, dtype, temperature, top_k, top_p, vocab_range, cfg_scale):
    _triton_live()
    rows, vocab = 8, 160_003
    logits = random((rows, vocab), rows + vocab, dtype, scale=3.0)
    span = vocab_range or (0, vocab)
    uniforms = torch.rand(rows // 2 if cfg_scale else rows, generator=device_generator(vocab), device=DEVICE)
    want = reference.sample_tokens(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                                   vocab_range=span, cfg_scale=cfg_scale)
    got = _forced(monkeypatch, "triton", logits, uniforms, temperature, top_k, top_p, span, cfg_scale)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert (got != want).sum() <= 1  # a mismatch needs a uniform within exp's rounding of a CDF edge


@pytest.mark.parametrize("dtype", [TIERED_DTYPES[0], TIERED_DTYPES[1]])
def test_gpu_agreement_rate_and_greedy(monkeypatch, dtype):
    _cuda_live()
    logits = random((512, 32_768), 40, dtype, scale=2.0)
    logits[:, ::97] = float("-inf")
    logits[7] = logits[7].round()  # many ties
    uniforms = torch.rand(256, generator=device_generator(41), device=DEVICE)
    monkeypatch.setenv("UNIMM_BACKEND", "cuda")
    for options in [dict(temperature=1.0, top_k=1000, top_p=0.9, cfg_scale=2.0),
                    dict(temperature=0.5, top_k=None, top_p=0.7, cfg_scale=None)]:
        u = uniforms if options["cfg_scale"] else torch.cat([uniforms, uniforms])
        got = _op(logits, u, options["temperature"], options["top_k"], options["top_p"], (0, 32_768),
                  options["cfg_scale"])
        want = reference.sample_tokens(logits, u, **options)
        assert (got == want).double().mean() >= 0.995
    assert torch.equal(sample_tokens(logits, temperature=0), logits.float().argmax(-1))
    assert torch.equal(sample_tokens(logits, temperature=0, cfg_scale=3.0),
                       reference.sample_tokens(logits, None, temperature=0, cfg_scale=3.0))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_non_finite_rows(monkeypatch, dtype):
    """The library's rule on the CUDA kernel, against the reference: NaN never sampled, a row
    with no non-NaN logit in its block gives -1, every other id inside the block; huge logits
    and tiny temperatures do not overflow."""
    _cuda_live()
    logits = random((8, 5000), 42, dtype)
    logits[0] = float("nan")
    logits[1] = float("-inf")
    logits[2, 100:200] = float("nan")
    logits[3, 17] = float("inf")
    logits[4, :2] = torch.tensor([3e38, -3e38], dtype=dtype)
    logits[5, 3000:] = float("nan")
    logits[5, :3000] = float("-inf")  # candidates: -inf only, before the NaN: uniform over them
    uniforms = torch.rand(8, generator=device_generator(43), device=DEVICE)
    for options in [dict(), dict(top_k=10, top_p=0.5), dict(temperature=0), dict(cfg_scale=2.0),
                    dict(temperature=1e-37), dict(temperature=0.5, top_k=3)]:
        cfg = options.get("cfg_scale")
        u = uniforms[:4] if cfg else uniforms
        temperature = options.get("temperature", 1.0)
        span = (0, 4000)
        want = reference.sample_tokens(logits, u, temperature=temperature, top_k=options.get("top_k"),
                                       top_p=options.get("top_p"), vocab_range=span, cfg_scale=cfg)
        monkeypatch.setenv("UNIMM_BACKEND", "cuda")
        got = _op(logits, u, temperature, options.get("top_k"), options.get("top_p"), span, cfg)
        monkeypatch.delenv("UNIMM_BACKEND")
        assert (got != want).sum() <= 1, (options, got, want)  # exp may round apart at a CDF edge
        assert got[0] == -1  # cond row 0 is all NaN (guided or not)
        assert ((got[1:] >= 0) & (got[1:] < 4000)).all()
        if not cfg:
            assert not ((got[2] >= 100) & (got[2] < 200))  # NaN is never sampled
            assert got[3] == 17 and got[4] == 0 and 0 <= got[5] < 3000


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_writes_every_row_and_rejects_bad_launch(dtype):
    """The raw entry point into a poisoned token buffer: every row, sampled and greedy, with and
    without guidance, gets an id in its block."""
    _cuda_live()
    C = _ext.lib()
    logits = random((300, 1000), 44, dtype)
    uniforms = torch.rand(300, generator=device_generator(45), device=DEVICE)
    stream = torch.cuda.current_stream().cuda_stream
    for rows_out, cfg, greedy in [(300, False, False), (300, False, True), (150, True, False)]:
        tokens = torch.full((rows_out,), -1, dtype=torch.int64, device=DEVICE)
        C.sample_tokens(logits.data_ptr(), 1000, rows_out, 5, 990, cfg, 2.0 if cfg else 0.0, greedy, 1.0, 50, 0.9,
                        uniforms.data_ptr(), tokens.data_ptr(), _ext.DTYPE_CODES[dtype], DEVICE.index or 0, stream)
        torch.cuda.synchronize()
        assert ((tokens >= 5) & (tokens < 995)).all()
        if greedy:
            assert torch.equal(tokens, 5 + logits[:, 5:995].float().argmax(-1))
    with pytest.raises(ValueError, match="top_p must be in"):
        C.sample_tokens(logits.data_ptr(), 1000, 300, 0, 1000, False, 0.0, False, 1.0, 50, 1.5, uniforms.data_ptr(),
                        tokens.data_ptr(), 0, 0, 0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(monkeypatch):
    _cuda_live()
    monkeypatch.setenv("UNIMM_BACKEND", "cuda")
    logits = random((16, 100_000), 46, torch.bfloat16, scale=3.0)
    uniforms = torch.rand(8, device=DEVICE)
    args = (0.9, 200, 0.95, (0, 100_000), 4.0)
    _op(logits, uniforms, *args)  # warm-up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_tokens = _op(logits, uniforms, *args)
        drawn = sample_tokens(logits, top_k=200, cfg_scale=4.0)  # uniforms drawn inside the graph
    for seed in range(3):
        logits.copy_(random((16, 100_000), 47 + seed, torch.bfloat16, scale=3.0))
        uniforms.copy_(torch.rand(8, generator=device_generator(seed), device=DEVICE))
        static_tokens.fill_(-1)
        drawn.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static_tokens, _op(logits, uniforms, *args))
        assert ((drawn >= 0) & (drawn < 100_000)).all()


def _raw(logits, uniforms, temperature, top_k, top_p, span, cfg_scale, splits):
    """The CUDA entry point with an explicit CTA count per row, into a poisoned token buffer."""
    C = _ext.lib()
    rows_out = logits.shape[0] // 2 if cfg_scale else logits.shape[0]
    lo, hi = span
    tokens = torch.full((rows_out,), -7, dtype=torch.int64, device=DEVICE)
    workspace = torch.full((rows_out * (C.SAMPLING_ROW_STATE_BYTES + 8 * splits),), 0xA5, dtype=torch.uint8,
                           device=DEVICE)
    greedy = temperature == 0
    C.sample_tokens(logits=logits.data_ptr(), row_stride=logits.stride(0), rows_out=rows_out, lo=lo, n=hi - lo,
                    cfg=cfg_scale is not None, cfg_scale=cfg_scale or 0.0, greedy=greedy,
                    inv_temperature=1.0 if greedy else reference.inverse_temperature(temperature),
                    top_k=min(top_k or hi - lo, hi - lo), top_p=1.0 if top_p is None else top_p,
                    uniforms=uniforms.data_ptr(), tokens=tokens.data_ptr(), dtype=_ext.DTYPE_CODES[logits.dtype],
                    device=DEVICE.index or 0, stream=torch.cuda.current_stream().cuda_stream, splits=splits,
                    workspace=workspace.data_ptr() if splits > 1 else 0)
    return tokens


SPLIT_CASES = [  # temperature, top_k, top_p, vocab_range, cfg_scale
    (1.0, 2000, None, None, 4.0), (0.7, None, 0.9, None, 3.0), (1.0, None, None, None, None),
    (1.3, 1000, 0.5, (128_256, 160_000), None), (0.0, None, None, None, 4.0), (0.9, 20, 0.8, (77, 32_845), 2.0),
    (1e-37, 50, 0.9, None, 2.0), (1e30, 10, 0.95, None, 4.0),  # extreme temperatures
]


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [161_280, 262_144])
@pytest.mark.parametrize("rows_out", [1, 2, 64])
def test_gpu_split_rows_match_reference(monkeypatch, rows_out, vocab):
    """Few rows spread over several CTAs each: the reference's tokens (a mismatch needs a uniform
    within exp's rounding of a CDF edge) and exactly the one-CTA kernel's (at batch 64, where the
    plan keeps one CTA per row, the raw entry point forces two)."""
    _cuda_live()
    splits = importlib.import_module("unimm.kernels.sampling").cuda_splits(rows_out, vocab, DEVICE)
    assert rows_out == 64 or splits > 1
    for index, (temperature, top_k, top_p, vocab_range, cfg_scale) in enumerate(SPLIT_CASES):
        logits = random((2 * rows_out if cfg_scale else rows_out, vocab), vocab + index, torch.bfloat16, scale=3.0)
        span = vocab_range or (0, vocab)
        uniforms = torch.rand(rows_out, generator=device_generator(index), device=DEVICE)
        want = reference.sample_tokens(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                                       vocab_range=span, cfg_scale=cfg_scale)
        monkeypatch.setenv("UNIMM_BACKEND", "cuda")
        got = _op(logits, uniforms, temperature, top_k, top_p, span, cfg_scale)
        monkeypatch.delenv("UNIMM_BACKEND")
        assert (got != want).sum() <= 1, (index, got, want)
        options = (temperature, top_k, top_p, span, cfg_scale)
        assert torch.equal(_raw(logits, uniforms, *options, splits=max(splits, 2)), _raw(logits, uniforms, *options, 1))
    logits = random((2, 50_000), 48, torch.bfloat16)
    logits[0] = float("nan")  # no candidate: -1
    logits[1, 31_000] = float("inf")  # takes all the mass
    uniforms = torch.rand(2, generator=device_generator(49), device=DEVICE)
    for temperature, top_k, top_p in [(1.0, None, None), (0.8, 100, 0.9), (0.0, None, None)]:
        got = _raw(logits, uniforms, temperature, top_k, top_p, (0, 50_000), None, splits=7)
        assert got.tolist() == [-1, 31_000]
