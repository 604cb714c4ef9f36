"""vq_quantize / vq_lookup against the reference, on every backend live here."""

import pytest
import torch

from unimm import _ext
from unimm.kernels import BackendUnavailable, vq, vq_lookup, vq_quantize
from unimm.kernels._common import cdiv, split_columns
from unimm.kernels.reference import vq as reference
from unimm.testing import DEVICE, DTYPES, HAS_GPU, available_backends, seeded


def random(shape, seed, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=seeded(seed)) * scale).to(DEVICE, dtype)


def assert_nearest(z, codebook, got, metric, rel_tol=1e-5, min_exact=0.99):
    """Every pick is a true nearest code up to fp32 rounding, and nearly all equal the reference."""
    want = reference.vq_quantize(z, codebook, metric)
    assert got.shape == z.shape[:-1] and got.dtype == torch.int64 and got.device == z.device
    got, want = got.reshape(-1), want.reshape(-1)
    assert got.min() >= 0 and got.max() < codebook.shape[0]
    rows, codes = z.reshape(-1, z.shape[-1]).double(), codebook.double()
    gap = reference.pair_distances(rows, codes[got], metric) - reference.pair_distances(rows, codes[want], metric)
    # rounding of the kernel's arithmetic is relative to the squared norms involved
    scale = 4.0 if metric == "cosine" else rows.square().sum(-1) + codes.square().sum(-1).max()
    gap = gap / scale
    assert (gap <= rel_tol).all(), f"picked codes farther than the nearest by {gap.max().item():.3g} (relative)"
    assert (got == want).float().mean() >= min_exact


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, d", [(1, 1, 1), (37, 129, 3), (300, 1000, 4), (45, 301, 8), (70, 77, 17),
                                     (33, 250, 40), (20, 70, 70)])
def test_matches_reference(backend, metric, dtype, n, k, d):
    seed = n * 1000 + k + d
    z = random((n, d), seed, dtype)
    codebook = random((k, d), seed + 1, dtype)
    assert_nearest(z, codebook, vq_quantize(z, codebook, metric=metric), metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_lowest_index(backend, metric):
    # Small integers: every distance is exact in fp16/fp32, so ties are real ties.
    gen = seeded(7)
    base = torch.randint(-2, 3, (40, 6), generator=gen).float()
    codebook = torch.cat([base, base, base[:13]])  # every code appears at least twice
    z = torch.randint(-2, 3, (257, 6), generator=gen).float()
    for dtype in (torch.float32, torch.float16):
        got = vq_quantize(z.to(DEVICE, dtype), codebook.to(DEVICE, dtype), metric=metric).cpu()
        assert torch.equal(got, reference.vq_quantize(z, codebook, metric))
        assert got.max() < 40  # the first copy always wins


def test_batch_dims_and_empty(backend):
    codebook = random((50, 12), 1)
    z = random((2, 3, 5, 12), 2)
    got = vq_quantize(z, codebook)
    assert got.shape == (2, 3, 5)
    assert torch.equal(got.reshape(-1), vq_quantize(z.reshape(-1, 12), codebook))
    assert_nearest(z, codebook, got, "l2")
    for shape in [(0, 12), (2, 0, 12)]:
        empty = vq_quantize(torch.empty(shape, device=DEVICE), codebook)
        assert empty.shape == shape[:-1] and empty.dtype == torch.int64
    assert vq_quantize(random((12,), 3), codebook).shape == ()


def test_non_contiguous_inputs(backend):
    codebook = random((10, 33), 5).T  # [33, 10], column-major
    strided_d = random((64, 20), 4)[:, ::2]  # stride 2 along d
    column_major = random((10, 31), 6).T
    broadcast = random((1, 10), 8).expand(5, 10)  # row stride 0
    for z in (strided_d, column_major, broadcast):
        assert_nearest(z, codebook, vq_quantize(z, codebook), "l2", min_exact=1.0)


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e4, 1e20, 1e35])
def test_extreme_magnitudes(backend, scale):
    z = random((60, 9), 9, scale=scale)
    codebook = random((200, 9), 10, scale=scale)
    for metric in ("l2", "cosine"):
        assert_nearest(z, codebook, vq_quantize(z, codebook, metric=metric), metric)


def test_cosine_zero_vectors(backend):
    codebook = random((20, 5), 11)
    codebook[3] = 0
    z = random((30, 5), 12)
    z[:4] = 0
    got = vq_quantize(z, codebook, metric="cosine")
    assert torch.equal(got.cpu(), reference.vq_quantize(z, codebook, "cosine").cpu())


