"""attention's vendor backend: which calls go to SDPA / FlashAttention varlen, and that they compute
the reference's result. On a CPU the device check is mocked (SDPA runs on CPU tensors too; the
FlashAttention function is a stand-in built from SDPA); the ``gpu`` test runs the real path."""

import pytest
import torch

from unimm.kernels import AttentionMask, BackendUnavailable, attention, dispatch
from unimm.kernels import _attention_vendor as vendor
from unimm.kernels.attention import attention_backend
from unimm.kernels.reference import attention as reference
from unimm.testing import DEVICE, TOLERANCE, rel_err, seeded


def qkv(batch, seq_len, num_keys, q_heads, kv_heads, head_dim, dtype=torch.float16, seed=0, device=DEVICE):
    gen = seeded(seed)
    make = lambda n, h: torch.randn(batch, n, h, head_dim, generator=gen).to(device, dtype)
    return make(seq_len, q_heads), make(num_keys, kv_heads), make(num_keys, kv_heads)


def packed(lengths, batch=1):
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(batch, -1).contiguous()
    return AttentionMask.from_spans(doc, torch.zeros_like(doc))


@pytest.fixture
def vendor_live(monkeypatch):
    """The device check mocked: the vendor backend is live for CPU tensors too."""
    live = dispatch.backend_unavailable
    monkeypatch.setattr(dispatch, "backend_unavailable", lambda b, d: None if b == "vendor" else live(b, d))


@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in for flash_attn_varlen_func (causal SDPA per document), recording its calls."""
    calls = []

    def varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
        calls.append((cu_seqlens_q.tolist(), max_seqlen_q, causal))
        bounds = cu_seqlens_q.tolist()
        group = q.shape[1] // k.shape[1]
        outs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            qs, ks, vs = (t[lo:hi].transpose(0, 1).float() for t in (q, k, v))
            ks, vs = (t.repeat_interleave(group, 0) for t in (ks, vs))
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, is_causal=causal, scale=softmax_scale).transpose(0, 1).to(q.dtype))
        return torch.cat(outs), None

    monkeypatch.setattr(vendor, "flash_varlen", lambda: (varlen, "stand-in"))
    return calls


def test_kernel_for_each_layout(fake_flash):
    q, k, _ = qkv(2, 12, 12, 4, 2, 16)
    causal = AttentionMask.causal(2, 12)
    assert vendor.kernel_for(q, k, None, None) == ("sdpa", None)
    assert vendor.kernel_for(q, k, causal, None) == ("sdpa", None)
    assert vendor.kernel_for(q, k, packed([5, 7], batch=2), None) == ("flash_attn_varlen", None)
    refused = {
        "softcap": (q, k, causal, 30.0),
        "float32": (q.float(), k.float(), causal, None),
        "after a cache": (q, qkv(2, 12, 15, 4, 2, 16)[1], AttentionMask.causal(2, 12, past_len=3), None),
        "hand-built causal": (q, k, AttentionMask.from_intervals(causal.kv_start, causal.kv_end), None),
        "more keys than rows": (q, qkv(2, 12, 16, 4, 2, 16)[1], causal, None),
        "bidirectional span": (q, k, AttentionMask.from_spans(torch.zeros(2, 12, dtype=torch.long),
                                                              torch.tensor([[1] * 4 + [0] * 8] * 2)), None),
        "padding": (q, k, AttentionMask.from_spans(torch.tensor([[0] * 10 + [-1] * 2] * 2),
                                                   torch.zeros(2, 12, dtype=torch.long)), None),
        "a derived mask": (q, k, causal.windowed(4, torch.arange(12)), None),
    }
    for name, args in refused.items():
        kernel, why = vendor.kernel_for(*args)
        assert kernel is None and why, name


def test_documents_without_flash_attention_go_to_unimm(monkeypatch):
    monkeypatch.setattr(vendor, "flash_varlen", lambda: (None, "FlashAttention is not installed"))
    q, k, _ = qkv(1, 12, 12, 2, 2, 16)
    assert vendor.kernel_for(q, k, packed([5, 7]), None) == (None, "FlashAttention is not installed")


def test_cuda_dispatch_chooses_the_vendor_kernel_first(monkeypatch):
    """On a (mocked) live CUDA device: vendor when the call's layout fits it, else Triton."""
    monkeypatch.setattr(dispatch, "backend_unavailable", lambda backend, device: None)
    cuda = torch.device("cuda")
    assert dispatch.select("attention", cuda, implemented=("vendor", "triton"), unsupported={}) == "vendor"
    assert dispatch.select("attention", cuda, implemented=("vendor", "triton"),
                           unsupported={"vendor": "no vendor kernel applies a softcap"}) == "triton"
    monkeypatch.setenv("UNIMM_BACKEND", "triton")  # forcing our own kernel keeps its meaning
    assert dispatch.select("attention", cuda, implemented=("vendor", "triton"), unsupported={}) == "triton"


