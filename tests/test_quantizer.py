"""VectorQuantizer: straight-through gradient, VQ-VAE losses, usage statistics."""

import pytest
import torch
import torch.nn.functional as F

from unimm.kernels.reference import vq as reference
from unimm.models import VectorQuantizer
from unimm.testing import DEVICE, seeded


def make(metric="l2", **kwargs):
    torch.manual_seed(0)
    vq = VectorQuantizer(37, 6, metric=metric, **kwargs).to(DEVICE)
    with torch.no_grad():
        vq.codebook.copy_(torch.randn(37, 6, generator=seeded(1)))
    return vq


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_forward_and_gradients(backend, metric):
    vq = make(metric, beta=0.3)
    z = torch.randn(3, 11, 6, generator=seeded(2)).to(DEVICE).requires_grad_(True)
    out = vq(z)
    zn = F.normalize(z, dim=-1) if metric == "cosine" else z
    codes = F.normalize(vq.codebook, dim=-1) if metric == "cosine" else vq.codebook
    expected_idx = reference.vq_quantize(zn.detach(), codes.detach(), "l2")
    assert torch.equal(out.indices, expected_idx) and out.indices.shape == (3, 11)
    torch.testing.assert_close(out.quantized, codes[expected_idx])  # forward value: the code

    # the same losses written out by hand
    codebook_loss = (codes[expected_idx] - zn.detach()).square().mean()
    commitment = (zn - codes[expected_idx].detach()).square().mean()
    torch.testing.assert_close(out.codebook_loss, codebook_loss)
    torch.testing.assert_close(out.commitment_loss, commitment)
    torch.testing.assert_close(out.loss, codebook_loss + 0.3 * commitment)

    upstream = torch.randn(3, 11, 6, generator=seeded(3)).to(DEVICE)
    (out.quantized * upstream).sum().backward()
    # straight-through: the gradient reaches z as if quantisation were the identity on zn
    want = torch.autograd.grad((zn * upstream).sum(), z)[0]
    torch.testing.assert_close(z.grad, want)
    assert vq.codebook.grad is None  # the output itself does not train the codebook

    z.grad = None
    out = vq(z)
    out.loss.backward()
    codes_ref = vq.codebook.detach().clone().requires_grad_(True)
    z_ref = z.detach().clone().requires_grad_(True)
    zn_ref = F.normalize(z_ref, dim=-1) if metric == "cosine" else z_ref
    cn_ref = F.normalize(codes_ref, dim=-1) if metric == "cosine" else codes_ref
    q = cn_ref[expected_idx]
    ((q - zn_ref.detach()).square().mean() + 0.3 * (zn_ref - q.detach()).square().mean()).backward()
    torch.testing.assert_close(vq.codebook.grad, codes_ref.grad)
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_usage_statistics():
    vq = make(dead_after=2)
    z = vq.codebook.detach()[[0, 0, 1, 2]] + 1e-3  # uses codes 0, 1, 2 only
    out = vq(z)
    assert out.codes_used.item() == 3
    torch.testing.assert_close(out.perplexity, torch.tensor(2 ** 1.5, device=DEVICE))  # H = 1.5 bits
    assert out.dead_codes.item() == 0
    vq(z)
    assert vq(z).dead_codes.item() == 34  # unused for 3 batches, dead after 2
    vq.eval()
    before = vq.batches_since_used.clone()
    vq(z)
    assert torch.equal(before, vq.batches_since_used)  # eval leaves usage alone
    vq.train()
    fresh = torch.randn(50, 6, generator=seeded(4)).to(DEVICE)
    assert vq.reset_dead_codes(fresh, generator=None) == 34
    assert vq(fresh).dead_codes.item() == 0


def test_lookup_and_cosine_codes():
    vq = make("cosine")
    idx = torch.tensor([[0, 36], [5, 5]], device=DEVICE)
    torch.testing.assert_close(vq.lookup(idx), F.normalize(vq.codebook, dim=-1)[idx])


def test_bad_arguments():
    with pytest.raises(ValueError, match="metric"):
        VectorQuantizer(4, 2, metric="dot")
    with pytest.raises(ValueError, match="num_codes and code_dim"):
        VectorQuantizer(0, 2)
    with pytest.raises(ValueError, match="beta"):
        VectorQuantizer(4, 2, beta=-1)
    with pytest.raises(ValueError, match=r"z must be \[\.\.\., 6\]"):
        make()(torch.randn(3, 5, device=DEVICE))


def test_default_init_is_usable():
    vq = VectorQuantizer(16, 4).to(DEVICE)
    out = vq(torch.randn(8, 4, device=DEVICE))
    assert out.indices.shape == (8,) and torch.isfinite(out.loss)
    cos = VectorQuantizer(16, 4, metric="cosine")
    torch.testing.assert_close(cos.codebook.norm(dim=-1), torch.ones(16))
