"""linear_cross_entropy under hostile inputs, on every live backend (reference; Triton through the
interpreter in fp32 / fp16 on a CPU, compiled on a GPU).

The library's rule for non-finite values: nothing is read back from the device to validate it;
NaN / Inf propagate, as in PyTorch, to exactly the outputs that depend on them, and elements a
result does not depend on (dropped rows: ignored targets or token weight 0; vocabulary columns
outside vocab_range) contribute exactly nothing, forward and in every gradient, even when they
hold NaN or Inf. Python-scalar arguments are always validated, with errors that name them.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from unimm.kernels import _cross_entropy_args, linear_cross_entropy
from unimm.kernels.reference import cross_entropy as reference
from unimm.testing import DEVICE, HOSTILE_DTYPES, HOSTILE_TOLERANCE, clean_env, seeded

try:  # the property tests need hypothesis (the test extra); the others run without it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

N, D, V = 10, 8, 40
RANGE = (8, 32)
REDUCTIONS = reference.REDUCTIONS
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy, in the interpreter


def inputs(seed=0, dtype=torch.float32, n=N, d=D, v=V, ignore_index=-100, lo=0, hi=None, ignored=(1, 4),
           zero_weights=(6,)):
    """hidden, weight, bias, targets (rows ``ignored`` ignored), token_weights (rows
    ``zero_weights`` weigh 0, the others in [0.5, 1.5))."""
    hi = v if hi is None else hi
    gen = seeded(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) / max(1, d) ** 0.5
    bias = torch.randn(v, generator=gen)
    targets = torch.randint(lo, hi, (n,), generator=gen)
    targets[list(ignored)] = ignore_index
    token_weights = torch.rand(n, generator=gen) + 0.5
    token_weights[list(zero_weights)] = 0.0
    cast = lambda t: t.to(DEVICE, dtype)
    return cast(hidden), cast(weight), cast(bias), targets.to(DEVICE), token_weights.to(DEVICE)


def run(hidden, weight, targets, bias=None, upstream_seed=3, **options):
    """Loss, lse and the gradients of hidden, weight and bias (None where not given) of one call
    with a fixed upstream gradient, on the backend in force."""
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss, lse = linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], return_lse=True, **options)
    upstream = (torch.randn(loss.shape, generator=seeded(upstream_seed)).to(DEVICE) if loss.dim()
                else torch.tensor(1.3, device=DEVICE))
    (loss * upstream).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return dict(loss=loss.detach(), lse=lse, dh=grads[0], dw=grads[1], db=grads[2])


def run_reference(hidden, weight, targets, bias=None, upstream_seed=3, **options):
    """``run`` through the fp64 reference."""
    leaves = [t.detach().double().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    loss, lse = reference.linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], return_lse=True,
                                               compute_dtype=torch.float64, **options)
    upstream = (torch.randn(loss.shape, generator=seeded(upstream_seed)).to(DEVICE) if loss.dim()
                else torch.tensor(1.3, device=DEVICE))
    (loss * upstream.double()).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return dict(loss=loss.detach(), lse=lse, dh=grads[0], dw=grads[1], db=grads[2])


def assert_same(got, want):
    """Bit for bit, NaN where NaN."""
    for name in got:
        a, b = got[name], want[name]
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert torch.equal(a.isnan(), b.isnan()), name
        assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)), f"{name}: {(a - b).abs().max()}"


def assert_agree(got, want, tol):
    """The same non-finite pattern (NaN where NaN, Inf where Inf), finite values within tol."""
    for name in got:
        a, b = got[name], want[name]
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        assert a.shape == b.shape, name
        a, b = a.double(), b.double()
        assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN at {a.isnan().nonzero()[:5].tolist()} vs " \
                                                  f"{b.isnan().nonzero()[:5].tolist()}"
        assert torch.equal(a.isinf(), b.isinf()), name
        fin = a.isfinite()
        if fin.any():
            scale = b[fin].abs().max().item()
            assert (a[fin] - b[fin]).abs().max().item() <= tol * max(1.0, scale), name


# ---- Python-scalar arguments ---------------------------------------------------------------------

BAD_SCALARS = [
    (dict(softcap=math.inf), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-math.inf), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=math.nan), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, r"softcap must be a finite number > 0 \(or None\), got -1.0"),
    (dict(softcap="3"), TypeError, "softcap must be a finite number > 0.*got str"),
    (dict(softcap=True), TypeError, "softcap must be .*got bool"),
    (dict(softcap=torch.tensor(3.0)), TypeError, "softcap must be .*got Tensor"),
    (dict(z_loss=math.nan), ValueError, "z_loss must be a finite number >= 0"),
    (dict(z_loss=math.inf), ValueError, "z_loss must be a finite number >= 0"),
    (dict(z_loss=-1e-4), ValueError, "z_loss must be a finite number >= 0, got -0.0001"),
    (dict(z_loss="1e-4"), TypeError, "z_loss must be .*got str"),
    (dict(z_loss=None), TypeError, "z_loss must be .*got NoneType"),
    (dict(label_smoothing=math.nan), ValueError, r"label_smoothing must be a finite number in \[0, 1\]"),
    (dict(label_smoothing=math.inf), ValueError, r"label_smoothing must be a finite number in \[0, 1\], got inf"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing must be a finite number in \[0, 1\], got 1.5"),
    (dict(label_smoothing=-0.1), ValueError, r"label_smoothing must be a finite number in \[0, 1\], got -0.1"),
    (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be .*got str"),
    (dict(label_smoothing=None), TypeError, "label_smoothing must be .*got NoneType"),
    (dict(ignore_index=-100.0), TypeError, "ignore_index must be an integer, got float"),
    (dict(ignore_index="x"), TypeError, "ignore_index must be an integer, got str"),
    (dict(ignore_index=None), TypeError, "ignore_index must be an integer"),
    (dict(ignore_index=True), TypeError, "ignore_index must be an integer, got bool"),
    (dict(ignore_index=2**70), ValueError, "ignore_index must fit in int64"),
    (dict(ignore_index=-2**63 - 1), ValueError, "ignore_index must fit in int64"),
    (dict(vocab_range=(0, 6, 12)), ValueError, r"vocab_range must be a pair \(lo, hi\) of integers, got 3 values"),
    (dict(vocab_range=(5,)), ValueError, "vocab_range must be a pair"),
    (dict(vocab_range=12), TypeError, "vocab_range must be a pair .*got int"),
    (dict(vocab_range="ab"), TypeError, "vocab_range must be a pair .*got str"),
    (dict(vocab_range=torch.tensor([0, 12])), TypeError, "vocab_range must be a pair .*got Tensor"),
    (dict(vocab_range=(0.0, 12)), TypeError, "vocab_range must be an integer, got float"),
    (dict(vocab_range=(False, 12)), TypeError, "vocab_range must be an integer, got bool"),
    (dict(vocab_range=(12, 6)), ValueError, r"vocab_range must be \(lo, hi\) with 0 <= lo < hi <= V = 12"),
    (dict(vocab_range=(-1, 6)), ValueError, r"vocab_range must be \(lo, hi\) with 0 <= lo < hi <= V = 12"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(reduction=None), ValueError, "reduction must be one of"),
]


@pytest.mark.parametrize("options, error, match", BAD_SCALARS,
                         ids=[",".join(f"{k}={v!r}" for k, v in o.items()) for o, _, _ in BAD_SCALARS])
def test_bad_scalar_arguments(backend, options, error, match):
    hidden, weight, _, targets, _ = inputs(n=4, v=12, ignored=(), zero_weights=())
    with pytest.raises(error, match=match):
        linear_cross_entropy(hidden, weight, targets, **options)


def test_numpy_and_int_scalars_accepted(backend):
    """numpy integers for vocab_range / ignore_index, numpy floats and ints for the real options."""
    hidden, weight, bias, targets, _ = inputs(ignore_index=7, lo=RANGE[0], hi=RANGE[1])
    plain = run(hidden, weight, targets, bias, vocab_range=RANGE, ignore_index=7, label_smoothing=0.25, z_loss=0.5,
                softcap=3.0)
    numpy = run(hidden, weight, targets, bias, vocab_range=(np.int64(RANGE[0]), np.int32(RANGE[1])),
                ignore_index=np.int16(7), label_smoothing=np.float32(0.25), z_loss=np.float64(0.5), softcap=3)
    assert_same(numpy, plain)
    listed = run(hidden, weight, targets, bias, vocab_range=list(RANGE), ignore_index=7, label_smoothing=0.25,
                 z_loss=0.5, softcap=3.0)
    assert_same(listed, plain)


def test_bad_environment_variables_leave_the_import_alone():
    env = dict(clean_env(), UNIMM_CE_WORKSPACE_MB="abc", UNIMM_BACKEND="bogus")
    done = subprocess.run([sys.executable, "-c", "import unimm.kernels"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bad_environment_variables(backend, monkeypatch):
    """A bad UNIMM_CE_WORKSPACE_MB or UNIMM_BACKEND fails the call with the variable's name and
    what it takes."""
    hidden, weight, _, targets, _ = inputs(n=4, v=12, ignored=(), zero_weights=())
    for bad in ("abc", "0", "-64", "1.5"):
        monkeypatch.setenv("UNIMM_CE_WORKSPACE_MB", bad)
        with pytest.raises(ValueError, match=f"UNIMM_CE_WORKSPACE_MB must be a positive whole number.*{bad!r}"):
            linear_cross_entropy(hidden, weight, targets)
    monkeypatch.setenv("UNIMM_CE_WORKSPACE_MB", " 64 ")
    assert linear_cross_entropy(hidden, weight, targets).isfinite()
    monkeypatch.setenv("UNIMM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="UNIMM_BACKEND must be one of reference, triton, cuda.*'bogus'"):
        linear_cross_entropy(hidden, weight, targets)


# ---- tensors: dtypes, shapes -------------------------------------------------------------------

@pytest.mark.parametrize("target_dtype", [torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64])
def test_any_integer_target_dtype(backend, target_dtype):
    hidden, weight, bias, targets, _ = inputs(ignore_index=5, lo=RANGE[0], hi=RANGE[1])
    want = run(hidden, weight, targets, bias, ignore_index=5, vocab_range=RANGE, reduction="none")
    got = run(hidden, weight, targets.to(target_dtype), bias, ignore_index=5, vocab_range=RANGE, reduction="none")
    assert_same(got, want)


@pytest.mark.parametrize("dtype", HOSTILE_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_width_hidden(backend, dtype, reduction):
    """D = 0: every logit is 0 (+ bias): the loss of a kept row is log(V) without bias."""
    hidden, weight, bias, targets, _ = inputs(dtype=dtype, d=0, lo=RANGE[0], hi=RANGE[1])
    out = run(hidden, weight, targets, reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    kept = targets != -100
    per_row = math.log(V) + 0.01 * math.log(V) ** 2
    want = torch.where(kept, per_row, 0.0).double()
    if reduction == "mean":
        want = want.sum() / kept.sum()
    torch.testing.assert_close(out["loss"].double(), want.to(DEVICE), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["lse"].double(), torch.full((N,), math.log(V), dtype=torch.float64, device=DEVICE))
    assert out["dh"].shape == (N, 0) and out["dw"].shape == (V, 0)
    with_bias = run(hidden, weight, targets, bias, reduction=reduction, vocab_range=RANGE, softcap=2.0)
    assert with_bias["dh"].shape == (N, 0) and with_bias["dw"].shape == (V, 0)
    assert_agree(with_bias, run_reference(hidden, weight, targets, bias, reduction=reduction, vocab_range=RANGE,
                                          softcap=2.0), HOSTILE_TOLERANCE[dtype])
    assert (with_bias["db"][:RANGE[0]] == 0).all() and (with_bias["db"][RANGE[1]:] == 0).all()


def test_empty_and_all_dropped(backend):
    """Nothing kept: the loss is 0 and every gradient exactly 0, even with Inf / NaN everywhere."""
    hidden, weight, bias, targets, token_weights = inputs()
    poisoned = hidden.clone()
    poisoned[::2] = math.inf
    poisoned[1::2] = math.nan
    for reduction in ("mean", "sum", "none"):
        for kwargs in (dict(targets=torch.full_like(targets, -100)),
                       dict(targets=targets, token_weights=torch.zeros_like(token_weights))):
            out = run(poisoned, weight, bias=bias, reduction=reduction, **kwargs)
            assert (out["loss"] == 0).all(), reduction
            for name in ("dh", "dw", "db"):
                assert (out[name] == 0).all(), (reduction, name)
            assert out["lse"].isnan().all()  # every row's own lse, which depends on its hidden
    empty = run(hidden[:0], weight, targets[:0], bias)
    assert empty["loss"] == 0 and empty["lse"].shape == (0,) and empty["dh"].shape == (0, D)
    assert (empty["dw"] == 0).all() and (empty["db"] == 0).all()


# ---- non-finite values: dropped elements contribute exactly nothing -----------------------------

OPTION_WALK = [
    dict(),
    dict(bias=True, reduction="sum"),
    dict(label_smoothing=0.1, z_loss=1e-3),
    dict(softcap=2.0, reduction="none"),
    dict(token_weights=True),
    dict(vocab_range=RANGE, bias=True),
    dict(ignore_index=3, token_weights=True, reduction="none"),
    dict(bias=True, label_smoothing=0.2, z_loss=1e-2, softcap=3.0, token_weights=True, vocab_range=RANGE,
         ignore_index=0, reduction="none"),
]


def walk_case(options, dtype, seed=0):
    """(hidden, weight, bias, targets, call options, dropped rows) for one OPTION_WALK entry."""
    options = dict(options)
    use_bias, use_weights = options.pop("bias", False), options.pop("token_weights", False)
    lo, hi = options.get("vocab_range", (0, V))
    hidden, weight, bias, targets, token_weights = inputs(seed, dtype, ignore_index=options.get("ignore_index", -100),
                                                          lo=lo, hi=hi)
    if use_weights:
        options["token_weights"] = token_weights
    dropped = targets == options.get("ignore_index", -100)
    if use_weights:
        dropped |= token_weights == 0
    return hidden, weight, bias if use_bias else None, targets, options, dropped


def poison(hidden, weight, bias, dropped, lo, hi, values):
    """Copies with ``values`` (cycled) in every element no result depends on: the hidden rows of
    dropped rows, the weight rows and bias entries outside [lo, hi)."""
    hidden, weight = hidden.clone(), weight.clone()
    bias = bias.clone() if bias is not None else None
    rows = dropped.nonzero()[:, 0].tolist()
    outside = list(range(lo)) + list(range(hi, weight.shape[0]))
    for i, row in enumerate(rows):
        hidden[row] = values[i % len(values)]
    for i, row in enumerate(outside):
        weight[row] = values[i % len(values)]
        if bias is not None:
            bias[row] = values[(i + 1) % len(values)]
    return hidden, weight, bias


@pytest.mark.parametrize("dtype", HOSTILE_DTYPES)
@pytest.mark.parametrize("options", OPTION_WALK, ids=lambda o: ",".join(k for k in o) or "plain")
def test_dropped_elements_contribute_nothing(backend, dtype, options):
    """Inf / NaN in the hidden rows of ignored or zero-weight rows, and in weight rows and bias
    entries outside vocab_range, change nothing: loss, the kept rows' lse and every gradient are
    bit for bit those of finite values there; dropped rows get exactly zero gradient."""
    hidden, weight, bias, targets, options, dropped = walk_case(options, dtype)
    lo, hi = options.get("vocab_range", (0, V))
    finite = poison(hidden, weight, bias, dropped, lo, hi, [7.0, -3.0])
    hostile = poison(hidden, weight, bias, dropped, lo, hi, [math.inf, math.nan, -math.inf])
    want = run(*finite[:2], targets, finite[2], **options)
    got = run(*hostile[:2], targets, hostile[2], **options)
    # the lse of a dropped row is its own and depends on its (poisoned) hidden
    assert not got["lse"][dropped].isfinite().any()
    got["lse"], want["lse"] = got["lse"][~dropped], want["lse"][~dropped]
    assert_same(got, want)
    assert all(t.isfinite().all() for t in got.values() if t is not None)
    assert (got["dh"][dropped] == 0).all()
    assert (got["dw"][:lo] == 0).all() and (got["dw"][hi:] == 0).all()
    if bias is not None:
        assert (got["db"][:lo] == 0).all() and (got["db"][hi:] == 0).all()
    assert_agree(got, {**run_reference(*hostile[:2], targets, hostile[2], **options),
                       "lse": got["lse"].double()}, HOSTILE_TOLERANCE[dtype])


def test_dropped_rows_ignore_a_nan_upstream_gradient(backend):
    hidden, weight, bias, targets, _ = inputs()
    dropped = targets == -100
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], reduction="none")
    loss.backward(torch.where(dropped, math.nan, 1.0))
    assert all(t.grad.isfinite().all() for t in leaves)
    assert (leaves[0].grad[dropped] == 0).all()


# ---- non-finite values: propagation to exactly the dependent outputs ------------------------------

def nan_case(kind, reduction):
    """(hidden, weight, bias, targets, options, r) with one NaN planted; r: the poisoned kept row."""
    hidden, weight, bias, targets, token_weights = inputs(lo=RANGE[0], hi=RANGE[1])
    options = dict(reduction=reduction, vocab_range=RANGE, token_weights=token_weights)
    r = 2
    if kind == "hidden":
        hidden = hidden.clone()
        hidden[r, 3] = math.nan
    elif kind == "weight":
        token_weights = token_weights.clone()
        token_weights[r] = math.nan
        options["token_weights"] = token_weights
    elif kind == "column":
        weight = weight.clone()
        weight[RANGE[0] + 5, 1] = math.nan
    return hidden, weight, bias, targets, options, r


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", ["hidden", "weight", "column"])
def test_nan_reaches_exactly_its_dependents(backend, kind, reduction):
    hidden, weight, bias, targets, options, r = nan_case(kind, reduction)
    out = run(hidden, weight, targets, bias, **options)
    dropped = (targets == -100) | (options["token_weights"] == 0)
    kept = ~dropped
    nan_rows = torch.zeros(N, dtype=torch.bool, device=DEVICE)
    nan_rows[r] = True
    if kind == "column" or (kind == "weight" and reduction == "mean"):
        nan_rows = kept.clone()  # a column of every row's softmax; the normaliser of every row
    # loss
    if reduction == "none":
        assert torch.equal(out["loss"].isnan(), nan_rows)
    else:
        assert out["loss"].isnan()
    # lse: a row's own (a NaN weight does not reach it)
    lse_nan = {"hidden": nan_rows, "weight": torch.zeros_like(nan_rows), "column": torch.ones_like(nan_rows)}[kind]
    assert torch.equal(out["lse"].isnan(), lse_nan)
    # gradients: dh of the rows reached, dW and dbias inside vocab_range (every row's dx reaches
    # all of them); dropped rows and columns outside the range exactly 0
    assert torch.equal(out["dh"].isnan().all(1), nan_rows) and out["dh"][~nan_rows].isfinite().all()
    assert (out["dh"][dropped] == 0).all()
    assert out["dw"][RANGE[0]:RANGE[1]].isnan().all() and out["db"][RANGE[0]:RANGE[1]].isnan().all()
    assert (out["dw"][:RANGE[0]] == 0).all() and (out["dw"][RANGE[1]:] == 0).all()
    assert (out["db"][:RANGE[0]] == 0).all() and (out["db"][RANGE[1]:] == 0).all()
    assert_agree(out, run_reference(hidden, weight, targets, bias, **options), 1e-4)


# ---- token_weights: zero drops a row, negative ones, and values checked only on the CPU ------------

def test_zero_weight_is_ignore_index(backend):
    hidden, weight, bias, targets, token_weights = inputs(zero_weights=(0, 6, 7))
    ignored = torch.where(token_weights == 0, -100, targets)
    for reduction in ("mean", "sum", "none"):
        assert_same(run(hidden, weight, targets, bias, token_weights=token_weights, reduction=reduction),
                    run(hidden, weight, ignored, bias, token_weights=token_weights, reduction=reduction))


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_negative_weights_sum_and_none(backend, reduction):
    """"sum" and "none" take any weights: l = w * ce."""
    hidden, weight, bias, targets, token_weights = inputs()
    signed = token_weights * torch.tensor([1.0, -1.0] * (N // 2), device=DEVICE)
    got = run(hidden, weight, targets, bias, token_weights=signed, reduction=reduction, z_loss=1e-2)
    assert all(t.isfinite().all() for t in got.values())
    assert_agree(got, run_reference(hidden, weight, targets, bias, token_weights=signed, reduction=reduction,
                                    z_loss=1e-2), 1e-4)


def test_device_semantics_of_unchecked_values(backend, monkeypatch):
    """On a GPU values are never read back: a negative weight under "mean" and a target outside
    vocab_range give NaN where they land, and dropped rows still get exactly zero gradient (run
    here by switching the CPU's checks off)."""
    monkeypatch.setattr(_cross_entropy_args, "HOST_CHECKED_DEVICES", ())
    hidden, weight, bias, targets, token_weights = inputs(lo=RANGE[0], hi=RANGE[1])
    dropped = (targets == -100) | (token_weights == 0)
    negative = token_weights.clone()
    negative[3] = -0.5
    out = run(hidden, weight, targets, bias, token_weights=negative, vocab_range=RANGE)
    assert out["loss"].isnan() and out["dh"][~dropped].isnan().all() and (out["dh"][dropped] == 0).all()
    assert out["lse"].isfinite().all()
    assert_agree(out, run_reference(hidden, weight, targets, bias, token_weights=negative, vocab_range=RANGE), 1e-4)

    outside = targets.clone()
    outside[3] = RANGE[1] + 2
    for reduction in ("none", "mean"):
        out = run(hidden, weight, outside, bias, vocab_range=RANGE, reduction=reduction)
        if reduction == "none":
            assert torch.equal(out["loss"].isnan(), torch.arange(N, device=DEVICE) == 3)
            assert out["dh"][3].isnan().all() and out["dh"][torch.arange(N, device=DEVICE) != 3].isfinite().all()
        else:
            assert out["loss"].isnan()
        assert (out["dh"][targets == -100] == 0).all()
        assert_agree(out, run_reference(hidden, weight, outside, bias, vocab_range=RANGE, reduction=reduction), 1e-4)


# ---- properties ------------------------------------------------------------------------------------

if given is None:
    def test_properties_need_hypothesis():
        pytest.skip("hypothesis is not installed (pip install hypothesis, or the test extra)")
else:
    HYPOTHESIS = settings(deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

    @st.composite
    def finite_cases(draw):
        n = draw(st.integers(0, 12))
        d = draw(st.sampled_from([0, 1, 5, 16]))
        v = draw(st.integers(1, 40))
        lo = draw(st.integers(0, v - 1))
        hi = draw(st.integers(lo + 1, v))
        ranged = draw(st.booleans())
        if not ranged:
            lo, hi = 0, v
        dtype = draw(st.sampled_from(HOSTILE_DTYPES))
        scale = draw(st.sampled_from([1e-3, 1.0, 4.0]))
        seed = draw(st.integers(0, 2**16))
        gen = seeded(seed)
        hidden = (torch.randn(n, d, generator=gen) * scale).to(DEVICE, dtype)
        weight = (torch.randn(v, d, generator=gen) * scale).to(DEVICE, dtype)
        bias = torch.randn(v, generator=gen).to(DEVICE, dtype) if draw(st.booleans()) else None
        ignore_index = draw(st.sampled_from([-100, -1, lo]))
        targets = torch.randint(lo, hi, (n,), generator=gen)
        targets[torch.rand(n, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = ignore_index
        target_dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8]))
        if target_dtype == torch.uint8 and (ignore_index < 0 or hi > 255):
            target_dtype = torch.int16
        reduction = draw(st.sampled_from(REDUCTIONS))
        options = dict(reduction=reduction, ignore_index=ignore_index,
                       label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
                       z_loss=draw(st.sampled_from([0.0, 1e-3])),
                       softcap=draw(st.sampled_from([None, 0.5, 30])))
        if ranged:
            options["vocab_range"] = (np.int64(lo), hi)
        if draw(st.booleans()):
            weights = torch.rand(n, generator=gen) * 2
            weights[torch.rand(n, generator=gen) < 0.3] = 0.0
            options["token_weights"] = weights.to(DEVICE)
        return hidden, weight, targets.to(DEVICE, target_dtype), bias, options



    @settings(HYPOTHESIS, max_examples=20)
    @given(case=finite_cases())
    def test_finite_inputs_give_finite_agreeing_results(backend, case):
        """Any finite input gives a finite loss, lse and gradients, and the backend agrees with the
        fp64 reference."""
        hidden, weight, targets, bias, options = case
        got = run(hidden, weight, targets, bias, **options)
        for name, value in got.items():
            assert value is None or value.isfinite().all(), name
        want = run_reference(hidden, weight, targets, bias, **options)
        assert_agree(got, want, 10 * HOSTILE_TOLERANCE[hidden.dtype])


    @settings(HYPOTHESIS, max_examples=10)
    @given(case=finite_cases(), values=st.lists(st.sampled_from([math.inf, -math.inf, math.nan, 1e30]), min_size=1,
                                                max_size=3))
    def test_poisoning_what_nothing_depends_on_changes_nothing(backend, case, values):
        hidden, weight, targets, bias, options = case
        lo, hi = options.get("vocab_range", (0, weight.shape[0]))
        dropped = targets.long() == options["ignore_index"]
        if "token_weights" in options:
            dropped |= options["token_weights"] == 0
        want = run(hidden, weight, targets, bias, **options)
        hostile = poison(hidden, weight, bias, dropped, int(lo), hi, values)
        got = run(hostile[0], hostile[1], targets, hostile[2], **options)
        got["lse"], want["lse"] = got["lse"][~dropped], want["lse"][~dropped]
        assert_same(got, want)
