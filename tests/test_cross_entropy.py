"""linear_cross_entropy against the fp64 reference (materialised logits), values and gradients."""

import pytest
import torch

from unimm.kernels import BackendUnavailable, cross_entropy, linear_cross_entropy
from unimm.kernels import _cross_entropy_triton as ce_triton
from unimm.kernels._common import cdiv, split_columns
from unimm.kernels.reference import cross_entropy as reference
from unimm.testing import DEVICE, DTYPES, HAS_GPU, TOLERANCE, available_backends, rel_err, seeded


def make_inputs(n, d, v, seed, dtype=torch.float32, scale=1.0, bias=False, ignore=0.0):
    gen = seeded(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * scale / d**0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        targets[torch.rand(n, generator=gen) < ignore] = -100
    b = torch.randn(v, generator=gen) if bias else None
    cast = lambda t: t.to(DEVICE, dtype) if t is not None else None
    return cast(hidden), cast(weight), targets.to(DEVICE), cast(b)


def check(hidden, weight, targets, bias=None, *, tol=None, grads=True, grad_seed=None, **options):
    """Kernel vs fp64 reference: loss, lse, and the gradients of every input that has one."""
    tol = tol or TOLERANCE[hidden.dtype]
    leaves = [hidden, weight] + ([bias] if bias is not None else [])
    ours = [t.detach().clone().requires_grad_(grads) for t in leaves]
    refs = [t.detach().double().requires_grad_(grads) for t in leaves]
    o_hidden, o_weight, o_bias = ours + [None] * (3 - len(ours))
    r_hidden, r_weight, r_bias = refs + [None] * (3 - len(refs))

    loss, lse = linear_cross_entropy(o_hidden, o_weight, targets, bias=o_bias, return_lse=True, **options)
    ref_loss, ref_lse = reference.linear_cross_entropy(r_hidden, r_weight, targets, bias=r_bias, return_lse=True,
                                                       compute_dtype=torch.float64, **options)
    assert loss.shape == ref_loss.shape and lse.shape == targets.shape and lse.dtype == torch.float32
    assert torch.isfinite(loss).all()
    scale = ref_loss.abs().max().item() + 1e-6
    assert (loss.double() - ref_loss).abs().max().item() <= tol * max(1.0, scale), (loss, ref_loss)
    assert rel_err(lse, ref_lse) <= tol
    if not grads:
        return
    upstream = (torch.randn(ref_loss.shape, generator=seeded(grad_seed or 99)).to(DEVICE)
                if ref_loss.dim() else torch.tensor(1.7, device=DEVICE))
    (loss * upstream.to(loss.dtype)).sum().backward()
    (ref_loss * upstream.double()).sum().backward()
    for name, mine, theirs in zip(("hidden", "weight", "bias"), ours, refs):
        assert mine.grad is not None and mine.grad.dtype == mine.dtype, name
        if theirs.grad.abs().max() == 0:
            assert mine.grad.abs().max() == 0, name
        else:
            err = rel_err(mine.grad, theirs.grad)
            assert err <= tol, f"grad of {name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, d, v", [(1, 1, 1), (37, 24, 301), (50, 33, 97), (5, 70, 1000)])
def test_matches_reference(backend, dtype, n, d, v):
    check(*make_inputs(n, d, v, seed=n + d + v, dtype=dtype, ignore=0.2))