def test_many_splits_and_tiles(backend):
    # Few rows and many codes: the codebook is split across programs and reduced afterwards.
    z = random((5, 6), 13)
    codebook = random((5000, 6), 14)
    codebook[4321] = z[2]  # an exact hit far into the codebook
    codebook[4999] = z[4]  # in the last, partial tile
    got = vq_quantize(z, codebook)
    assert got[2] == 4321 and got[4] == 4999
    assert_nearest(z, codebook, got, "l2")


def test_triton_writes_every_output():
    """Launches the Triton kernel into poisoned per-split buffers: every slot must be written."""
    if "triton" not in available_backends():
        pytest.skip("triton backend not live here")
    z = random((45, 19), 15)
    codebook = random((700, 19), 16)
    config = vq._triton_config(19, z.dtype, not HAS_GPU)
    splits, codes_per_split = split_columns(cdiv(45, config["BLOCK_N"]), 700, config["BLOCK_K"], DEVICE)
    assert splits > 1
    part_dist = torch.full((splits, 45), float("nan"), device=DEVICE)
    part_idx = torch.full((splits, 45), -1, dtype=torch.int64, device=DEVICE)
    operands = vq._triton_operands(z, codebook, "l2")
    vq._launch_triton_argmin(*operands, part_dist, part_idx, codes_per_split, False, config)
    assert not part_dist.isnan().any() and (part_idx >= 0).all()
    for s in range(splits):  # each split's winner lies in its own code range
        assert (part_idx[s] >= s * codes_per_split).all() and (part_idx[s] < (s + 1) * codes_per_split).all()
    assert torch.equal(vq._combine_splits(part_dist, part_idx), reference.vq_quantize(z, codebook, "l2"))


# ---- lookup -------------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_lookup_and_gradient(index_dtype):
    codebook = random((17, 6), 20).requires_grad_(True)
    indices = torch.randint(0, 17, (4, 9), generator=seeded(21)).to(DEVICE, index_dtype)
    out = vq_lookup(indices, codebook)
    assert out.shape == (4, 9, 6)
    assert torch.equal(out, codebook[indices.long()])
    upstream = random((4, 9, 6), 22)
    (out * upstream).sum().backward()
    expected = torch.zeros(17, 6, device=DEVICE).index_add_(0, indices.reshape(-1).long(), upstream.reshape(-1, 6))
    torch.testing.assert_close(codebook.grad, expected)
    assert vq_lookup(indices[:0], codebook).shape == (0, 9, 6)


def test_lookup_out_of_range_is_nan():
    """No host check: -1 (quantize's "no code") and any index outside [0, K) give NaN vectors and
    send no gradient; in-range rows are untouched."""
    codebook = random((17, 6), 23).requires_grad_(True)
    indices = torch.tensor([[0, -1], [17, 5], [1000, -7]], device=DEVICE)
    out = vq_lookup(indices, codebook)
    valid = torch.tensor([[True, False], [False, True], [False, False]], device=DEVICE)
    assert out[~valid].isnan().all() and torch.equal(out[valid], codebook[[0, 5]])
    out.nan_to_num(0.0).sum().backward()
    want = torch.zeros(17, 6, device=DEVICE)
    want[[0, 5]] = 1.0
    torch.testing.assert_close(codebook.grad, want)


def test_lookup_bad_arguments():
    codebook = random((17, 6), 24)
    with pytest.raises(TypeError, match="indices must be an integer tensor"):
        vq_lookup(torch.zeros(3, device=DEVICE), codebook)
    with pytest.raises(TypeError, match="codebook must be a floating tensor"):
        vq_lookup(torch.zeros(3, dtype=torch.long, device=DEVICE), codebook.long())
    with pytest.raises(ValueError, match="codebook must be 2-D"):
        vq_lookup(torch.zeros(3, dtype=torch.long, device=DEVICE), codebook[0])
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        vq_lookup([0, 1], codebook)


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, match", [
    (lambda z, c: (z[:, :5], c), ValueError, "code-dim mismatch"),
    (lambda z, c: (z, c[:0]), ValueError, "codebook is empty"),
    (lambda z, c: (z, c[0]), ValueError, "codebook must be 2-D"),
    (lambda z, c: (z[:, :0], c[:, :0]), ValueError, "code_dim 0"),
    (lambda z, c: (z.long(), c), TypeError, "z must be a floating tensor"),
    (lambda z, c: (z, c.int()), TypeError, "codebook must be a floating tensor"),
    (lambda z, c: (z.half(), c), TypeError, "same dtype"),
    (lambda z, c: (z.tolist(), c), TypeError, "z must be a torch.Tensor"),
    (lambda z, c: (z.to("meta"), c), ValueError, "same device"),
])
def test_bad_input(make, error, match):
    z, codebook = make(random((10, 8), 30), random((20, 8), 31))
    with pytest.raises(error, match=match):
        vq_quantize(z, codebook)


