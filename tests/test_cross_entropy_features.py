"""linear_cross_entropy's numerics at the edges and its peer features (differentiable lse, token
accuracy, next-token shift), each against its meaning written out in plain torch, on every live
backend (Triton in the interpreter in fp32 / fp16 on a CPU)."""

import pytest
import torch
import torch.nn.functional as F

from unimm.kernels import linear_cross_entropy
from unimm.kernels.reference import cross_entropy as reference
from unimm.testing import DEVICE, DTYPES, TOLERANCE, available_backends, rel_err, seeded

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy, in the interpreter


try:
    import triton
    import triton.language as tl

    from unimm.kernels._triton import tanh

    @triton.jit
    def _apply_tanh(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tanh(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)
except ImportError:  # no triton: only the reference runs
    _apply_tanh = None


def make(n, d, v, seed, dtype=torch.float32, scale=1.0, ignored=()):
    gen = seeded(seed)
    hidden = torch.randn(n, d, generator=gen)
    weight = torch.randn(v, d, generator=gen) * scale / d**0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[list(ignored)] = -100
    return hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype), targets.to(DEVICE)


def leaves(*tensors, dtype=None):
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


# ---- numerics -----------------------------------------------------------------------------------

def test_hidden_gradient_at_large_logits(backend):
    """|logits| ~ 1e3 in fp32: p = exp(x - m) / s keeps x - m exact, so the hidden gradient is
    about as close to fp64 as torch's own (through exp(x - lse) it was ~100x further)."""
    hidden, weight, targets = make(16, 16, 130, seed=1, scale=300.0)
    logits64 = hidden.double() @ weight.double().T
    assert 3e2 < logits64.abs().max() < 3e3
    exact_h, = leaves(hidden, dtype=torch.float64)
    F.cross_entropy(exact_h @ weight.double().T, targets).backward()
    torch_h, = leaves(hidden)
    F.cross_entropy(torch_h @ weight.T, targets).backward()
    ours_h, = leaves(hidden)
    linear_cross_entropy(ours_h, weight, targets).backward()
    torch_err = rel_err(torch_h.grad, exact_h.grad)
    ours_err = rel_err(ours_h.grad, exact_h.grad)
    assert ours_err <= 4 * torch_err + 1e-6, (ours_err, torch_err)


@pytest.mark.parametrize("softcap", [1e4, 1e5])
def test_lse_with_a_large_softcap(backend, softcap):
    """x / softcap near 0: the soft-cap's tanh keeps its relative accuracy there, so lse is as
    accurate as without a cap (1 - 2 / (exp(2x) + 1) lost ~6e-8 absolute: ~softcap x 6e-8)."""
    hidden, weight, targets = make(20, 16, 200, seed=2, scale=3.0)
    _, lse = linear_cross_entropy(hidden, weight, targets, softcap=softcap, return_lse=True)
    logits = hidden.double() @ weight.double().T
    exact = torch.logsumexp(softcap * torch.tanh(logits / softcap), -1)
    assert (lse.double() - exact).abs().max() <= 2e-5 * exact.abs().max()


def test_triton_tanh_relative_accuracy():
    """The shared jit tanh, elementwise against fp64, from subnormal-small to past saturation."""
    if _apply_tanh is None or "triton" not in available_backends():
        pytest.skip("triton backend not live here")
    magnitudes = torch.logspace(-30, 2, 250, dtype=torch.float64)
    finite = torch.cat((magnitudes, -magnitudes, torch.tensor([0.0, 0.2499, 0.25, 0.2501])))
    x = torch.cat((finite, torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=torch.float64)))
    x32 = x.float().to(DEVICE)
    y = torch.full_like(x32, 7.0)
    _apply_tanh[(1,)](x32, y, x32.numel(), BLOCK=1024)
    exact = torch.tanh(x32.double().cpu())
    got = y.double().cpu()
    k = finite.numel()
    assert ((got[:k] - exact[:k]).abs() <= 2.5e-7 * exact[:k].abs()).all()
    assert got[k] == 1.0 and got[k + 1] == -1.0 and got[k + 2].isnan()