@pytest.mark.parametrize("options", [
    dict(label_smoothing=0.1),
    dict(z_loss=1e-3),
    dict(softcap=3.0),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(vocab_range=(40, 200)),
    dict(ignore_index=7),
    dict(label_smoothing=0.2, z_loss=1e-2, softcap=2.0, reduction="none", vocab_range=(11, 290), ignore_index=-1),
    dict(label_smoothing=1.0, reduction="sum"),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options(backend, options):
    hidden, weight, targets, _ = make_inputs(41, 19, 301, seed=5, scale=3.0, ignore=0.1)
    if "vocab_range" in options:
        lo, hi = options["vocab_range"]
        keep = targets >= 0
        targets[keep] = lo + targets[keep] % (hi - lo)
    if options.get("ignore_index") is not None:
        targets[targets < 0] = options["ignore_index"]
        targets[0] = options["ignore_index"]
    check(hidden, weight, targets, **options)


def test_bias_and_token_weights(backend):
    hidden, weight, targets, bias = make_inputs(29, 17, 151, seed=6, bias=True, ignore=0.2)
    token_weights = torch.rand(29, generator=seeded(7)).to(DEVICE) * 2
    check(hidden, weight, targets, bias, token_weights=token_weights)
    check(hidden, weight, targets, bias, token_weights=token_weights, reduction="none", softcap=5.0,
          vocab_range=(0, 151))


def test_all_ignored_and_empty(backend):
    hidden, weight, targets, bias = make_inputs(13, 8, 50, seed=8, bias=True)
    targets[:] = -100
    for reduction in ("mean", "sum"):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = linear_cross_entropy(*leaves[:2], targets, bias=leaves[2], reduction=reduction)
        assert loss.item() == 0.0
        loss.backward()
        assert all(t.grad.abs().max() == 0 for t in leaves)
    empty = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    w = weight.clone().requires_grad_(True)
    loss, lse = linear_cross_entropy(empty, w, targets[:0], return_lse=True)
    assert loss.item() == 0.0 and lse.shape == (0,)
    loss.backward()
    assert w.grad.abs().max() == 0 and empty.grad.shape == (0, 8)
    assert linear_cross_entropy(empty, weight, targets[:0], reduction="none").shape == (0,)


def test_large_logits(backend):
    hidden, weight, targets, _ = make_inputs(23, 16, 211, seed=9, scale=1.0)
    weight = weight * 2e3  # |x| ~ 1e4 without softcap
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding, which moves softmax by ~1e-3 relative
    check(hidden, weight, targets, tol=2e-3)


def test_many_chunks(backend, monkeypatch):
    # A small dx workspace forces several column chunks: dH accumulates across them, dW and
    # dbias are written chunk by chunk.
    monkeypatch.setattr(cross_entropy, "WORKSPACE_BYTES", 70 * 4 * 64)
    hidden, weight, targets, bias = make_inputs(70, 12, 301, seed=10, bias=True, ignore=0.1)
    check(hidden, weight, targets, bias)
    check(hidden, weight, targets, bias, reduction="none", label_smoothing=0.1, softcap=2.0)


def test_batch_dims_slices_and_frozen(backend):
    hidden, weight, targets, _ = make_inputs(24, 10, 77, seed=11)
    h3 = hidden.reshape(2, 12, 10)
    loss = linear_cross_entropy(h3, weight, targets.reshape(2, 12), reduction="none")
    assert loss.shape == (2, 12)
    # a weight that is a slice of a bigger (tied) matrix, and a frozen weight
    table = torch.randn(100, 10, generator=seeded(12)).to(DEVICE).requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    linear_cross_entropy(h, table[10:87], targets).backward()
    assert table.grad[:10].abs().max() == 0 and table.grad[87:].abs().max() == 0
    assert table.grad[10:87].abs().max() > 0
    frozen = weight.clone()
    h.grad = None
    linear_cross_entropy(h, frozen, targets).backward()
    assert h.grad is not None and frozen.grad is None
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, targets).requires_grad is False


def test_vocab_range_cuts_work(backend, monkeypatch):
    """Only the vocab_range columns are ever multiplied, forward and backward."""
    hidden, weight, targets, _ = make_inputs(9, 8, 500, seed=13)
    targets = 450 + targets % 50
    widths = {"lse": [], "grad": []}
    lse_stats, matmul = ce_triton.statistics, ce_triton._matmul

    def spy_lse(hidden, head, *args):
        widths["lse"].append(head.shape[0])
        return lse_stats(hidden, head, *args)

    def spy_matmul(a, b, out, epilogue, config, **kwargs):
        if epilogue == ce_triton.EPILOGUE_LOSS_GRAD:
            widths["grad"].append(out.shape[1])
        return matmul(a, b, out, epilogue, config, **kwargs)

    monkeypatch.setattr(ce_triton, "statistics", spy_lse)
    monkeypatch.setattr(ce_triton, "_matmul", spy_matmul)
    check(hidden, weight, targets, vocab_range=(450, 500))
    if backend == "triton":
        assert widths["lse"] == [50] and sum(widths["grad"]) == 50


@pytest.mark.parametrize("make, error, match", [
    (lambda h, w, t: dict(hidden=h, weight=w[:, :5], targets=t), ValueError, "same D"),
    (lambda h, w, t: dict(hidden=h, weight=w.half(), targets=t), TypeError, "weight must have the dtype"),
    (lambda h, w, t: dict(hidden=h.long(), weight=w, targets=t), TypeError, "hidden must be a floating"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t.float()), TypeError, "targets must be an integer"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t[:3]), ValueError, "targets must have shape"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, vocab_range=(20, 20)), ValueError, "vocab_range must be"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, vocab_range=(0, 51)), ValueError, "vocab_range must be"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, label_smoothing=-0.1), ValueError, "label_smoothing"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, softcap=0.0), ValueError, "softcap must be a finite number"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, z_loss=-1.0), ValueError, "z_loss"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, reduction="avg"), ValueError, "reduction must be"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, bias=w[:, 0].half()), TypeError, "bias must have the dtype"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, bias=w[:3, 0]), ValueError, r"bias must be \[V\]"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, token_weights=t), TypeError,
     "token_weights must be a floating"),
    (lambda h, w, t: dict(hidden=h, weight=w, targets=t, token_weights=h[:2, 0]), ValueError, "one weight per target"),
    (lambda h, w, t: dict(hidden=h, weight=w.to("meta"), targets=t), ValueError, "weight is on meta"),
    (lambda h, w, t: dict(hidden=h.tolist(), weight=w, targets=t), TypeError, "hidden must be a torch.Tensor"),
])
def test_bad_input(make, error, match):
    hidden, weight, targets, _ = make_inputs(10, 6, 50, seed=14)
    kwargs = make(hidden, weight, targets)
    with pytest.raises(error, match=match):
        linear_cross_entropy(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets"), **kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda t, w: dict(targets=t.index_fill(0, t.new_tensor([2]), 50)), r"\[0, 50\).*found 50"),
    (lambda t, w: dict(targets=t.index_fill(0, t.new_tensor([2]), -5)), "found -5"),
    (lambda t, w: dict(targets=t, vocab_range=(10, 20)), r"\[10, 20\)"),
    (lambda t, w: dict(targets=t, token_weights=w.index_fill(0, t.new_tensor([3]), -0.5)),
     r"token_weights must be >= 0 for reduction='mean'.*found -0.5"),
])
def test_bad_values_on_cpu(make, match):
    """Tensor values are checked where reading them costs no device sync: CPU tensors."""
    hidden, weight, targets, _ = make_inputs(10, 6, 50, seed=14)
    kwargs = make(targets.cpu(), torch.ones(10))
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(hidden.cpu(), weight.cpu(), **kwargs)


