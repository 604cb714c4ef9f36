"""decode_attention against the reference, on every backend live here."""

import pytest
import torch

from unimm import _ext
from unimm.kernels import AttentionMask, BackendUnavailable, attention, decode, decode_attention
from unimm.kernels.reference import decode as reference
from unimm.testing import DECODE_TOLERANCE, DEVICE, DTYPES, HAS_GPU, available_backends, rel_err, seeded


def random(shape, seed, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, generator=seeded(seed)).to(device, dtype)


def make_inputs(batch, q_heads, kv_heads, head_dim, max_len, dtype, seed, lens=None):
    q = random((batch, q_heads, head_dim), seed, dtype)
    k = random((batch, max_len, kv_heads, head_dim), seed + 1, dtype)
    v = random((batch, max_len, kv_heads, head_dim), seed + 2, dtype)
    if lens is None:  # ragged, with the edges 0, 1 and max_len first
        lens = [0, 1, max_len] + torch.randint(0, max_len + 1, (batch,), generator=seeded(seed + 3)).tolist()
        lens = lens[:batch]
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def poison_past_lengths(cache, lens):
    """NaN in every cache row at or past its length: the kernels must never let them in."""
    rows = torch.arange(cache.shape[1], device=cache.device)[None, :] >= lens[:, None].long()
    return cache.masked_fill(rows[:, :, None, None], float("nan"))


def skip_unserved(backend, q, k, v):
    """The CUDA kernel serves float16 / bfloat16 at D in {64, 128, 256}; forced, it refuses the rest."""
    if backend == "cuda" and decode._cuda_unsupported(q, k, v) is not None:
        pytest.skip(f"not a CUDA-kernel case: {decode._cuda_unsupported(q, k, v)}")


def assert_matches(got, q, k, v, lens, **options):
    want = reference.decode_attention(q.float(), k.float(), v.float(), lens, **options)
    assert got.shape == q.shape and got.dtype == q.dtype and got.device == q.device and got.is_contiguous()
    assert torch.isfinite(got).all(), "non-finite output"
    error = rel_err(got, want)
    assert error <= DECODE_TOLERANCE[q.dtype], f"relative error {error:.3g}"
    empty = lens.long() == 0
    assert (got[empty] == 0).all(), "rows of length 0 must output exactly 0"


