"""decode_attention over paged KV caches (a block table, as vLLM / flashinfer) equals contiguous decode."""

import pytest
import torch

from unimm import _ext
from unimm.kernels import BackendUnavailable, decode, decode_attention
from unimm.kernels.reference import decode as reference
from unimm.testing import DECODE_TOLERANCE, DEVICE, HAS_GPU, available_backends, rel_err, seeded


def random(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=seeded(seed)).to(DEVICE, dtype)


def contiguous_inputs(batch, q_heads, kv_heads, head_dim, max_len, dtype, seed, lens):
    q = random((batch, q_heads, head_dim), seed, dtype)
    k = random((batch, max_len, kv_heads, head_dim), seed + 1, dtype)
    v = random((batch, max_len, kv_heads, head_dim), seed + 2, dtype)
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def scatter_to_pages(cache, lens, page_size, num_pages, seed):
    """The same tokens in random pages of a NaN-filled pool, and the block table. Table entries
    past each row's length point nowhere (-1, or a page id past the pool): never read."""
    batch, max_len = cache.shape[:2]
    max_pages = max_len // page_size
    order = torch.randperm(num_pages, generator=seeded(seed))[:batch * max_pages].view(batch, max_pages)
    pool = torch.full((num_pages, page_size, *cache.shape[2:]), float("nan"), dtype=cache.dtype, device=DEVICE)
    table = order.clone()
    for b, length in enumerate(lens.tolist()):
        used = -(-length // page_size)
        for j in range(used):
            rows = cache[b, j * page_size:(j + 1) * page_size].clone()
            rows[max(0, length - j * page_size):] = float("nan")  # slots past the length: poison
            pool[order[b, j]] = rows
        table[b, used:] = torch.tensor([-1, num_pages + 7])[torch.arange(max_pages - used) % 2]
    return pool, table.to(DEVICE, torch.int32)


# (batch, q_heads, kv_heads, head_dim, page_size, max_pages, lens): GQA 1, 4 and 16 (tl.dot), a
# padded head dim, lengths 0, a page's edge, and full
CASES = [(3, 4, 4, 32, 16, 4, [0, 16, 64]), (3, 8, 2, 80, 16, 3, [33, 1, 48]), (2, 32, 2, 16, 32, 3, [96, 45])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-D{}-P{}x{}".format(*c[:6]))
def test_paged_equals_contiguous(backend, dtype, case):
    batch, q_heads, kv_heads, head_dim, page_size, max_pages, lens = case
    q, k, v, lens = contiguous_inputs(batch, q_heads, kv_heads, head_dim, page_size * max_pages, dtype,
                                      seed=head_dim + page_size, lens=lens)
    num_pages = batch * max_pages + 5  # some pages belong to no row
    k_pool, table = scatter_to_pages(k, lens, page_size, num_pages, seed=1)
    v_pool, _ = scatter_to_pages(v, lens, page_size, num_pages, seed=1)
    if backend == "cuda" and decode._cuda_unsupported(q, k_pool, v_pool, table) is not None:
        with pytest.raises(BackendUnavailable, match="head_dim in|float16 and bfloat16"):
            decode_attention(q, k_pool, v_pool, lens, block_table=table)
        return
    got = decode_attention(q, k_pool, v_pool, lens, block_table=table, softcap=20.0)
    want = reference.decode_attention(q.float(), k.float(), v.float(), lens, softcap=20.0)
    assert got.shape == q.shape and got.dtype == q.dtype and torch.isfinite(got).all()
    error = rel_err(got, want)
    assert error <= DECODE_TOLERANCE[dtype], f"relative error {error:.3g}"
    assert (got[lens.long() == 0] == 0).all()


def test_strided_table_and_pool(backend):
    """A pool that is one layer of a stacked buffer and a table that is a column slice."""
    dtype, head_dim = (torch.float16, 64) if backend == "cuda" else (torch.float32, 16)  # the CUDA kernel's
    q, k, v, lens = contiguous_inputs(2, 4, 2, head_dim, 48, dtype, seed=3, lens=[40, 17])
    k_pool, table = scatter_to_pages(k, lens, 16, 9, seed=4)
    v_pool, _ = scatter_to_pages(v, lens, 16, 9, seed=4)
    stacked = torch.stack([v_pool, k_pool])
    wide = torch.stack([table, torch.full_like(table, -9)], -1)[..., 0]  # column stride 2
    assert not wide.is_contiguous()
    got = decode_attention(q, stacked[1], stacked[0], lens, block_table=wide)
    want = reference.decode_attention(q.float(), k.float(), v.float(), lens)
    assert rel_err(got, want) <= DECODE_TOLERANCE[dtype]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter warns of the NaN it computes
def test_bad_page_ids_give_nan_rows_on_the_kernels():
    """Out-of-range page ids (as on CUDA, where the table is not read back): the rows that reach
    one output NaN, the others are untouched; the kernel masks the loads, so nothing outside the
    pool is read. Called below the argument checks, which raise on CPU."""
    q, k, v, lens = contiguous_inputs(3, 4, 2, 32, 32, torch.float32, seed=5, lens=[20, 32, 5])
    k_pool, table = scatter_to_pages(k, lens, 16, 8, seed=6)
    v_pool, _ = scatter_to_pages(v, lens, 16, 8, seed=6)
    table[0, 1], table[1, 0] = 8, -3  # both within the row's length; row 2's length stops before page 1
    table[2, 1] = 1000
    want = reference.decode_attention(q, k, v, lens)
    outputs = {"reference": reference.decode_attention(q, k_pool, v_pool, lens, block_table=table)}
    if "triton" in available_backends():
        outputs["triton"] = decode._decode_triton(q, k_pool, v_pool, lens, 32**-0.5, None, table)
    for name, got in outputs.items():
        assert got[:2].isnan().all(), name
        assert rel_err(got[2], want[2]) <= DECODE_TOLERANCE[torch.float32], name


def test_empty_table():
    q, k, v, lens = contiguous_inputs(2, 4, 2, 16, 16, torch.float32, seed=7, lens=[0, 0])
    table = torch.zeros(2, 0, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k, v, lens, block_table=table)
    assert (out == 0).all()


def test_compile_sees_one_op():
    q, k, v, lens = contiguous_inputs(2, 4, 2, 16, 32, torch.float32, seed=8, lens=[30, 3])
    k_pool, table = scatter_to_pages(k, lens, 16, 5, seed=9)
    v_pool, _ = scatter_to_pages(v, lens, 16, 5, seed=9)
    result = torch.library.opcheck(torch.ops.unimm.decode_attention.default,
                                   (q, k_pool, v_pool, lens, 0.25, None, table))
    assert all(value == "SUCCESS" for value in result.values())


@pytest.mark.parametrize("make, error, match", [
    (lambda q, k, v, n, t: (q, k, v, n, t.long()), TypeError, "block_table must be int32"),
    (lambda q, k, v, n, t: (q, k, v, n, t.tolist()), TypeError, "block_table must be a torch.Tensor"),
    (lambda q, k, v, n, t: (q, k, v, n, t[0]), ValueError, r"block_table must be 2-D \[batch, max_pages\]"),
    (lambda q, k, v, n, t: (q, k, v, n, t[:1]), ValueError, r"block_table must be \[2, max_pages\]"),
    (lambda q, k, v, n, t: (q, k, v, n, t.to("meta")), ValueError, "block_table is on meta"),
    (lambda q, k, v, n, t: (q, k[:, :8], v[:, :8], n, t), ValueError, "page_size .* power of two in \\[16, 256\\]"),
    (lambda q, k, v, n, t: (q, torch.cat([k, k[:, :8]], 1), torch.cat([v, v[:, :8]], 1), n, t), ValueError,
     "page_size .* got 24"),
    (lambda q, k, v, n, t: (q, k[..., :8], v[..., :8], n, t), ValueError, "num_pages, page_size, kv_heads, 16"),
    (lambda q, k, v, n, t: (q, k[0], v[0], n, t), ValueError, r"k_cache must be 4-D \[num_pages, page_size"),
    (lambda q, k, v, n, t: (q, k, v, n + 20, t), ValueError, r"cache_lens must lie in \[0, max_len = 32\]"),
    (lambda q, k, v, n, t: (q, k, v, n, t.fill_(5)), ValueError, r"page ids in \[0, num_pages = 5\).*found 5"),
    (lambda q, k, v, n, t: (q, k, v, n, t.fill_(-1)), ValueError, "found -1"),
])
def test_bad_input(make, error, match):
    q, k, v, lens = contiguous_inputs(2, 4, 2, 16, 32, torch.float32, seed=10, lens=[30, 3])
    k_pool, table = scatter_to_pages(k, lens, 16, 5, seed=11)
    v_pool, _ = scatter_to_pages(v, lens, 16, 5, seed=11)
    if DEVICE.type != "cpu" and ("found" in match or "cache_lens" in match):
        pytest.skip("lengths and page ids on a GPU are not read back (no host sync)")
    q, k_pool, v_pool, lens, table = make(q, k_pool, v_pool, lens, table)
    with pytest.raises(error, match=match):
        decode_attention(q, k_pool, v_pool, lens, block_table=table)


def test_cuda_kernel_serves_paged_caches():
    """The CUDA kernel takes paged caches at its head dims (64, 128, 256) and refuses the others, saying why."""
    if not _ext.has("decode_attention_occupancy"):
        pytest.skip("unimm._C not built (or built before paged decode)")
    table = torch.zeros(2, 2, dtype=torch.int32, device=DEVICE)
    q, k, v, _ = contiguous_inputs(2, 4, 2, 80, 32, torch.float16, seed=12, lens=[1, 2])
    assert "head_dim in (64, 128, 256)" in decode._cuda_unsupported(q, k, v, table)
    q, k, v, _ = contiguous_inputs(2, 4, 2, 64, 32, torch.float16, seed=12, lens=[1, 2])
    assert decode._cuda_unsupported(q, k, v, table) is None


@pytest.mark.gpu
def test_gpu_paged_bf16():
    """bf16 at a serving size on the GPU (Triton), page 16, against the contiguous call."""
    if not HAS_GPU:
        pytest.skip("needs a GPU")
    lens = torch.randint(1, 2049, (8,), generator=seeded(13)).tolist()
    q, k, v, lens = contiguous_inputs(8, 32, 8, 128, 2048, torch.bfloat16, seed=14, lens=lens)
    k_pool, table = scatter_to_pages(k, lens, 16, 8 * 128 + 3, seed=15)
    v_pool, _ = scatter_to_pages(v, lens, 16, 8 * 128 + 3, seed=15)
    got = decode_attention(q, k_pool, v_pool, lens, block_table=table)
    assert rel_err(got, reference.decode_attention(q.float(), k.float(), v.float(), lens)) <= \
        DECODE_TOLERANCE[torch.bfloat16]


# (batch, q_heads, kv_heads, head_dim, page_size, max_pages): pages of 16 to 256 keys, GQA groups 1 to 32
CUDA_PAGED = [(8, 32, 8, 128, 16, 128), (3, 28, 4, 128, 64, 31), (5, 8, 4, 256, 256, 6), (4, 32, 1, 64, 32, 40),
              (2, 4, 4, 64, 128, 3)]


def cuda_live() -> bool:
    return _ext.has("decode_attention_occupancy") and HAS_GPU and _ext.serves_device(DEVICE) is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CUDA_PAGED, ids=lambda c: "B{}-Hq{}-Hkv{}-D{}-P{}x{}".format(*c))
def test_gpu_cuda_paged_equals_contiguous(monkeypatch, dtype, case):
    """The CUDA kernel over paged caches (NaN in every slot no row's length reaches) against its
    contiguous call on the same tokens and the fp32 reference, lengths 0, full and ragged."""
    if not cuda_live():
        pytest.skip("CUDA backend not live")
    monkeypatch.setenv("UNIMM_BACKEND", "cuda")
    batch, q_heads, kv_heads, head_dim, page_size, max_pages = case
    max_len = page_size * max_pages
    lens = ([0, max_len] + torch.randint(1, max_len + 1, (batch,), generator=seeded(max_len)).tolist())[:batch]
    q, k, v, lens = contiguous_inputs(batch, q_heads, kv_heads, head_dim, max_len, dtype, seed=max_len, lens=lens)
    num_pages = batch * max_pages + 3
    k_pool, table = scatter_to_pages(k, lens, page_size, num_pages, seed=page_size)
    v_pool, _ = scatter_to_pages(v, lens, page_size, num_pages, seed=page_size)
    got = decode_attention(q, k_pool, v_pool, lens, block_table=table, softcap=30.0)
    contiguous = decode_attention(q, k, v, lens, softcap=30.0)
    want = reference.decode_attention(q.float(), k.float(), v.float(), lens, softcap=30.0)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, want) <= DECODE_TOLERANCE[dtype]
    assert rel_err(got, contiguous) <= DECODE_TOLERANCE[dtype]
    assert (got[lens.long() == 0] == 0).all()


@pytest.mark.gpu
def test_gpu_cuda_bad_page_ids_give_nan_rows():
    """On CUDA the table is not read back: a row whose length reaches a bad page id outputs NaN
    (the kernel never reads through it), the other rows are right."""
    if not cuda_live():
        pytest.skip("CUDA backend not live")
    q, k, v, lens = contiguous_inputs(3, 8, 2, 64, 512, torch.bfloat16, seed=16, lens=[300, 512, 40])
    k_pool, table = scatter_to_pages(k, lens, 16, 100, seed=17)
    v_pool, _ = scatter_to_pages(v, lens, 16, 100, seed=17)
    table[0, 5], table[1, 31], table[2, 3] = 100, -2, 10**6  # row 2's length stops before page 3
    got = decode._decode_cuda(q, k_pool, v_pool, lens, 64**-0.5, None, table)
    assert got[:2].isnan().all()
    want = reference.decode_attention(q.float(), k.float(), v.float(), lens)
    assert rel_err(got[2], want[2]) <= DECODE_TOLERANCE[torch.bfloat16]