def test_float64_served_by_reference(monkeypatch):
    hidden, weight, targets, _ = make_inputs(10, 6, 50, seed=15, dtype=torch.float64)
    check(hidden, weight, targets, tol=1e-10)
    monkeypatch.setenv("UNIMM_BACKEND", "triton")
    with pytest.raises(BackendUnavailable):
        linear_cross_entropy(hidden, weight, targets)


def test_triton_writes_every_output():
    """The kernels into poisoned outputs: every split statistic and every dx element is written."""
    if "triton" not in available_backends():
        pytest.skip("triton backend not live here")
    hidden, head, _, _ = make_inputs(37, 20, 150, seed=16, scale=4.0)
    column = torch.tensor([0, 149, -1, 5] * 9 + [77], dtype=torch.int32, device=DEVICE)
    config = ce_triton._lse_config(hidden.dtype, not HAS_GPU)
    splits, cols_per_split = split_columns(cdiv(37, config["BLOCK_N"]), 150, config["BLOCK_V"], DEVICE)
    assert splits > 1
    parts = torch.full((4, splits, 37), float("nan"), device=DEVICE)
    ce_triton._lse_kernel[(cdiv(37, config["BLOCK_N"]) * splits,)](
        hidden, head, head, parts, column, parts, 37, 150, 20, 20, 1, 20, 1, cols_per_split, 1.0,
        HAS_BIAS=False, HAS_SOFTCAP=False, HAS_CLASS_WEIGHTS=False, PRECISION="ieee", **config)
    assert not parts.isnan().any()
    logits = hidden.double() @ head.double().T
    stats = ce_triton.statistics(hidden, head, None, column, None)
    row_max, log_sum, target_logit, logit_sum = stats
    close = dict(rtol=1e-5, atol=1e-5)  # fp32 kernels against fp64
    torch.testing.assert_close(row_max.double(), logits.amax(-1), **close)
    torch.testing.assert_close((row_max + log_sum).double(), torch.logsumexp(logits, -1), **close)
    torch.testing.assert_close(logit_sum.double(), logits.sum(-1), **close)
    picked = logits.gather(1, column.long().clamp_min(0)[:, None])[:, 0]
    torch.testing.assert_close(target_logit.double(), torch.where(column >= 0, picked, 0.0), **close)

    coefs = torch.rand(3, 37, generator=seeded(17)).to(DEVICE)  # (cp, ct, cu) per row
    dx = torch.full((37, 90), float("nan"), device=DEVICE)
    matmul_config = ce_triton._matmul_config(hidden.dtype, not HAS_GPU)
    ce_triton._matmul(hidden, head[40:130].T, dx, ce_triton.EPILOGUE_LOSS_GRAD, matmul_config,
                      loss_terms=(stats[:2].contiguous(), column, coefs, 40))
    cp, ct, cu = coefs.double()[:, :, None]
    expected = torch.softmax(logits, -1) * cp - cu
    expected[torch.arange(37), column.long().clamp_min(0)] -= (column >= 0).double() * ct[:, 0]
    expected[column < 0] = 0.0  # dropped rows: no gradient
    torch.testing.assert_close(dx.double(), expected[:, 40:130], **close)