def test_bad_metric():
    with pytest.raises(ValueError, match="metric must be one of"):
        vq_quantize(random((10, 8), 30), random((20, 8), 31), metric="dot")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on NaN / Inf operands
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_non_finite_rows_and_codes(backend, metric):
    """No host check: a row holding NaN / Inf gets -1, a code holding one is never picked, every
    other row is as without them."""
    z, codebook = random((40, 8), 36), random((60, 8), 37)
    want = reference.vq_quantize(z, codebook, metric)
    z[3, 2], z[7, 0], z[9] = float("nan"), float("inf"), float("-inf")
    codebook[want[11], 4] = float("nan")
    codebook[want[12], 1] = float("inf")
    got = vq_quantize(z, codebook, metric=metric)
    assert torch.equal(got, reference.vq_quantize(z, codebook, metric))
    assert got[[3, 7, 9]].tolist() == [-1, -1, -1]
    assert got[11] != want[11] and got[12] != want[12] and got.max() < 60
    others = ~torch.isin(want, want[[11, 12]])  # rows whose nearest code is still clean
    others[[3, 7, 9]] = False
    assert torch.equal(got[others], want[others])
    assert (vq_quantize(z, torch.full_like(codebook, float("nan")), metric=metric) == -1).all()


def test_float64_is_served_by_reference(monkeypatch):
    z, codebook = random((10, 8), 32, torch.float64), random((20, 8), 33, torch.float64)
    assert torch.equal(vq_quantize(z, codebook), reference.vq_quantize(z, codebook, "l2"))
    if "triton" in available_backends():
        monkeypatch.setenv("UNIMM_BACKEND", "triton")
        with pytest.raises(BackendUnavailable, match="float64"):
            vq_quantize(z, codebook)


def test_compile_sees_one_op():
    z, codebook = random((10, 8), 34), random((20, 8), 35)
    out = torch.library.opcheck(torch.ops.unimm.vq_quantize.default, (z, codebook, "l2"))
    assert all(v == "SUCCESS" for v in out.values())
    idx = vq_quantize(z, codebook)
    out = torch.library.opcheck(torch.ops.unimm.vq_lookup.default, (idx, codebook.requires_grad_(True)))
    assert all(v == "SUCCESS" for v in out.values())


# ---- GPU ----------------------------------------------------------------------------------------
#
# Fast tier (`pytest -m gpu`), counted for a cold Triton cache. Triton specialises on constexprs
# (COSINE, PRECISION, tiles) and on every int argument that is 1 or divisible by 16 (and on
# 16-byte pointer alignment), so the cases share their sizes' classes:
#   * test_gpu_bf16_real_sizes: `_vq_argmin_kernel` bf16 at d = 256, n, k, codes_per_split all
#     divisible by 16: l2 and cosine (COSINE) = 2 compiles; the odd case (n 999, k 777, d 100:
#     nothing divisible by 16, another tile config) = 1 compile. The d <= 32 cases run the CUDA
#     kernel (precompiled): 0.
#   * test_gpu_cuda_writes_every_output, test_gpu_cuda_rejects_bad_launch,
#     test_gpu_extension_serves_this_device: CUDA / host only, 0.
# Total: 3 Triton compiles (~5 s) plus ~5 s of fp64 reference work.
# Full tier (`pytest -m gpu_full`): test_gpu_real_sizes, the dtype x shape x metric x backend grid.

GPU_BF16_CASES = [  # (n, k, d, metric), automatic dispatch
    (4096, 16384, 8, "l2"),  # LlamaGen's codebook: the CUDA kernel (d <= 32)
    (4096, 16384, 8, "cosine"),  # LlamaGen normalises: the CUDA kernel on fp32 unit vectors
    (8192, 32768, 4, "l2"),  # Emu3's codebook: the CUDA kernel
    (1024, 8192, 256, "l2"),  # a wide code dim: Triton
    (1024, 8192, 256, "cosine"),
    (999, 777, 100, "l2"),  # Triton, nothing divisible by 16 (rows, codes, dim, strides)
]


def served_by(monkeypatch) -> list[str]:
    """Records which accelerated backend each vq_quantize call ran (none: the reference)."""
    calls = []
    for name, backend in (("_quantize_cuda", "cuda"), ("_quantize_triton", "triton")):
        def spy(*args, _run=getattr(vq, name), _backend=backend):
            calls.append(_backend)
            return _run(*args)
        monkeypatch.setattr(vq, name, spy)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("n, k, d, metric", GPU_BF16_CASES)
