"""linear_cross_entropy's two gradient paths (``unimm.kernels._cross_entropy_cost.plan``): the row
path (logits formed once, 6 N D V FLOPs) in one chunk and in several, and the column path, each
against the fp64 reference on every option that reaches the gradient kernels; and the plan itself."""

import pytest
import torch

from unimm.kernels import _cross_entropy_cost as cost
from unimm.kernels import cross_entropy, linear_cross_entropy
from unimm.kernels.reference import cross_entropy as reference
from unimm.testing import DEVICE, DTYPES, TOLERANCE, rel_err, seeded

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy, in the interpreter

N, D, V = 45, 12, 150


def _inputs(dtype, seed, bias=True):
    gen = seeded(seed)
    hidden = torch.randn(N, D, generator=gen)
    weight = torch.randn(V, D, generator=gen) * 2.0 / D**0.5
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[[2, 17, 40]] = -100
    b = torch.randn(V, generator=gen) if bias else None
    cast = lambda t: t.to(DEVICE, dtype) if t is not None else None
    return cast(hidden), cast(weight), targets.to(DEVICE), cast(b)


@pytest.fixture(params=["rows, one chunk", "rows, chunks", "columns"])
def path(request, monkeypatch):
    """Forces a gradient path; "rows, chunks": a workspace of 20 16-bit rows (the interpreter's row
    tile is 16) with room for the fp32 dW, so 45 rows take chunks of 16. Yields the rows per chunk
    of each row-path call (empty on the column path)."""
    from unimm.kernels import _cross_entropy_rows as rows_backend

    if request.param == "columns":
        monkeypatch.setattr(cross_entropy, "GRADIENT_PATH", "columns")
    else:
        monkeypatch.setattr(cross_entropy, "GRADIENT_PATH", "rows")
        if request.param == "rows, chunks":
            per_row = V * 2 + 16 * 5  # fp16 logits and five 32-column tiles of statistics
            monkeypatch.setattr(cross_entropy, "WORKSPACE_BYTES", 20 * per_row + 4 * V * D)
    seen = []
    real = rows_backend.gradients_with_statistics

    def spy(hidden, *args, **kwargs):
        seen.append(min(hidden.shape[0], args[6]))
        return real(hidden, *args, **kwargs)

    monkeypatch.setattr(rows_backend, "gradients_with_statistics", spy)
    yield request.param, seen


@pytest.fixture
def triton_only(backend):
    if backend != "triton":
        pytest.skip("the gradient paths are the Triton backend's")
    return backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", [
    dict(),
    dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0),
    dict(reduction="sum", vocab_range=(20, 150)),
    dict(class_weights=True, label_smoothing=0.2, token_weights=True),
    dict(grad_filter_eps=0.01),
], ids=["plain", "smooth-z-softcap", "sum-range", "class-token-weights", "filter"])
def test_paths_match_the_reference(triton_only, path, dtype, options):
    name, seen = path
    options = dict(options)
    hidden, weight, targets, bias = _inputs(dtype, seed=len(options) + 7)
    gen = seeded(3)
    if options.pop("class_weights", False):
        options["class_weights"] = (torch.rand(V, generator=gen) + 0.5).to(DEVICE)
    if options.pop("token_weights", False):
        options["token_weights"] = torch.rand(N, generator=gen).to(DEVICE)
    if "vocab_range" in options:
        lo, hi = options["vocab_range"]
        keep = targets >= 0
        targets[keep] = lo + targets[keep] % (hi - lo)
    if "grad_filter_eps" in options:
        from unimm.kernels.cross_entropy import _filter_tile
        options["grad_filter_tile"] = _filter_tile(dtype)
    ref_options = dict(options)
    options.pop("grad_filter_tile", None)

    ours = [t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(*ours[:2], targets, bias=ours[2], **options)
    loss.backward()
    refs = [t.detach().double().requires_grad_(True) for t in (hidden, weight, bias)]
    ref = reference.linear_cross_entropy(*refs[:2], targets, bias=refs[2], compute_dtype=torch.float64, **ref_options)
    ref.backward()

    if name == "columns":
        assert seen == []
    else:
        assert len(seen) == 1 and (seen[0] == N if name == "rows, one chunk" else seen[0] < N and seen[0] % 16 == 0)
    tol = TOLERANCE[dtype]
    assert abs(loss.item() - ref.item()) <= tol * max(1.0, abs(ref.item()))
    for what, mine, theirs in zip(("hidden", "weight", "bias"), ours, refs):
        assert mine.grad.dtype == mine.dtype, what
        assert rel_err(mine.grad, theirs.grad) <= tol, what


def test_row_path_dropped_rows_with_inf_hidden(triton_only, path):
    """A dropped row whose hidden is Inf or NaN passes nothing, on every path and chunking."""
    hidden, weight, targets, bias = _inputs(torch.float32, seed=1)
    hidden[2] = float("inf")
    hidden[17, 3] = float("nan")
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
    loss = linear_cross_entropy(h, w, targets, bias=b)
    loss.backward()
    keep = targets != -100
    h64, w64, b64 = (t.detach().double()[keep] if i == 0 else t.detach().double() for i, t in
                     enumerate((hidden, weight, bias)))
    for t in (h64, w64, b64):
        t.requires_grad_(True)
    ref = reference.linear_cross_entropy(h64, w64, targets[keep], bias=b64, compute_dtype=torch.float64)
    ref.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.item()) <= 1e-5
    assert (h.grad[~keep] == 0).all() and rel_err(h.grad[keep], h64.grad) <= TOLERANCE[torch.float32]
    assert rel_err(w.grad, w64.grad) <= TOLERANCE[torch.float32]
    assert rel_err(b.grad, b64.grad) <= TOLERANCE[torch.float32]