# (batch, q_heads, kv_heads, head_dim, max_len): GQA groups 1, 2, 4, 8 and 16 (tl.dot), odd lengths
SHAPES = [(3, 4, 4, 32, 37), (4, 8, 4, 64, 100), (3, 8, 2, 16, 129), (3, 16, 2, 32, 77), (2, 32, 2, 16, 50),
          (3, 4, 1, 128, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-D{}-L{}".format(*s))
def test_matches_reference(backend, dtype, shape):
    q, k, v, lens = make_inputs(*shape, dtype, seed=sum(shape))
    skip_unserved(backend, q, k, v)
    k, v = poison_past_lengths(k, lens), poison_past_lengths(v, lens)
    assert_matches(decode_attention(q, k, v, lens), q, k, v, lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim, group", [(72, 2), (80, 16), (96, 1)])  # 16: the tl.dot path
def test_padded_head_dims(backend, dtype, head_dim, group):
    """Head dims that are not powers of two, padded to one inside the Triton kernel: NaN just
    past D (the caches are views of wider rows, so D + 1 holds NaN) and past every length."""
    batch, kv_heads, max_len = 3, 2, 41
    _, _, _, lens = make_inputs(batch, group * kv_heads, kv_heads, head_dim, max_len, dtype, seed=head_dim + group)
    wide = [random(shape, head_dim + i, dtype) for i, shape in enumerate(
        [(batch, group * kv_heads, head_dim + 8)] + 2 * [(batch, max_len, kv_heads, head_dim + 8)])]
    for x in wide:
        x[..., head_dim:] = float("nan")
    q = wide[0][..., :head_dim]
    k, v = (poison_past_lengths(cache, lens)[..., :head_dim] for cache in wide[1:])
    skip_unserved(backend, q, k, v)
    assert_matches(decode_attention(q, k, v, lens), q, k, v, lens)


@pytest.mark.parametrize("softcap, scale", [(5.0, None), (50.0, 0.3), (None, 1.0)])
def test_softcap_and_scale(backend, softcap, scale):
    q, k, v, lens = make_inputs(3, 8, 2, 64, 70, torch.float16, seed=5)
    q = q * 4  # large scores, so the cap bites
    got = decode_attention(q, k, v, lens, scale=scale, softcap=softcap)
    assert_matches(got, q, k, v, lens, scale=scale, softcap=softcap)


def test_strided_cache_views(backend):
    """Caches sliced out of bigger buffers (one layer of a stacked K/V buffer, a window of rows,
    every other head) are read in place; q and cache_lens may be strided too."""
    batch, q_heads, kv_heads, head_dim, max_len = 3, 8, 2, 64, 45
    # [layer, k/v, B, rows, heads, D]
    buffer = random((2, 2, batch, max_len + 9, 2 * kv_heads, head_dim), 6, torch.float16)
    k = buffer[1, 0, :, 4:4 + max_len, 1::2]
    v = buffer[1, 1, :, 4:4 + max_len, ::2]
    assert not k.is_contiguous() and k.stride(-1) == 1
    q = random((batch, head_dim, q_heads), 7, torch.float16).transpose(1, 2)
    lens = torch.tensor([45, 0, 7, 0, 20, 0], dtype=torch.int32, device=DEVICE)[::2]
    assert_matches(decode_attention(q, k, v, lens), q, k, v, lens)


def test_equivalent_to_attention(backend):
    """A decode step is attention of one query row that sees keys [0, len)."""
    for dtype in (torch.float32, torch.float16):
        q, k, v, lens = make_inputs(4, 8, 2, 64, 40, dtype, seed=8)
        if backend == "cuda" and dtype == torch.float32:
            continue
        mask = AttentionMask.from_intervals(torch.zeros_like(lens)[:, None], lens[:, None])
        want = attention(q[:, None], k, v, mask)[:, 0]
        got = decode_attention(q, k, v, lens)
        error = rel_err(got, want)
        assert error <= DECODE_TOLERANCE[dtype], f"{dtype}: relative error {error:.3g}"


def test_empty_shapes(backend):
    q, k, v, lens = make_inputs(2, 4, 2, 16, 10, torch.float32, seed=9)
    out = decode_attention(q, k[:, :0], v[:, :0], torch.zeros_like(lens))  # max_len 0
    assert out.shape == q.shape and (out == 0).all()
    assert decode_attention(q[:0], k[:0], v[:0], lens[:0]).shape == (0, 4, 16)


def test_triton_writes_every_output():
    """Launches the Triton kernels into NaN-filled outputs and workspaces: every output row is
    written (rows of length 0 too), and the partials a row's length reaches are all written."""
    if "triton" not in available_backends():
        pytest.skip("triton backend not live here")
    q, k, v, lens = make_inputs(3, 8, 2, 32, 300, torch.float32, seed=10)
    config = decode._triton_config(4, 32, not HAS_GPU)
    splits, keys_per_split = decode.split_plan(3 * 2, 300, config["BLOCK_N"], sms=4, per_sm=4)
    assert splits > 1
    out = torch.full_like(q, float("nan"))
    part_out = torch.full((3, 8, splits, 32), float("nan"), device=DEVICE)
    part_lse = torch.full((3, 8, splits), float("nan"), device=DEVICE)
    decode._launch_triton_split(q, k, v, lens, out, part_out, part_lse, splits, keys_per_split, 0.2, None, config)
    for b, length in enumerate(lens.tolist()):
        active = -(-length // keys_per_split)
        assert not part_out[b, :, :active].isnan().any() and not part_lse[b, :, :active].isnan().any()
        assert part_lse[b, :, active:].isnan().all(), "splits past the length must not be written"
    decode._launch_triton_combine(part_out, part_lse, lens, out, 300, keys_per_split)
    assert_matches(out, q, k, v, lens, scale=0.2)

    single = torch.full_like(q, float("nan"))  # one split: the split kernel writes the output itself
    decode._launch_triton_split(q, k, v, lens, single, single, single, 1, 320, 0.2, None, config)
    assert_matches(single, q, k, v, lens, scale=0.2)


# (SMs, registers per SM, shared memory per SM, threads per SM) of an H100 / H200 and an A100
H100 = decode.DeviceLimits(132, 65536, 233472, 2048)
A100 = decode.DeviceLimits(108, 65536, 167936, 2048)


def test_split_plan():
    """Shapes alone fix the plan (CUDA graphs replay it for any lengths); every split is a whole
    number of steps and non-empty; a small grid is split to fill every resident slot, and batch
    1 with a short cache still gives every SM a program."""
    for programs, max_len, step in [(1, 1, 64), (6, 100, 16), (8, 4096, 64), (512, 16384, 64), (1, 10**6, 32),
                                    (10**6, 5, 64), (8, 1024, 64), (4, 4096, 64), (1, 64, 16)]:
        for sms, per_sm in ((4, 4), (132, 2), (132, 5), (108, 1)):
            splits, keys_per_split = decode.split_plan(programs, max_len, step, sms, per_sm)
            assert 1 <= splits <= decode._MAX_SPLITS and keys_per_split % step == 0
            assert (splits - 1) * keys_per_split < max_len <= splits * keys_per_split
            steps = -(-max_len // step)
            # every SM gets a program whenever the cache has the steps for it
            assert programs * splits >= min(sms, programs * steps, programs * decode._MAX_SPLITS // 2)
            # no more splits than fill the resident slots once, or than give every SM a program
            # (whole steps: up to twice as many)
            assert splits <= max(-(-per_sm * sms // programs), 2 * -(-sms // programs))
    # Llama-3-8B at batch 1 (8 KV heads, one query tile each) with 4k keys on an H100 whose
    # kernel holds 2 CTAs per SM: 32 splits of 2 steps (the minimum) fill 256 of the 264 slots
    assert decode.split_plan(8, 4096, 64, 132, 2) == (32, 128)
    assert decode.split_plan(8, 1024, 64, 132, 2) == (16, 64)  # 1k keys: one 64-key step per split
    assert decode.split_plan(512, 16384, 64, 132, 2) == (1, 16384)  # a full grid is not split
    if _ext.has("decode_attention"):
        assert decode._MAX_SPLITS <= _ext.lib().DECODE_MAX_SPLITS


@pytest.mark.parametrize("registers, shared, warps, limits, expected", [
    (220, 16640, 4, H100, 2),  # csrc/decode.cu at D = 128 (prefetch): 224 x 32 registers a warp, 9 warps
    (128, 8448, 4, H100, 4),   # D = 64: 16 warps
    (250, 33024, 4, H100, 2),  # D = 256
    (128, 4096, 8, H100, 2),   # Triton's broadcast path: 8 warps of 128 registers
    (177, 90112, 8, H100, 1),  # fp32 dot path: 11 warps of 184 x 32 registers; 2 by shared memory
    (64, 90112, 4, A100, 1),   # shared memory bound on the A100: 164 KB holds one 88 KB CTA
    (16, 0, 1, H100, 16),      # tiny programs: the CTA limit
    (255, 0, 32, H100, 1),     # over the register file: never 0
])
def test_resident_programs(registers, shared, warps, limits, expected):
    assert decode.resident_programs(registers, shared, warps, limits) == expected


def test_occupancy_fallback_on_cpu():
    """CPU tensors (the interpreter) plan with the documented fallback, not a compiled kernel's occupancy."""
    shapes = [(2, 4, 16), (2, 40, 2, 16), (2, 40, 2, 16)]
    q, k, v = (torch.randn(shape, generator=seeded(30 + i)) for i, shape in enumerate(shapes))
    lens = torch.tensor([40, 3], dtype=torch.int32)
    config = decode._triton_config(2, 16, interpret=True)
    assert decode._triton_programs_per_sm(q, k, v, lens, None, config, None) == decode._FALLBACK_PROGRAMS_PER_SM


def test_compile_sees_one_op():
    q, k, v, lens = make_inputs(2, 4, 2, 16, 20, torch.float32, seed=11)
    result = torch.library.opcheck(torch.ops.unimm.decode_attention.default, (q, k, v, lens, 0.25, None))
    assert all(value == "SUCCESS" for value in result.values())


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("make, error, match", [
    (lambda q, k, v, n: (q.tolist(), k, v, n), TypeError, "q must be a torch.Tensor"),
    (lambda q, k, v, n: (q, k, v, n.tolist()), TypeError, "cache_lens must be a torch.Tensor"),
    (lambda q, k, v, n: (q.long(), k, v, n), TypeError, "q must be float16, bfloat16 or float32"),
    (lambda q, k, v, n: (q.double(), k.double(), v.double(), n), TypeError, "q must be float16"),
    (lambda q, k, v, n: (q, k.half(), v, n), TypeError, "k_cache must have q's dtype"),
    (lambda q, k, v, n: (q, k, v.half(), n), TypeError, "v_cache must have q's dtype"),
    (lambda q, k, v, n: (q, k, v, n.long()), TypeError, "cache_lens must be int32"),
    (lambda q, k, v, n: (q[0], k, v, n), ValueError, "q must be 3-D"),
    (lambda q, k, v, n: (q, k[0], v, n), ValueError, "k_cache must be 4-D"),
    (lambda q, k, v, n: (q, k, v[:, :5], n), ValueError, "k_cache and v_cache must have the same shape"),
    (lambda q, k, v, n: (q, k[:1], v[:1], n), ValueError, r"k_cache must be \[3, max_len"),
    (lambda q, k, v, n: (q[:, :, :8], k, v, n), ValueError, r"k_cache must be \[3, max_len, kv_heads, 8\]"),
    (lambda q, k, v, n: (q[:, :3], k, v, n), ValueError, "multiple of the caches' kv_heads"),
    (lambda q, k, v, n: (q[..., :12], k[..., :12], v[..., :12], n), ValueError, "head_dim must be a multiple of 8"),
    (lambda q, k, v, n: (q, k.to("meta"), v, n), ValueError, "k_cache is on meta"),
    (lambda q, k, v, n: (q, k, v, n.to("meta")), ValueError, "cache_lens is on meta"),
    (lambda q, k, v, n: (q, k, v, n[:2]), ValueError, r"cache_lens must be 1-D \[3\]"),
    (lambda q, k, v, n: (q, k, v, n[None]), ValueError, r"cache_lens must be 1-D \[3\]"),
    (lambda q, k, v, n: (q, k, v, n - 5), ValueError, r"cache_lens must lie in \[0, max_len = 20\], found -5"),
    (lambda q, k, v, n: (q, k, v, n + 15), ValueError, r"cache_lens must lie in \[0, max_len = 20\], found 35"),
])
def test_bad_input(make, error, match):
    q, k, v, lens = make_inputs(3, 4, 2, 16, 20, torch.float32, seed=12, lens=[20, 3, 0])
    if DEVICE.type != "cpu" and "cache_lens must lie" in match:
        pytest.skip("lengths on a GPU are not read back (no host sync)")
    with pytest.raises(error, match=match):
        decode_attention(*make(q, k, v, lens))


def test_non_contiguous_head_dim_is_rejected():
    q, k, v, lens = make_inputs(3, 4, 2, 16, 20, torch.float32, seed=13)
    strided = random((3, 20, 2, 32), 14)[..., ::2]
    with pytest.raises(ValueError, match="k_cache must be contiguous along head_dim"):
        decode_attention(q, strided, v, lens)
    with pytest.raises(ValueError, match="v_cache must be contiguous along head_dim"):
        decode_attention(q, k, strided, lens)


@pytest.mark.parametrize("name, value", [("scale", float("nan")), ("scale", "0.1"), ("softcap", 0.0),
                                         ("softcap", -1.0), ("softcap", float("inf"))])
def test_bad_options(name, value):
    q, k, v, lens = make_inputs(3, 4, 2, 16, 20, torch.float32, seed=15)
    with pytest.raises(ValueError, match=name):
        decode_attention(q, k, v, lens, **{name: value})


def test_float32_on_cuda_is_not_the_cuda_kernel(monkeypatch):
    if not HAS_GPU or "cuda" not in available_backends():
        pytest.skip("needs the CUDA backend")
    q, k, v, lens = make_inputs(2, 4, 2, 64, 20, torch.float32, seed=16)
    monkeypatch.setenv("UNIMM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="float16 and bfloat16"):
        decode_attention(q, k, v, lens)


# ---- GPU ----------------------------------------------------------------------------------------
#
# Fast tier (`pytest -m gpu`), counted for a cold Triton cache. The reference and the CUDA kernel
# (precompiled) cost no compile, so these tests run every live backend. Triton's
# `_decode_split_kernel` specialises on HAS_SOFTCAP, SPLIT, HEAD_DIM, USE_DOT, BLOCK_G, BLOCK_N and
# the int classes (1 / divisible by 16 / other) of max_len, kv_heads, group, q_tiles, q_heads,
# keys_per_split, the split count and the strides (and 16-byte pointer alignment);
# `_decode_combine_kernel` on HEAD_DIM and the classes of q_heads, max_len, keys_per_split, splits:
#   * test_gpu_bf16_real_sizes: Llama-3-8B at (B 8, L 2048) = 2 compiles (split + combine); MQA
#     (group 32: tl.dot) at D 64 = 2; Gemma-2 (D 256, soft-cap) = 2; Qwen2-7B (group 7, L 2001:
#     the odd case) = 2.
#   * test_gpu_cuda_graph_capture, test_gpu_lengths_are_clamped: the Llama-3-8B case's shape and
#     dtype, so its kernels: 0. test_gpu_unaligned_cache_falls_back: the same shape with a cache
#     view 2 bytes off alignment: 1 (the split kernel).
#   * test_gpu_cuda_writes_every_output: the CUDA kernel only: 0.
# Total: 9 Triton compiles (~15 s); the fp32 references are milliseconds.
# Full tier (`pytest -m gpu_full`): test_gpu_real_sizes, the shape x dtype x backend grid.

LLAMA3_8B = (8, 32, 8, 128, 2048)  # (batch, q_heads, kv_heads, head_dim, max_len)
GPU_BF16_CASES = [  # (shape, softcap)
    (LLAMA3_8B, None),
    ((4, 32, 1, 64, 2048), None),  # MQA: one group of 32 query heads, Triton's tl.dot path
    ((5, 8, 4, 256, 1504), 50.0),  # Gemma-2: D 256 and its soft-cap
    ((3, 28, 4, 128, 2001), None),  # Qwen2-7B: group 7; an odd length
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape, softcap", GPU_BF16_CASES, ids=["llama3-8b", "mqa-d64", "gemma2-softcap", "qwen2-odd"])
def test_gpu_bf16_real_sizes(backend, shape, softcap):
    """bf16 at real sizes on every live backend, NaN past every row's length, against fp32."""
    q, k, v, lens = make_inputs(*shape, torch.bfloat16, seed=shape[0] + shape[4])
    k, v = poison_past_lengths(k, lens), poison_past_lengths(v, lens)
    assert_matches(decode_attention(q, k, v, lens, softcap=softcap), q, k, v, lens, softcap=softcap)


# Llama-3.2-1B, Llama-3-8B, Qwen2-7B (group 7), Gemma-2 (D 256), MQA (group 32: four query tiles)
GPU_SHAPES = [(16, 32, 8, 64, 1000), (4, 32, 8, 128, 4099), (3, 28, 4, 128, 2000), (5, 8, 4, 256, 1500),
              (2, 32, 1, 128, 3000), (64, 32, 8, 128, 300), (1, 32, 8, 64, 16384)]


@pytest.mark.gpu_full
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-D{}-L{}".format(*s))
def test_gpu_real_sizes(backend, dtype, shape):
    q, k, v, lens = make_inputs(*shape, dtype, seed=shape[0] + shape[4])
    k, v = poison_past_lengths(k, lens), poison_past_lengths(v, lens)
    assert_matches(decode_attention(q, k, v, lens), q, k, v, lens)
    assert_matches(decode_attention(q, k, v, lens, softcap=30.0), q, k, v, lens, softcap=30.0)


@pytest.mark.gpu
def test_gpu_lengths_are_clamped(backend):
    """On a GPU, lengths outside [0, max_len] are not an error (that would need a host sync):
    they read as the nearest bound, and nothing outside the cache is read."""
    batch, _, _, _, max_len = LLAMA3_8B
    q, k, v, _ = make_inputs(*LLAMA3_8B, torch.bfloat16, seed=17)
    lens = torch.tensor([-3, 5000, max_len, 2**31 - 1, 0, 1, max_len + 1, 700][:batch], dtype=torch.int32,
                        device=DEVICE)
    got = decode_attention(q, k, v, lens)
    assert_matches(got, q, k, v, lens.clamp(0, max_len))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(backend):
    """One captured call replays for new queries and new lengths written into the same tensors."""
    if backend == "reference":
        pytest.skip("the reference is not graph-safe (it is the CPU fallback)")
    q, k, v, lens = make_inputs(*LLAMA3_8B, torch.bfloat16, seed=18)
    max_len = LLAMA3_8B[4]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compile and warm the allocator outside the capture
            decode_attention(q, k, v, lens)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lens)
    for seed in (19, 20):
        q.copy_(random(q.shape, seed, q.dtype))
        lens.copy_(torch.randint(0, max_len + 1, lens.shape, generator=seeded(seed)).to(DEVICE, torch.int32))
        out.fill_(float("nan"))  # the replay must write every output element again
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, q, k, v, lens)
        torch.testing.assert_close(out, decode_attention(q, k, v, lens), rtol=0, atol=0)  # replay == eager


@pytest.mark.gpu
def test_gpu_occupancy_is_read_from_the_compiled_kernels():
    """The plan's programs per SM come from the compiled kernels (once per kernel, config and
    device), and batch 1 with a 1k-key cache still gives every SM a program."""
    q, k, v, lens = make_inputs(1, 32, 8, 128, 1024, torch.bfloat16, seed=31)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    plans = []
    if "triton" in available_backends():
        config = decode._triton_config(4, 128, interpret=False)
        per_sm = decode._triton_programs_per_sm(q, k, v, lens, None, config, None)
        assert 1 <= per_sm <= decode._MAX_CTAS_PER_SM and len(decode._triton_occupancy) >= 1
        plans.append((8, config["BLOCK_N"], per_sm))
    if _ext.has("decode_attention_occupancy") and _ext.serves_device(DEVICE) is None:
        per_sm = decode._cuda_programs_per_sm(128, torch.bfloat16, False, DEVICE.index or 0)
        assert per_sm >= 1 and decode._cuda_programs_per_sm(128, torch.bfloat16, True, DEVICE.index or 0) >= 1
        plans.append((8, _ext.lib().DECODE_SPLIT_KEYS, per_sm))
    for programs, step, per_sm in plans:
        splits, _ = decode.split_plan(programs, 1024, step, sms, per_sm)
        assert programs * splits >= min(sms, programs * (1024 // step))
    assert_matches(decode_attention(q, k, v, lens), q, k, v, lens)


@pytest.mark.gpu
def test_gpu_unaligned_cache_falls_back():
    """A cache view whose rows are not 16-byte aligned is served by Triton, not rejected."""
    q, k, v, lens = make_inputs(*LLAMA3_8B, torch.bfloat16, seed=21)
    batch, _, kv_heads, head_dim, max_len = LLAMA3_8B
    flat = random((batch, max_len * kv_heads * head_dim + 1), 22, torch.bfloat16)
    shifted = flat[:, 1:].view(batch, max_len, kv_heads, head_dim)
    assert decode._cuda_unsupported(q, shifted, v) is not None
    assert_matches(decode_attention(q, shifted, v, lens), q, shifted, v, lens)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_gpu_cuda_writes_every_output(head_dim):
    """The raw CUDA entry point into NaN-poisoned outputs and workspaces, one split and several."""
    if not _ext.has("decode_attention_occupancy") or _ext.serves_device(DEVICE) is not None:
        pytest.skip("CUDA backend not live")
    C = _ext.lib()
    q, k, v, lens = make_inputs(3, 12, 1, head_dim, 700, torch.bfloat16, seed=23, lens=[0, 700, 333])
    k, v = poison_past_lengths(k, lens), poison_past_lengths(v, lens)
    for splits, keys_per_split in ((1, 704), (3, 256)):
        out = torch.full_like(q, float("nan"))
        part_out = torch.full((3, 12, splits, head_dim), float("nan"), device=DEVICE)
        part_lse = torch.full((3, 12, splits), float("nan"), device=DEVICE)
        C.decode_attention(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), *k.stride()[:3], v.data_ptr(),
                           *v.stride()[:3], lens.data_ptr(), 0, 0, 0, 0, out.data_ptr(), out.stride(0), out.stride(1),
                           part_out.data_ptr(), part_lse.data_ptr(), 3, 12, 1, head_dim, 700, keys_per_split, splits,
                           head_dim**-0.5, 0.0, _ext.DTYPE_CODES[q.dtype], DEVICE.index or 0,
                           torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        assert_matches(out, q, k, v, lens)


def test_cuda_entry_point_rejects_bad_launch():
    """The C++ entry point checks its sizes before it touches the GPU (so this runs without one)."""
    if not _ext.has("decode_attention_occupancy"):
        pytest.skip("unimm._C not built (or built before paged decode)")
    def launch(head_dim=64, page_size=0, table=0):
        _ext.lib().decode_attention(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, table, 0, page_size, 4, 0, 0, 0, 0, 0, 1, 1, 1,
                                    head_dim, 64, 64, 1, 0.1, 0.0, 2, 0, 0)

    with pytest.raises(ValueError, match="head_dim must be 64, 128 or 256"):
        launch(head_dim=96)
    for page_size, table in ((24, 256), (8, 256), (16, 0)):  # not a power of two >= 16; no table
        with pytest.raises(ValueError, match="paged caches need a block table, page_size a power of two >= 16"):
            launch(page_size=page_size, table=table)


def test_reference_chunking(monkeypatch):
    """The reference's chunks of batch rows give the one-shot result."""
    q, k, v, lens = make_inputs(5, 4, 2, 16, 30, torch.float32, seed=24)
    whole = reference.decode_attention(q, k, v, lens, softcap=3.0)
    monkeypatch.setattr(reference, "_CHUNK_ELEMENTS", 30 * 2 * 16 * 2)  # two rows per chunk
    torch.testing.assert_close(reference.decode_attention(q, k, v, lens, softcap=3.0), whole, rtol=1e-6, atol=1e-7)