# ---- differentiable lse ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_lse_gradient(backend, dtype, reduction):
    """A term built on the returned lse trains hidden and weight as torch's logsumexp would;
    dropped rows' lse carries no gradient."""
    hidden, weight, targets = make(29, 12, 150, seed=3, dtype=dtype, scale=2.0, ignored=(0, 5, 17))
    upstream = torch.randn(29, generator=seeded(4)).to(DEVICE)
    kept = targets != -100
    h, w = leaves(hidden, weight)
    loss, lse = linear_cross_entropy(h, w, targets, reduction=reduction, z_loss=1e-3, return_lse=True)
    ((loss * 0.5).sum() + (lse * upstream).sum()).backward()

    h64, w64 = leaves(hidden, weight, dtype=torch.float64)
    logits = h64 @ w64.T
    exact_lse = torch.logsumexp(logits, -1)
    ce = F.cross_entropy(logits, targets, reduction="none") + 1e-3 * torch.where(kept, exact_lse, 0.0).square()
    exact_loss = ce.sum() / kept.sum() if reduction == "mean" else ce
    ((exact_loss * 0.5).sum() + (torch.where(kept, exact_lse, exact_lse.detach()) * upstream).sum()).backward()
    tol = TOLERANCE[dtype]
    assert rel_err(lse, exact_lse) <= tol
    assert rel_err(h.grad, h64.grad) <= tol and rel_err(w.grad, w64.grad) <= tol


def test_lse_gradient_alone(backend):
    """Only lse is used: the loss's upstream gradient is zero, lse's flows alone."""
    hidden, weight, targets = make(9, 8, 40, seed=5)
    h, = leaves(hidden)
    _, lse = linear_cross_entropy(h, weight, targets, return_lse=True)
    lse.square().sum().backward()
    h64, = leaves(hidden, dtype=torch.float64)
    torch.logsumexp(h64 @ weight.double().T, -1).square().sum().backward()
    assert rel_err(h.grad, h64.grad) <= TOLERANCE[torch.float32]


# ---- token accuracy ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_accuracy(backend, reduction):
    """argmax == target on kept rows (Liger's return_token_accuracy): per row, count, or share."""
    hidden, weight, targets = make(40, 8, 12, seed=6, scale=4.0, ignored=(2, 3, 30))
    logits = hidden.double() @ weight.double().T
    targets = torch.where(torch.rand(40, generator=seeded(7)).to(DEVICE) < 0.5, logits.argmax(-1), targets)
    targets[[2, 3, 30]] = -100
    loss, accuracy = linear_cross_entropy(hidden, weight, targets, reduction=reduction, return_accuracy=True)
    kept = targets != -100
    hits = (kept & (logits.argmax(-1) == targets)).float()
    expected = {"none": hits, "sum": hits.sum(), "mean": hits.sum() / kept.sum()}[reduction]
    assert accuracy.dtype == torch.float32 and accuracy.shape == loss.shape
    torch.testing.assert_close(accuracy, expected)
    assert 0 < hits.sum() < kept.sum()


def test_accuracy_and_lse_together_with_nothing_kept(backend):
    hidden, weight, targets = make(5, 4, 10, seed=8, ignored=range(5))
    loss, lse, accuracy = linear_cross_entropy(hidden, weight, targets, return_lse=True, return_accuracy=True)
    assert loss.item() == 0.0 and accuracy.item() == 0.0 and lse.shape == (5,)


