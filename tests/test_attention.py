"""AttentionMask builders and attention(), forward and backward, against dense references."""

import importlib

import pytest
import torch

from unimm.kernels import AttentionMask, attention
from unimm.kernels.reference import attention as reference
from unimm.testing import DEVICE, DTYPES, TOLERANCE, rel_err, seeded


def dense_from_spans(doc, span):
    """The definition, element by element: i sees j iff doc[i] == doc[j] >= 0 and
    (j <= i or span[i] == span[j] != 0)."""
    d = doc.cpu()
    sp = span.cpu()
    same_doc = (d[:, :, None] == d[:, None, :]) & (d[:, :, None] >= 0)
    i = torch.arange(d.shape[1])
    causal = i[None, :] <= i[:, None]
    same_span = (sp[:, :, None] == sp[:, None, :]) & (sp[:, :, None] != 0)
    return same_doc & (causal[None] | same_span)


def random_layout(batch, seq_len, seed, padding=True):
    """doc_ids / span_ids with several docs per row, several bidirectional spans per doc
    (span ids restarting per doc), and trailing padding."""
    gen = seeded(seed)
    docs, spans = [], []
    for _ in range(batch):
        doc_row, span_row, doc = [], [], 0
        end = seq_len - (int(torch.randint(0, seq_len // 4 + 1, (1,), generator=gen)) if padding else 0)
        while len(doc_row) < end:
            doc_len = min(end - len(doc_row), int(torch.randint(1, seq_len // 2 + 2, (1,), generator=gen)))
            span_id, filled = 0, 0
            while filled < doc_len:
                run = min(doc_len - filled, int(torch.randint(1, 9, (1,), generator=gen)))
                bidirectional = bool(torch.rand(1, generator=gen) < 0.5)
                if bidirectional:
                    span_id += 1
                span_row += [span_id if bidirectional else 0] * run
                filled += run
            doc_row += [doc] * doc_len
            doc += 1
        docs.append(doc_row + [-1] * (seq_len - len(doc_row)))
        spans.append(span_row + [0] * (seq_len - len(span_row)))
    return torch.tensor(docs, device=DEVICE), torch.tensor(spans, device=DEVICE)


# ---- masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_from_spans_matches_definition(seed):
    doc, span = random_layout(3, 53, seed)
    mask = AttentionMask.from_spans(doc, span)
    assert mask.kv_start.dtype == torch.int32 and mask.shape == (3, 53)
    assert torch.equal(mask.to_dense(53).cpu(), dense_from_spans(doc, span))
    assert mask.visible_pairs() == int(dense_from_spans(doc, span).sum())


def test_simple_builders():
    causal = AttentionMask.causal(2, 5, past_len=3, device=DEVICE)
    i = torch.arange(5)[:, None]
    j = torch.arange(8)[None, :]
    assert torch.equal(causal.to_dense(8).cpu(), (j <= i + 3).expand(2, 5, 8))
    assert causal.num_keys == 8
    prefix = AttentionMask.prefix_lm(torch.tensor([3, 0, 5], device=DEVICE), 5)
    want = torch.stack([(j[:, :5] <= i) | (j[:, :5] < p) for p in (3, 0, 5)])
    assert torch.equal(prefix.to_dense(5).cpu(), want)
    start = torch.tensor([[0, 0, 1, 2]], device=DEVICE)
    window = AttentionMask.from_intervals(start, start + 2)
    assert window.to_dense(5)[0].int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0],
                                                    [0, 0, 1, 1, 0]]
    assert window.num_keys == 4


@pytest.mark.parametrize("call, error, match", [
    (lambda: AttentionMask.from_spans(torch.tensor([[0, 1, 0]]), torch.zeros(1, 3, dtype=torch.long)), ValueError,
     "doc_ids row 0: a document appears in two separate runs"),
    (lambda: AttentionMask.from_spans(torch.tensor([[0, 0], [0, 0, ]]), torch.tensor([[0, 0], [1, 0]])), None, None),
    (lambda: AttentionMask.from_spans(torch.zeros(2, 4, dtype=torch.long), torch.tensor([[0] * 4, [1, 0, 1, 1]])),
     ValueError, "span_ids row 1: a span appears in two separate runs"),
    (lambda: AttentionMask.from_spans(torch.tensor([[0, -2]]), torch.zeros(1, 2, dtype=torch.long)), ValueError,
     "doc_ids row 0: ids must be >= 0, or -1"),
    (lambda: AttentionMask.from_spans(torch.zeros(1, 2, dtype=torch.long), torch.tensor([[0, -1]])), ValueError,
     "span_ids row 0: ids must be >= 0"),
    (lambda: AttentionMask.from_spans(torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.long)), TypeError,
     "doc_ids must be an integer tensor"),
    (lambda: AttentionMask.from_spans(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)),
     ValueError, "doc_ids must have 2 dims"),
    (lambda: AttentionMask.from_spans(torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)),
     ValueError, "span_ids must match doc_ids"),
    (lambda: AttentionMask.prefix_lm(torch.tensor([2, 9]), 5), ValueError, r"prefix_lens\[1\] = 9"),
    (lambda: AttentionMask.prefix_lm(torch.tensor([2.0]), 5), TypeError, "prefix_lens must be an integer"),
    (lambda: AttentionMask.causal(0, 5), ValueError, "batch_size"),
    (lambda: AttentionMask.causal(1, 5, past_len=-1), ValueError, "past_len"),
    (lambda: AttentionMask.from_intervals(torch.tensor([[2, 0]]), torch.tensor([[1, 1]])), ValueError,
     "row 0: need 0 <= kv_start <= kv_end"),
    (lambda: AttentionMask.from_intervals(torch.tensor([[0, 0]]), torch.tensor([[1]])), ValueError,
     "kv_end must match kv_start"),
])
def test_builder_errors(call, error, match):
    if error is None:
        call()  # spans restarting per row are fine
        return
    with pytest.raises(error, match=match):
        call()


def test_tile_bounds_cover_every_visible_pair():
    doc, span = random_layout(2, 70, seed=7)
    mask = AttentionMask.from_spans(doc, span)
    first, last = mask.tile_bounds(8, 16, 70)
    dense = mask.to_dense(70).cpu()
    for b in range(2):
        for kt in range(first.shape[1]):
            rows = dense[b, :, kt * 16:(kt + 1) * 16].any(-1).nonzero().flatten()
            if rows.numel():
                assert first[b, kt] <= rows.min() // 8 and last[b, kt] > rows.max() // 8


# ---- attention ------------------------------------------------------------------------------

def check(q, k, v, mask, tol=None, **options):
    tol = tol or TOLERANCE[q.dtype]
    ours = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    out = attention(*ours, mask, **options)
    ref_mask = mask if mask is not None else AttentionMask.from_intervals(
        torch.zeros(q.shape[:2], dtype=torch.int32, device=q.device),
        torch.full(q.shape[:2], k.shape[1], dtype=torch.int32, device=q.device))
    want = reference.attention(*refs, ref_mask, compute_dtype=torch.float64, **options)
    assert out.shape == q.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    err = rel_err(out, want)
    assert err <= tol, f"output relative error {err:.2e}"
    upstream = torch.randn(q.shape, generator=seeded(3)).to(q.device)
    (out * upstream.to(out.dtype)).sum().backward()
    (want * upstream.double()).sum().backward()
    for name, mine, theirs in zip("qkv", ours, refs):
        assert torch.isfinite(mine.grad).all(), name
        err = rel_err(mine.grad, theirs.grad)
        assert err <= tol, f"d{name} relative error {err:.2e}"
    return out, ours


def qkv(batch, seq_len, num_keys, q_heads, kv_heads, head_dim, seed, dtype=torch.float32):
    gen = seeded(seed)
    make = lambda s, h: torch.randn(batch, s, h, head_dim, generator=gen).to(DEVICE, dtype)
    return make(seq_len, q_heads), make(num_keys, kv_heads), make(num_keys, kv_heads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_packed_spans(backend, dtype, heads):
    doc, span = random_layout(2, 45, seed=heads[0] * 10 + heads[1])
    mask = AttentionMask.from_spans(doc, span)
    out, _ = check(*qkv(2, 45, 45, *heads, 16, seed=1, dtype=dtype), mask)
    padding = (doc < 0)
    assert (out[padding] == 0).all()  # rows that see nothing are 0


@pytest.mark.parametrize("dkdv", [(16, 32, 16), (32, 16, 16), (16, 64, 16), (16, 32, 8)],
                         ids=lambda t: f"dkdv{t[0]}x{t[1]}-out{t[2]}")
@pytest.mark.parametrize("heads", [(2, 2), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
def test_rectangular_tiles(backend, monkeypatch, dkdv, heads):
    """The GPU configs' tiles are rectangular (dK/dV: few query rows x many keys, its dots on the
    keys; at D = 256 on Hopper each dK/dV program writes half the head dim); the interpreter's are
    square and whole: the same masks, GQA and soft-cap on non-square tiles of every kernel, a
    tile's query rows and keys ending at different places in the sequence, and dK/dV in slices."""
    if backend != "triton":
        pytest.skip("the tiles are the Triton kernels'")
    attention_module = importlib.import_module("unimm.kernels.attention")  # the name alone is the function
    tiles = lambda m, n: dict(BLOCK_M=m, BLOCK_N=n, num_warps=1, num_stages=1)
    rows, keys, out_d = dkdv
    monkeypatch.setattr(attention_module, "_config", lambda *args, **kwargs: dict(
        fwd=tiles(32, 16), dq=tiles(16, 32), dkdv=dict(tiles(rows, keys), OUT_D=out_d)))
    doc, span = random_layout(2, 45, seed=7)
    check(*qkv(2, 45, 45, *heads, 16, seed=4), AttentionMask.from_spans(doc, span), softcap=5.0)


@pytest.mark.parametrize("layout", ["causal", "prefix", "none", "window"])
def test_layouts(backend, layout):
    q, k, v = qkv(2, 33, 33, 2, 2, 32, seed=2)
    mask = {
        "causal": AttentionMask.causal(2, 33, device=DEVICE),
        "prefix": AttentionMask.prefix_lm(torch.tensor([17, 0], device=DEVICE), 33),
        "none": None,
        "window": AttentionMask.from_intervals(*(lambda i: ((i - 7).clamp_min(0), i + 1))(
            torch.arange(33, device=DEVICE).expand(2, 33))),
    }[layout]
    check(q, k, v, mask)


def test_prefill_after_cache_softcap_and_scale(backend):
    # Skv != S: 20 new queries after 29 cached keys
    q, k, v = qkv(2, 20, 49, 4, 2, 16, seed=4)
    check(q, k, v, AttentionMask.causal(2, 20, past_len=29, device=DEVICE), softcap=2.5, scale=0.3)
    check(q * 30, k, v, AttentionMask.causal(2, 20, past_len=29, device=DEVICE), softcap=5.0)


def test_rows_that_see_nothing_pass_no_gradient(backend):
    q, k, v = qkv(1, 24, 24, 2, 2, 16, seed=5)
    doc = torch.tensor([[0] * 10 + [-1] * 4 + [1] * 10], device=DEVICE)
    mask = AttentionMask.from_spans(doc, torch.zeros_like(doc))
    out, (dq, dk, dv) = check(q, k, v, mask)
    assert (out[0, 10:14] == 0).all() and (dq.grad[0, 10:14] == 0).all()
    assert (dk.grad[0, 10:14] == 0).all() and (dv.grad[0, 10:14] == 0).all()


def test_keys_nobody_sees_are_never_read(backend):
    """NaN in key tiles outside every row's interval reach nothing (tests/test_hostile_attention.py
    plants them everywhere else)."""
    q, k, v = qkv(1, 64, 64, 2, 2, 16, seed=6)
    doc = torch.tensor([[0] * 32 + [-1] * 32], device=DEVICE)  # keys 32.. are padding, whole tiles
    mask = AttentionMask.from_spans(doc, torch.zeros_like(doc))
    k[:, 32:] = float("nan")
    v[:, 32:] = float("nan")
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attention(q, k, v, mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    assert torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (k.grad[:, 32:] == 0).all() and (v.grad[:, 32:] == 0).all()


@pytest.mark.parametrize("head_dim, dtype", [(72, torch.float32), (72, torch.float16), (80, torch.float16),
                                             (96, torch.float32)])
def test_head_dims_that_are_not_powers_of_two(backend, dtype, head_dim):
    """SigLIP's 72, Phi-2's 80, Phi-3's 96: padded inside the kernel. q, k, v are views of wider
    rows whose extra columns hold NaN: a kernel that read past D would turn the results NaN."""
    doc, span = random_layout(1, 19, seed=head_dim)
    wide = [torch.cat([t, torch.full_like(t[..., :8], float("nan"))], -1) for t in
            qkv(1, 19, 19, 2, 1, head_dim, seed=head_dim, dtype=dtype)]
    q, k, v = (t[..., :head_dim] for t in wide)
    assert q.stride(-1) == 1 and not q.is_contiguous()
    check(q, k, v, AttentionMask.from_spans(doc, span))


def test_non_contiguous_inputs(backend):
    q, k, v = qkv(2, 19, 19, 2, 2, 16, seed=8)
    q_t = q.transpose(2, 3).contiguous().transpose(2, 3)  # last dim strided
    check(q_t, k[:, :, :, :], v, AttentionMask.causal(2, 19, device=DEVICE))


@pytest.mark.parametrize("call, error, match", [
    (lambda q, k, v, m: attention(q, k, v[:, :-1], m), ValueError, "k and v must have the same shape"),
    (lambda q, k, v, m: attention(q, k.half(), v.half(), m), TypeError, "must have q's dtype"),
    (lambda q, k, v, m: attention(q[0], k, v, m), ValueError, "q must be 4-D"),
    (lambda q, k, v, m: attention(q, k[:, :, :, :8], v[:, :, :, :8], m), ValueError, "k must be"),
    (lambda q, k, v, m: attention(q[:, :, :3], k, v, m), ValueError, "multiple of k/v's heads"),
    (lambda q, k, v, m: attention(q[..., :12], k[..., :12], v[..., :12], m), ValueError, "multiple of 8"),
    (lambda q, k, v, m: attention(q, k, v, m.kv_start), TypeError, "mask must be an AttentionMask"),
    (lambda q, k, v, m: attention(q[:1], k[:1], v[:1], m), ValueError, "mask must be for"),
    (lambda q, k, v, m: attention(q, k[:, :5], v[:, :5], m), ValueError, "up to 10 keys but k has 5"),
    (lambda q, k, v, m: attention(q, k, v, m, softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (lambda q, k, v, m: attention(q, k, v, m, scale=float("nan")), ValueError, "scale must be a finite"),
    (lambda q, k, v, m: attention(q.long(), k, v, m), TypeError, "q must be a floating"),
])
def test_bad_input(call, error, match):
    q, k, v = qkv(2, 10, 10, 4, 2, 16, seed=9)
    with pytest.raises(error, match=match):
        call(q, k, v, AttentionMask.causal(2, 10, device=DEVICE))


def test_registered_ops():
    q, k, v = qkv(1, 9, 9, 2, 1, 16, seed=10)
    mask = AttentionMask.causal(1, 9, device=DEVICE)
    first, last = mask.tile_bounds(16, 16, 9)
    args = (q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True), mask.kv_start, mask.kv_end,
            first, last, 0.25, None)
    out = torch.library.opcheck(torch.ops.unimm.attention.default, args)
    assert all(r == "SUCCESS" for r in out.values()), out


# ---- GPU ----------------------------------------------------------------------------------------
#
# Fast tier (`pytest -m gpu`), counted for a cold Triton cache. Forward + backward is three main
# kernels (`_attn_fwd_kernel`, `_attn_bwd_dq_kernel`, `_attn_bwd_dkdv_kernel`), each compiled as
# SAFE=False and SAFE=True (the launch for programs that meet non-finite rows), plus two small
# ones (`_key_flags_kernel`, `_attn_bwd_prep_kernel`), specialised on HEAD_DIM, HAS_SOFTCAP, the
# tile config (by head_dim) and the int classes (1 / divisible by 16 / other) of seq_len,
# num_keys, heads, group, the strides and the key-tile count:
#   * test_gpu_bf16_real_sizes: three cases, each its own specialization = 3 x 8 = 24 compiles:
#     packed documents with bidirectional image spans (D 128, GQA, sizes divisible by 16);
#     Gemma-2's prefill after a cache (D 256, soft-cap, MHA so group == 1); an odd sliding-window
#     prefill (D 64, MQA, 777 queries after 1224 cached keys: lengths and mask stride not
#     divisible by 16).
# Total: 24 Triton compiles (~30-45 s: the backward kernels are the largest of the package; the
# small ones take about a second each) plus ~3 s of fp64 reference attention.
# Full tier (`pytest -m gpu_full`): test_gpu_real_sizes, the dtype x head_dim x backend grid.

def sliding_window(batch, seq_len, past_len, window):
    """Row i (after ``past_len`` cached keys) sees the last ``window`` keys up to its own."""
    end = torch.arange(past_len + 1, past_len + seq_len + 1, device=DEVICE).expand(batch, seq_len)
    return AttentionMask.from_intervals((end - window).clamp_min(0), end)


def gpu_bf16_case(name):
    if name == "packed-spans-d128-gqa":
        doc, span = random_layout(2, 1536, seed=13)
        return qkv(2, 1536, 1536, 8, 2, 128, seed=14, dtype=torch.bfloat16), AttentionMask.from_spans(doc, span), {}
    if name == "prefill-after-cache-d256-softcap":
        mask = AttentionMask.causal(1, 512, past_len=1536, device=DEVICE)
        return qkv(1, 512, 2048, 8, 8, 256, seed=15, dtype=torch.bfloat16), mask, dict(softcap=50.0, scale=256**-0.5)
    if name == "odd-window-d64-mqa":
        return qkv(1, 777, 2001, 4, 1, 64, seed=16, dtype=torch.bfloat16), sliding_window(1, 777, 1224, 300), {}
    raise ValueError(name)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["packed-spans-d128-gqa", "prefill-after-cache-d256-softcap", "odd-window-d64-mqa"])
def test_gpu_bf16_real_sizes(case):
    """The backend a user gets (Triton), bf16 at real sizes, output and gradients against fp64."""
    (q, k, v), mask, options = gpu_bf16_case(case)
    out, _ = check(q, k, v, mask, **options)
    if case.startswith("packed"):
        doc_padding = mask.kv_end <= mask.kv_start
        assert (out[doc_padding] == 0).all()  # rows that see nothing are 0


@pytest.mark.gpu_full
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, heads", [(64, (8, 8)), (128, (8, 2)), (256, (4, 4))])
def test_gpu_real_sizes(backend, dtype, head_dim, heads):
    doc, span = random_layout(2, 1500, seed=head_dim)
    check(*qkv(2, 1500, 1500, *heads, head_dim, seed=11, dtype=dtype), AttentionMask.from_spans(doc, span))
    check(*qkv(1, 777, 2000, *heads, head_dim, seed=12, dtype=dtype),
          AttentionMask.causal(1, 777, past_len=1223, device=DEVICE), softcap=50.0)