# ---- GPU ----------------------------------------------------------------------------------------
#
# Fast tier (`pytest -m gpu`), counted for a cold Triton cache. A forward + backward in bf16 runs
# `_lse_kernel` once (the backward of reduction "none" recomputes it with the same arguments) and
# `_matmul_kernel` with three epilogues (dx, dW, dH): 4 specializations per combination of
# constexprs (HAS_BIAS, HAS_SOFTCAP) and of int classes (1 / divisible by 16 / other):
#   * test_gpu_bf16_real_sizes: every size divisible by 16 without and with soft-cap (vocab_range,
#     label smoothing, z-loss, "none" are runtime values) = 8 compiles; the odd case (n, D, V and
#     the strides not divisible by 16, with a bias) = 4 compiles.
#   * test_gpu_bf16_kernels_write_every_output: the first case's sizes and flags, so it reuses its
#     kernels: 0 (1 if a stride class were to differ).
#   * test_gpu_bf16_dropped_rows_contribute_nothing: the first case's sizes and flags: 0.
# Total: 12 Triton compiles (~20 s) plus ~5 s of fp64 reference matmuls.
# Full tier (`pytest -m gpu_full`): test_gpu_real_sizes, the dtype x shape x option x backend grid.

GPU_BF16_CASES = [  # (n, d, v, bias, options), automatic dispatch
    (1024, 512, 32768, False, {}),
    # an image-code block after a text vocabulary, Gemma-2's soft-cap and the other loss terms
    (512, 1024, 40960, False, dict(vocab_range=(32768, 40960), softcap=30.0, label_smoothing=0.1, z_loss=1e-4,
                                   reduction="none")),
    (555, 520, 50001, True, {}),  # nothing divisible by 16
]


def in_vocab_range(targets, options):
    if "vocab_range" in options:
        lo, hi = options["vocab_range"]
        keep = targets >= 0
        targets[keep] = lo + targets[keep] % (hi - lo)
    return targets