# ---- next-token shift --------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift(backend, reduction):
    """shift=True is hidden[..., :-1, :] against targets[..., 1:] (cut-cross-entropy's shift),
    token weights moving with their targets; gradients reach every row but each sequence's last."""
    gen = seeded(9)
    hidden = torch.randn(3, 11, 8, generator=gen).to(DEVICE)
    weight = (torch.randn(50, 8, generator=gen) / 8**0.5).to(DEVICE)
    targets = torch.randint(0, 50, (3, 11), generator=gen).to(DEVICE)
    targets[1, 4] = -100
    token_weights = torch.rand(3, 11, generator=gen).to(DEVICE) + 0.5
    h, = leaves(hidden)
    loss, lse, accuracy = linear_cross_entropy(h, weight, targets, token_weights=token_weights, reduction=reduction,
                                               shift=True, return_lse=True, return_accuracy=True)
    upstream = torch.randn(loss.shape, generator=seeded(10)).to(DEVICE) if reduction == "none" else 1.0
    (loss * upstream).sum().backward()

    h64, = leaves(hidden, dtype=torch.float64)
    logits = h64[:, :-1] @ weight.double().T
    shifted, w = targets[:, 1:], token_weights[:, 1:].double()
    ce = F.cross_entropy(logits.transpose(1, 2), shifted, reduction="none") * w
    exact = ce if reduction == "none" else ce.sum() / w[shifted != -100].sum()
    (exact * upstream).sum().backward()
    assert loss.shape == exact.shape and lse.shape == (3, 10) == (accuracy.shape if reduction == "none" else (3, 10))
    assert rel_err(loss, exact) <= TOLERANCE[torch.float32]
    assert rel_err(lse, torch.logsumexp(logits, -1)) <= TOLERANCE[torch.float32]
    assert rel_err(h.grad, h64.grad) <= TOLERANCE[torch.float32] and (h.grad[:, -1] == 0).all()


def test_shift_edges(backend):
    weight = torch.randn(7, 4, generator=seeded(11)).to(DEVICE)
    one = torch.randn(2, 1, 4, generator=seeded(12)).to(DEVICE)
    targets = torch.zeros(2, 1, dtype=torch.long, device=DEVICE)
    assert linear_cross_entropy(one, weight, targets, shift=True).item() == 0.0  # nothing to predict
    assert linear_cross_entropy(one, weight, targets, shift=True, reduction="none").shape == (2, 0)
    with pytest.raises(ValueError, match="shift needs hidden"):
        linear_cross_entropy(one[0, 0], weight, targets[0, 0], shift=True)
    with pytest.raises(TypeError, match="shift and return_accuracy must be bools"):
        linear_cross_entropy(one, weight, targets, shift=1)


def test_reference_lse_gradient_is_the_stable_one():
    """The reference's own logsumexp: torch's value, gradient exp(x - m) / s, Inf rows as torch."""
    x = torch.tensor([[1e3, 1e3 - 1.0, -1e3], [float("-inf")] * 3, [0.0, float("inf"), 1.0]], requires_grad=True)
    ours = reference.logsumexp(x)
    torch.testing.assert_close(ours, torch.logsumexp(x.detach(), -1))
    ours[0].backward()
    torch.testing.assert_close(x.grad[0], torch.softmax(x.detach()[0].double(), -1).float())


# ---- class weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing, z_loss", [(0.0, 0.0), (0.2, 1e-2)])
def test_class_weights(backend, dtype, reduction, label_smoothing, z_loss):
    """torch's F.cross_entropy(weight=, label_smoothing=) plus Liger's z-loss (not class-weighted,
    "mean" over the kept rows' count), loss and gradients, with a bias and a soft-cap."""
    hidden, weight, targets = make(33, 10, 90, seed=13, dtype=dtype, scale=2.0, ignored=(3, 8, 21))
    bias = torch.randn(90, generator=seeded(14)).to(DEVICE, dtype)
    class_weights = (torch.rand(90, generator=seeded(15)) * 2.0).to(DEVICE)
    h, w, b = leaves(hidden, weight, bias)
    loss = linear_cross_entropy(h, w, targets, bias=b, class_weights=class_weights, label_smoothing=label_smoothing,
                                z_loss=z_loss, softcap=20.0, reduction=reduction)
    upstream = torch.randn(loss.shape, generator=seeded(16)).to(DEVICE) if reduction == "none" else 1.3
    (loss * upstream).sum().backward()

    h64, w64, b64 = leaves(hidden, weight, bias, dtype=torch.float64)
    logits = 20.0 * torch.tanh((h64 @ w64.T + b64) / 20.0)
    kept = targets != -100
    ce = F.cross_entropy(logits, targets, weight=class_weights.double(), label_smoothing=label_smoothing,
                         reduction=reduction)
    z = torch.where(kept, z_loss * torch.logsumexp(logits, -1).square(), 0.0)
    exact = ce + {"none": z, "sum": z.sum(), "mean": z.sum() / kept.sum()}[reduction]
    (exact * upstream).sum().backward()
    tol = TOLERANCE[dtype]
    assert loss.shape == exact.shape
    assert rel_err(loss, exact) <= tol
    for mine, theirs in ((h, h64), (w, w64), (b, b64)):
        assert rel_err(mine.grad, theirs.grad) <= tol


