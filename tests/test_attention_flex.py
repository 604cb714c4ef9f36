"""AttentionMask handed to FlexAttention: ``mask_mod`` and ``to_flex_block_mask`` describe exactly the
pairs ``to_dense`` does, and ``flex_attention`` under them computes the reference's result."""

import warnings

import pytest
import torch

from unimm.kernels import AttentionMask
from unimm.kernels.reference import attention as reference
from unimm.testing import TOLERANCE, rel_err, seeded

flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")


def layouts():
    doc = torch.tensor([[0] * 7 + [1] * 9 + [-1] * 3, [0] * 19])
    span = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0, 0, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0], [0] * 11 + [3] * 5 + [0] * 3])
    rows = torch.arange(19).expand(2, 19)
    return {
        "causal": AttentionMask.causal(2, 19),
        "prefix-lm": AttentionMask.prefix_lm(torch.tensor([6, 0]), 19),
        "spans and padding": AttentionMask.from_spans(doc, span),
        "window": AttentionMask.from_intervals((rows - 4).clamp_min(0), rows + 1),
        "hand-built, out of range": AttentionMask(rows - 30, rows + 40, 19),  # clamped to the keys
    }


@pytest.mark.parametrize("name", list(layouts()))
def test_flex_masks_equal_to_dense(name):
    mask = layouts()[name]
    dense = mask.to_dense(19)
    assert torch.equal(flex.create_mask(mask.mask_mod(), 2, None, 19, 19, device="cpu")[:, 0], dense)
    block = 8
    block_mask = mask.to_flex_block_mask(block_size=block)
    padded = torch.nn.functional.pad(dense, (0, 5, 0, 5))  # 19 -> 3 blocks of 8
    touched = padded.reshape(2, 3, block, 3, block).any(-1).any(2)  # [B, q blocks, kv blocks]
    assert torch.equal(block_mask.to_dense()[:, 0].bool(), touched)


def test_flex_attention_under_the_mask_matches_the_reference():
    mask = layouts()["spans and padding"]
    gen = seeded(0)
    q, k, v = (torch.randn(2, 19, 2, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex_attention warns that it is unfused
        out = flex.flex_attention(*(t.transpose(1, 2) for t in (q, k, v)),
                                  block_mask=mask.to_flex_block_mask(block_size=8)).transpose(1, 2)
    want = reference.attention(q, k, v, mask)
    seen = mask.to_dense(19).any(-1)  # rows that see nothing: FlexAttention's convention may differ
    assert rel_err(out[seen], want[seen]) < TOLERANCE[torch.float32]