@pytest.mark.gpu
@pytest.mark.parametrize("n, d, v, bias, options", GPU_BF16_CASES, ids=["plain", "code-block-softcap-none", "odd-bias"])
def test_gpu_bf16_real_sizes(n, d, v, bias, options):
    """Loss, lse and every gradient of the backend a user gets, bf16, against the fp64 reference."""
    hidden, weight, targets, b = make_inputs(n, d, v, seed=n, dtype=torch.bfloat16, bias=bias, ignore=0.1)
    check(hidden, weight, in_vocab_range(targets, options), b, **options)


@pytest.mark.gpu
def test_gpu_bf16_kernels_write_every_output():
    """The bf16 kernels into NaN-poisoned outputs, at the first real-size case's sizes: every
    split statistic and every dx element is written, and right."""
    n, d, v = GPU_BF16_CASES[0][:3]
    hidden, head, _, _ = make_inputs(n, d, v, seed=16, dtype=torch.bfloat16, scale=4.0)
    column = torch.randint(0, v, (n,), generator=seeded(17)).to(DEVICE, torch.int32)
    column[::7] = -1  # ignored rows
    config = ce_triton._lse_config(hidden.dtype, False)
    splits, cols_per_split = split_columns(cdiv(n, config["BLOCK_N"]), v, config["BLOCK_V"], DEVICE)
    parts = torch.full((4, splits, n), float("nan"), device=DEVICE)
    ce_triton._lse_kernel[(cdiv(n, config["BLOCK_N"]) * splits,)](
        hidden, head, head, parts, column, parts, n, v, d, hidden.stride(0), hidden.stride(1), head.stride(0),
        head.stride(1), cols_per_split, 1.0, HAS_BIAS=False, HAS_SOFTCAP=False, HAS_CLASS_WEIGHTS=False,
        PRECISION="ieee", **config)
    torch.cuda.synchronize()
    assert not parts.isnan().any()
    logits = hidden.double() @ head.double().T
    stats = ce_triton.statistics(hidden, head, None, column, None)
    row_max, log_sum, target_logit, logit_sum = stats
    lse = row_max + log_sum
    close = dict(rtol=1e-4, atol=1e-3)  # fp32 sums of exact bf16 products against fp64
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, -1), **close)
    torch.testing.assert_close(logit_sum.double(), logits.sum(-1), **close)
    picked = logits.gather(1, column.long().clamp_min(0)[:, None])[:, 0]
    torch.testing.assert_close(target_logit.double(), torch.where(column >= 0, picked, 0.0), **close)

    lo, hi = v // 8, v // 8 + v // 4  # a chunk of whole tiles away from column 0
    coef = torch.rand(n, generator=seeded(18)).to(DEVICE) + 0.5
    dx = torch.full((n, hi - lo), float("nan"), dtype=hidden.dtype, device=DEVICE)
    matmul_config = ce_triton._matmul_config(hidden.dtype, False)
    coefs = torch.stack((coef, coef, torch.zeros_like(coef)))  # (cp, ct, cu): a plain cross-entropy
    ce_triton._matmul(hidden, head[lo:hi].T, dx, ce_triton.EPILOGUE_LOSS_GRAD, matmul_config,
                      loss_terms=(stats[:2].contiguous(), column, coefs, lo))
    torch.cuda.synchronize()
    assert not dx.isnan().any()
    expected = torch.softmax(logits, -1)
    kept = (column >= 0).nonzero()[:, 0]
    expected[kept, column.long()[kept]] -= 1.0
    expected[column < 0] = 0.0  # dropped rows: no gradient
    expected = (coef[:, None].double() * expected)[:, lo:hi]
    assert rel_err(dx, expected) <= TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_bf16_dropped_rows_contribute_nothing():
    """At the first real-size case: Inf / NaN in the hidden rows of ignored targets change neither
    the loss nor any gradient (the dW GEMM loads those rows as zeros), bit for bit."""
    n, d, v = GPU_BF16_CASES[0][:3]
    hidden, weight, targets, _ = make_inputs(n, d, v, seed=n, dtype=torch.bfloat16, ignore=0.1)
    dropped = targets == -100
    hostile = hidden.clone()
    hostile[dropped] = torch.tensor([float("inf"), float("nan"), -float("inf")], dtype=hidden.dtype,
                                    device=DEVICE).repeat(d)[:d]
    results = []
    for h in (hidden, hostile):
        leaves = [h.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
        loss = linear_cross_entropy(*leaves, targets)
        loss.backward()
        results.append([loss.detach(), leaves[0].grad, leaves[1].grad])
    for clean, poisoned in zip(*results):
        assert poisoned.isfinite().all()
        assert torch.equal(clean, poisoned)
    assert (results[1][1][dropped] == 0).all()


@pytest.mark.gpu_full
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n, d, v, options", [
    (1000, 512, 32000, {}),
    (777, 2304, 50000, dict(softcap=30.0, label_smoothing=0.1)),
    (513, 1024, 128256 + 32768, dict(vocab_range=(128256, 128256 + 32768), z_loss=1e-4)),
    (300, 640, 256000, dict(reduction="none")),
])
def test_gpu_real_sizes(backend, dtype, n, d, v, options):
    hidden, weight, targets, _ = make_inputs(n, d, v, seed=n, dtype=dtype, ignore=0.1)
    check(hidden, weight, in_vocab_range(targets, options), **options)