def test_row_path_is_the_default_when_it_fits(triton_only, monkeypatch):
    """With the model's choice (no forcing), a scalar loss whose rows fit the workspace takes the row
    path; "none" (gradients wait for backward) takes the column path."""
    from unimm.kernels import _cross_entropy_rows as rows_backend

    calls = []
    real = rows_backend.gradients_with_statistics
    monkeypatch.setattr(rows_backend, "gradients_with_statistics", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = seeded(2)  # a wide enough D: the row path trades 2 N D V FLOPs for 2 N V e bytes
    hidden, weight = torch.randn(16, 256, generator=gen).to(DEVICE), torch.randn(64, 256, generator=gen).to(DEVICE)
    targets = torch.randint(0, 64, (16,), generator=gen).to(DEVICE)
    h = hidden.clone().requires_grad_(True)
    linear_cross_entropy(h, weight, targets).backward()
    assert calls == [1]
    linear_cross_entropy(h, weight, targets, reduction="none").sum().backward()
    assert calls == [1]


def test_plan():
    """6 N D V FLOPs on the row path, 8 on the column path; the row path only when the gradients are
    computed with the loss and the workspace holds a row tile (and the fp32 dW of a 16-bit head when
    it takes several chunks); chunks are whole row tiles."""
    n, d, v = 16384, 4096, 161280
    flops = lambda p: sum(f for _, f, _ in p.phases)
    big = cost.plan(n, d, v, 2, 8 << 30, grads_now=True, want_dw=True)
    assert big.path == "rows" and big.size % 128 == 0 and flops(big) == 6 * n * d * v
    assert cost.plan(n, d, v, 2, 8 << 30, grads_now=False, want_dw=True).path == "columns"
    small = cost.plan(n, d, v, 2, 1 << 30, grads_now=True, want_dw=True)
    assert small.path == "columns" and flops(small) == 8 * n * d * v  # 1 GiB < the fp32 dW alone
    frozen_head = cost.plan(n, d, v, 2, 1 << 30, grads_now=True, want_dw=False)
    assert frozen_head.path == "rows" and frozen_head.size == (1 << 30) // (v * 2 + 16 * 1260) // 128 * 128
    assert cost.plan(2048, d, v, 2, 1 << 30, grads_now=True, want_dw=True) == cost.Plan(
        "rows", 2048, cost.row_phases(2048, d, v, 2, 2048, 128, True))
    assert cost.row_chunk(n, d, v, 2, 100, (128, 128), True) == 0


@pytest.mark.parametrize("path_name, chunks", [("rows", 1), ("rows", 3), ("columns", 1), ("columns", 2)])
def test_filtering_skips_tiles(triton_only, monkeypatch, path_name, chunks):
    """With gradient filtering the dH and dW GEMMs of both paths visit only the dx tiles that may
    be non-zero (here most are filtered away), and the gradients equal the reference's filtered
    ones: the row path in one chunk of rows or three, the column path in one chunk of columns or two."""
    from unimm.kernels import _cross_entropy_rows as rows_backend
    from unimm.kernels import _cross_entropy_triton as ce_triton
    from unimm.kernels.cross_entropy import _filter_tile

    monkeypatch.setattr(cross_entropy, "GRADIENT_PATH", path_name)
    if path_name == "rows" and chunks > 1:
        monkeypatch.setattr(cross_entropy, "WORKSPACE_BYTES", 20 * (V * 2 + 16 * 5) + 4 * V * D)
    if path_name == "columns" and chunks > 1:
        monkeypatch.setattr(cross_entropy, "WORKSPACE_BYTES", N * 4 * 96)  # 96 of the 150 columns
    fractions = []
    real = ce_triton._listed_matmul

    def spy(a, b, out, live, *args, **kwargs):
        fractions.append(live.float().mean().item())
        return real(a, b, out, live, *args, **kwargs)

    monkeypatch.setattr(rows_backend, "_listed_matmul", spy)
    monkeypatch.setattr(ce_triton, "_listed_matmul", spy)
    hidden, weight, targets, _ = _inputs(torch.float32, seed=9, bias=False)
    targets[targets >= 0] = targets[targets >= 0] % 32  # every target in the first column tile
    bias = torch.zeros(V, device=DEVICE)
    bias[:32] = 12.0  # p ~ 0.03 there, < 1e-4 elsewhere: later column tiles are filtered away
    h, w = (t.detach().clone().requires_grad_(True) for t in (hidden, weight))
    linear_cross_entropy(h, w, targets, bias=bias, grad_filter_eps=1e-3).backward()
    h64, w64 = (t.detach().double().requires_grad_(True) for t in (hidden, weight))
    reference.linear_cross_entropy(h64, w64, targets, bias=bias.double(), grad_filter_eps=1e-3,
                                   grad_filter_tile=_filter_tile(torch.float32), compute_dtype=torch.float64).backward()
    assert len(fractions) == 2 * chunks  # dH and dW per chunk
    assert sum(fractions) / len(fractions) < 0.5 and fractions[0] > 0, fractions
    assert rel_err(h.grad, h64.grad) <= TOLERANCE[torch.float32]
    assert rel_err(w.grad, w64.grad) <= TOLERANCE[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("path_name, workspace_mb", [("rows", 1024), ("rows", 192), ("columns", 1024)],
                         ids=["rows-one-chunk", "rows-chunks", "columns"])
@pytest.mark.parametrize("filter_eps", [None, 1e-4], ids=["exact", "filtered"])
def test_gpu_bf16_paths(monkeypatch, path_name, workspace_mb, filter_eps):
    """bf16 at a real size on each path (the row path keeps x - tile max in bf16): loss and
    gradients against the fp64 reference (filtered on the dx GEMM's tiles where filtering)."""
    from unimm.kernels.cross_entropy import _filter_tile

    monkeypatch.setattr(cross_entropy, "GRADIENT_PATH", path_name)
    monkeypatch.setattr(cross_entropy, "WORKSPACE_BYTES", workspace_mb << 20)
    n, d, v = 4096, 1024, 32000  # 192 MiB: the fp32 dW and 1024-row chunks
    gen = seeded(21)
    hidden = torch.randn(n, d, generator=gen).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(v, d, generator=gen) * 3 / d**0.5).to(DEVICE, torch.bfloat16)
    targets = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    targets[::9] = -100
    ours = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    linear_cross_entropy(*ours, targets, label_smoothing=0.1, z_loss=1e-4, grad_filter_eps=filter_eps).backward()
    refs = [t.double().requires_grad_(True) for t in (hidden, weight)]
    reference.linear_cross_entropy(*refs, targets, label_smoothing=0.1, z_loss=1e-4, grad_filter_eps=filter_eps,
                                   grad_filter_tile=_filter_tile(torch.bfloat16),
                                   compute_dtype=torch.float64).backward()
    for mine, theirs in zip(ours, refs):
        assert rel_err(mine.grad, theirs.grad) <= TOLERANCE[torch.bfloat16]