def test_gpu_bf16_real_sizes(monkeypatch, n, k, d, metric):
    """The backend a user gets, at real codebook sizes in bf16, against the fp64 reference."""
    z = random((n, d), n + d, torch.bfloat16)
    codebook = random((k, d), k + d, torch.bfloat16)
    calls = served_by(monkeypatch)
    got = vq_quantize(z, codebook, metric=metric)
    want = "cuda" if d <= 32 and "cuda" in available_backends() else "triton"
    assert calls == [want], f"served by {calls or 'the reference'}, expected {want}"
    assert_nearest(z, codebook, got, metric, min_exact=0.98)


@pytest.mark.gpu_full
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, d", [(4099, 16384, 8), (8100, 32768, 4), (1000, 8192, 256), (257, 262144, 256),
                                     (3001, 5003, 31), (2000, 3000, 33), (999, 777, 100)])
def test_gpu_real_sizes(backend, metric, dtype, n, k, d):
    z = random((n, d), n + d, dtype)
    codebook = random((k, d), k + d, dtype)
    assert_nearest(z, codebook, vq_quantize(z, codebook, metric=metric), metric, min_exact=0.98)


def cuda_live():
    if not _ext.has("vq_argmin_small_d") or _ext.serves_device(DEVICE) is not None:
        pytest.skip("CUDA backend not live")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [1, 4, 5, 8, 16, 31, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_cuda_writes_every_output(d, dtype):
    """The raw CUDA entry point: every slot of the -1 poisoned per-split indices is written, and
    part_dist (the row scales on entry) holds finite distances on exit."""
    cuda_live()
    C = _ext.lib()
    n, k = 3001, 5003
    z, codebook = random((n, d), 40, dtype), random((k, d), 41, dtype)
    splits, codes_per_split = split_columns(cdiv(n, C.vq_small_d_rows_per_block(d)), k,
                                              C.VQ_SMALL_TILE_CODES, DEVICE)
    assert splits > 1
    # on entry part_dist holds the row scales (every split); part_idx is poisoned
    part_dist = vq._cuda_row_scales(z, codebook).expand(splits, n).contiguous()
    part_idx = torch.full((splits, n), -1, dtype=torch.int64, device=DEVICE)
    C.vq_argmin_small_d(z.data_ptr(), z.stride(0), codebook.data_ptr(), codebook.stride(0), n, k, d, codes_per_split,
                        splits, part_dist.data_ptr(), part_idx.data_ptr(), _ext.DTYPE_CODES[dtype], DEVICE.index or 0,
                        torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.isfinite(part_dist).all() and (part_idx >= 0).all()
    for s in range(splits):  # each split's winner lies in its own code range
        assert (part_idx[s] >= s * codes_per_split).all() and (part_idx[s] < (s + 1) * codes_per_split).all()
    assert_nearest(z, codebook, vq._combine_splits(part_dist, part_idx), "l2")


@pytest.mark.gpu
def test_gpu_cuda_rejects_bad_launch():
    if not _ext.has("vq_argmin_small_d"):
        pytest.skip("unimm._C not built")
    with pytest.raises(ValueError, match="d must be in"):
        _ext.lib().vq_argmin_small_d(0, 64, 0, 64, 10, 10, 64, 256, 1, 0, 0, 0, 0, 0)


@pytest.mark.gpu
def test_gpu_extension_serves_this_device():
    """unimm._C's host functions on a device: it sees the GPUs torch sees, the driver can run its
    statically linked runtime, and it holds code for this chip (else every CUDA test would skip)."""
    if not _ext.available():
        pytest.skip(f"unimm._C not built ({_ext.load_error})")
    C = _ext.lib()
    assert C.device_count() == torch.cuda.device_count()
    info = _ext.build_info()
    assert C.driver_version() // 1000 >= info["cudart_version"] // 1000, (
        f"the driver (CUDA {C.driver_version()}) is older than unimm._C's runtime ({info['cudart_version']})")
    major, _ = torch.cuda.get_device_capability(DEVICE)
    if major in (8, 9):  # the default build's sm_80 / sm_90a / compute_80 code serves these chips
        assert _ext.serves_device(DEVICE) is None, _ext.serves_device(DEVICE)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_reference_chunking_keeps_ties(monkeypatch, metric):
    # The reference's running minimum over row and code chunks must equal the one-shot argmin.
    gen = seeded(50)
    base = torch.randint(-2, 3, (9, 5), generator=gen).double()
    codebook = torch.cat([base, base, base])
    z = torch.randint(-2, 3, (31, 5), generator=gen).double()
    whole = reference.vq_distances(z, codebook, metric).argmin(-1)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 20)  # 4 codes x 1 row per chunk
    assert torch.equal(reference.vq_quantize(z, codebook, metric), whole)
    assert whole.max() < 9