def test_class_weights_with_vocab_range_and_token_weights(backend):
    """class_weights index the whole vocabulary; vocab_range takes its slice. Token weights
    multiply both parts and their "mean" sums (the reference's definition, written out)."""
    hidden, weight, targets = make(21, 8, 60, seed=17, ignored=(4,))
    targets = torch.where(targets >= 0, 20 + targets % 30, targets)
    class_weights = (torch.rand(60, generator=seeded(18)) + 0.5).to(DEVICE)
    class_weights[:20] = float("nan")  # outside vocab_range: never read
    token_weights = (torch.rand(21, generator=seeded(19)) + 0.5).to(DEVICE)
    h, = leaves(hidden)
    loss = linear_cross_entropy(h, weight, targets, class_weights=class_weights, token_weights=token_weights,
                                vocab_range=(20, 50), label_smoothing=0.1, z_loss=1e-2)
    loss.backward()
    h64, = leaves(hidden, dtype=torch.float64)
    logits = h64 @ weight.double()[20:50].T
    kept = targets >= 0
    c = class_weights.double()[20:50]
    column = torch.where(kept, targets - 20, 0)
    lse = torch.logsumexp(logits, -1)
    nll = c[column] * (lse - logits.gather(1, column[:, None])[:, 0])
    smooth = (c.sum() * lse - logits @ c) / 30
    tw = torch.where(kept, token_weights.double(), 0.0)
    exact = ((tw * (0.9 * nll + 0.1 * smooth)).sum() / (tw * c[column]).sum()
             + (tw * 1e-2 * lse.square()).sum() / tw.sum())
    exact.backward()
    assert rel_err(loss, exact) <= TOLERANCE[torch.float32]
    assert rel_err(h.grad, h64.grad) <= TOLERANCE[torch.float32]


def test_class_weights_bad_input():
    hidden, weight, targets = make(4, 3, 7, seed=20)
    with pytest.raises(ValueError, match=r"class_weights must be \[V\]"):
        linear_cross_entropy(hidden, weight, targets, class_weights=torch.ones(6, device=DEVICE))
    with pytest.raises(TypeError, match="class_weights must be a floating"):
        linear_cross_entropy(hidden, weight, targets, class_weights=torch.ones(7, dtype=torch.long, device=DEVICE))


def test_bench_cost_model():
    """The benchmark's model: where compute bounds every phase, 6 N D V FLOPs at the matmul rate on
    the row path (the workspace holds the fp32 dW and row chunks) and 8 N D V on the column path; more
    where the bandwidth is tiny; a bigger workspace never predicts slower."""
    from unimm.bench.cross_entropy import cost_model

    n, d, v = 8192, 4096, 161280
    fast_memory = dict(bf16_matmul_tflops=500.0, copy_gbps=1e9)
    cpu = torch.device("cpu")
    assert cost_model(n, d, v, 2, fast_memory, cpu, 64 << 20) == pytest.approx(8 * n * d * v / 500e12 * 1e3)
    assert cost_model(n, d, v, 2, fast_memory, cpu, 8 << 30) == pytest.approx(6 * n * d * v / 500e12 * 1e3)
    assert cost_model(n, d, v, 2, dict(bf16_matmul_tflops=500.0, copy_gbps=10.0), cpu) > 2 * cost_model(
        n, d, v, 2, fast_memory, cpu)
    slow = dict(bf16_matmul_tflops=500.0, copy_gbps=1000.0)
    assert cost_model(n, d, v, 2, slow, cpu, 4 << 30) <= cost_model(n, d, v, 2, slow, cpu, 64 << 20)


# ---- gradient filtering ------------------------------------------------------------------------

def _filter_tile(dtype):
    from unimm.kernels.cross_entropy import _filter_tile
    return _filter_tile(dtype)