def test_documents_boundaries():
    mask = packed([3, 2, 3], batch=2)
    cu_seqlens, longest = mask.documents()
    assert cu_seqlens.tolist() == [0, 3, 5, 8, 11, 13, 16] and longest == 3
    with pytest.raises(ValueError, match="documents"):
        AttentionMask.causal(1, 4).documents()


@pytest.mark.parametrize("case", ["no mask", "causal", "documents"])
def test_forced_vendor_matches_the_reference(monkeypatch, vendor_live, fake_flash, case):
    monkeypatch.setenv("UNIMM_BACKEND", "vendor")
    q, k, v = qkv(2, 13, 13, 4, 2, 16, device="cpu", seed=3)
    mask = {"no mask": None, "causal": AttentionMask.causal(2, 13), "documents": packed([6, 7], batch=2)}[case]
    assert attention_backend(q, k, v, mask) == ("flash_attn_varlen" if case == "documents" else "sdpa")
    leaves = [t.float().requires_grad_(True) for t in (q, k, v)]
    expected_mask = mask if mask is not None else AttentionMask.from_intervals(
        torch.zeros(2, 13, dtype=torch.int32), torch.full((2, 13), 13, dtype=torch.int32))
    want = reference.attention(*leaves, expected_mask, compute_dtype=torch.float64)
    grad_out = torch.randn(want.shape, generator=seeded(4))
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*inputs, mask)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
    assert rel_err(out, want) < TOLERANCE[torch.float16]
    for got, expected in zip(grads, want_grads):
        assert rel_err(got, expected) < TOLERANCE[torch.float16]
    if case == "documents":
        assert fake_flash[-1] == ([0, 6, 13, 19, 26], 7, True)


def test_forced_vendor_refuses_what_it_cannot_compute(monkeypatch, vendor_live):
    monkeypatch.setenv("UNIMM_BACKEND", "vendor")
    q, k, v = qkv(1, 8, 8, 2, 2, 16, device="cpu")
    with pytest.raises(BackendUnavailable, match="softcap"):
        attention(q, k, v, AttentionMask.causal(1, 8), softcap=20.0)


def test_info_says_which_backend_serves_which_layout():
    from unimm.cli import info_lines

    text = "\n".join(info_lines())
    assert "vendor" in text and "torch SDPA" in text and "packed causal documents" in text


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
def test_gpu_plain_causal_runs_sdpa(heads):
    q, k, v = qkv(2, 1000, 1000, *heads, 128, dtype=torch.bfloat16, seed=5)
    mask = AttentionMask.causal(2, 1000, device=DEVICE)
    assert attention_backend(q, k, v, mask) == "sdpa"
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, mask)
    want = reference.attention(*(t.detach().double() for t in (q, k, v)), mask, compute_dtype=torch.float64)
    assert rel_err(out, want) < TOLERANCE[torch.bfloat16]
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