@pytest.mark.parametrize("grads_now", [[False, False, False], [True, True, True]])
def test_registered_ops(grads_now):
    hidden, weight, targets, bias = make_inputs(9, 5, 31, seed=17, bias=True, ignore=0.2)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    args = (hidden, weight, bias, targets, None, None, 3, 31, -100, "mean", 0.1, 1e-3, 5.0, 0.05, grads_now)
    targets[targets >= 0] = 3 + targets[targets >= 0] % 28
    out = torch.library.opcheck(torch.ops.unimm.linear_cross_entropy.default, args)
    assert all(v == "SUCCESS" for v in out.values()), out
    stats = torch.randn(4, 9).to(DEVICE)
    for reduction, grad_loss, grad_lse in (("none", torch.randn(9), None), ("mean", torch.tensor(0.7), torch.randn(9))):
        grad_lse = grad_lse.to(DEVICE) if grad_lse is not None else None
        args = (grad_loss.to(DEVICE), grad_lse, hidden.detach(), weight.detach(), bias, targets, None, None, stats, 3,
                31, -100, reduction, 0.1, 1e-3, 5.0, 0.05, [True, True, False])
        out = torch.library.opcheck(torch.ops.unimm.linear_cross_entropy_backward.default, args)
        assert all(v == "SUCCESS" for v in out.values()), out


def test_backward_recompute_matches_saved_gradients(backend):
    """A scalar loss whose gradients were not computed with it (the op called directly) must get
    the same gradients from the recomputing backward."""
    if backend == "reference":
        pytest.skip("the reference has no separate backward")
    hidden, weight, targets, bias = make_inputs(33, 7, 45, seed=18, bias=True, ignore=0.3)
    results = []
    for grads_now in ([True, True, True], [False, False, False]):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        loss = torch.ops.unimm.linear_cross_entropy(*leaves, targets, None, None, 0, 45, -100, "mean", 0.1, 1e-3,
                                                    4.0, None, grads_now)[0]
        (loss * 1.3).backward()
        results.append([t.grad for t in leaves])
    for saved, recomputed in zip(*results):
        torch.testing.assert_close(saved, recomputed)


def test_second_backward(backend):
    hidden, weight, targets, _ = make_inputs(8, 4, 20, seed=19)
    hidden.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, targets)
    loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    loss.backward()  # the saved gradients are reused, not consumed
    torch.testing.assert_close(hidden.grad, 2 * first)


def test_reference_ignores_an_enclosing_autocast(monkeypatch):
    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    hidden = torch.randn(9, 16, generator=seeded(40))
    weight = torch.randn(33, 16, generator=seeded(41))
    targets = torch.randint(0, 33, (9,), generator=seeded(42))
    plain = linear_cross_entropy(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = linear_cross_entropy(hidden, weight, targets)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)