@pytest.mark.parametrize("eps", [0.0, 1e-30])
def test_grad_filter_tiny_eps_is_exact(backend, eps):
    """eps = 0 drops nothing (p >= 0); a tiny eps drops at most negligible terms."""
    hidden, weight, targets = make(21, 8, 70, seed=11, scale=3.0, ignored=(4,))
    grads = []
    for filter_eps in (None, eps):
        h, w = leaves(hidden, weight)
        linear_cross_entropy(h, w, targets, z_loss=1e-3, grad_filter_eps=filter_eps).backward()
        grads.append((h.grad, w.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction, label_smoothing, chunked", [("mean", 0.0, False), ("none", 0.1, True)])
def test_grad_filter_matches_reference(backend, dtype, reduction, label_smoothing, chunked, monkeypatch):
    """eps > 0: the tiles whose kept p are all below eps lose their p term, on the kernel as on
    the reference's materialised softmax; both the forward ("mean") and backward ("none") paths,
    in one dx chunk or in one chunk per column tile."""
    if chunked:
        from unimm.kernels import cross_entropy
        monkeypatch.setattr(cross_entropy, "WORKSPACE_BYTES", 1)
    eps = 0.02
    hidden, weight, targets = make(37, 16, 150, seed=12, dtype=dtype, scale=0.5, ignored=(3, 20))
    bias = torch.zeros(150, dtype=dtype, device=DEVICE)
    bias[:16] = 4.0  # p ~ 0.05 there, ~ 1e-3 elsewhere: the first column tile stays, later ones go
    upstream = torch.rand(37, generator=seeded(13)).to(DEVICE)
    h, w = leaves(hidden, weight)
    loss = linear_cross_entropy(h, w, targets, bias=bias, reduction=reduction, label_smoothing=label_smoothing,
                                z_loss=1e-3, grad_filter_eps=eps)
    (loss * upstream if reduction == "none" else loss).sum().backward()

    tile = _filter_tile(dtype)
    grads = {}
    for name, filter_eps in (("filtered", eps), ("exact", None)):
        h64, w64 = leaves(hidden, weight, dtype=torch.float64)
        ref = reference.linear_cross_entropy(h64, w64, targets, bias=bias.double(), reduction=reduction,
                                             label_smoothing=label_smoothing, z_loss=1e-3, grad_filter_eps=filter_eps,
                                             grad_filter_tile=tile, compute_dtype=torch.float64)
        (ref * upstream.double() if reduction == "none" else ref).sum().backward()
        grads[name] = (h64.grad, w64.grad)
    tol = TOLERANCE[dtype]
    assert rel_err(grads["filtered"][1], grads["exact"][1]) > 1e-3  # the filter drops something ...
    assert (grads["filtered"][1] != grads["exact"][1]).any(-1).float().mean() < 1  # ... but not everything
    assert rel_err(h.grad, grads["filtered"][0]) <= tol and rel_err(w.grad, grads["filtered"][1]) <= tol


def test_grad_filter_keeps_the_target_term(backend):
    """eps near 1 drops every p term: the gradient of the mean loss is then -[v = t] / N alone."""
    hidden, weight, targets = make(13, 8, 90, seed=14, ignored=(6,))
    h, w = leaves(hidden, weight)
    linear_cross_entropy(h, w, targets, grad_filter_eps=0.999).backward()
    kept = targets != -100
    dlogits = -F.one_hot(targets.clamp(min=0), 90).double() * kept[:, None] / kept.sum()
    assert rel_err(h.grad, dlogits @ weight.double()) <= TOLERANCE[torch.float32]
    assert rel_err(w.grad, dlogits.T @ hidden.double()) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("eps, error", [("0.1", TypeError), (True, TypeError), (1.0, ValueError),
                                        (-1e-3, ValueError), (float("nan"), ValueError)])
def test_grad_filter_bad_input(eps, error):
    hidden, weight, targets = make(3, 4, 5, seed=15)
    with pytest.raises(error, match="grad_filter_eps"):
        linear_cross_entropy(hidden, weight, targets, grad_filter_eps=eps)
