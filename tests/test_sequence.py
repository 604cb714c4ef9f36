"""Packing multimodal documents: token layouts, masks, next-token targets, features, errors."""

import pytest
import torch

from unimm.models.sequence import (
    DEFAULT_SPECIAL_TOKENS,
    EMU3_FORMAT,
    IGNORE_INDEX,
    METAMORPH_FORMAT,
    PLAIN_FORMAT,
    SIZE_TOKENS,
    UNIFLUID_FORMAT,
    ContinuousImage,
    DiscreteImage,
    HybridImage,
    Text,
    pack,
)
from unimm.models.vocab import Head, ImageFormat, VocabLayout
from unimm.testing import seeded

VOCAB = VocabLayout(50, DEFAULT_SPECIAL_TOKENS, 100)
CODE0 = 50 + len(DEFAULT_SPECIAL_TOKENS)  # id of image code 0


def sid(name):
    return VOCAB.special_id(name)


def test_vocab_layout_blocks():
    assert VOCAB.text == (0, 50)
    assert VOCAB.specials == (50, CODE0)
    assert VOCAB.image_codes == (CODE0, CODE0 + 100) and VOCAB.size == CODE0 + 100
    assert sid("boi") == 50 and sid("size_x") == CODE0 - 2 and sid("img") == CODE0 - 1
    assert VOCAB.code_ids(torch.tensor([0, 99])).tolist() == [CODE0, CODE0 + 99]
    with pytest.raises(ValueError, match="'nope' is not in the vocabulary"):
        VOCAB.special_id("nope")
    with pytest.raises(ValueError, match="duplicates"):
        VocabLayout(10, ("a", "a"))


def test_discrete_image_emu3_layout():
    # Emu3's processor: BOI, "H*W", <|image token|>, per row the codes then EOL, EOF, EOI
    codes = torch.arange(12).view(3, 4) * 7 % 100
    batch = pack([[Text([1, 2]), DiscreteImage(codes)]], 40, vocab=VOCAB)
    rows = [[CODE0 + int(c) for c in row] + [sid("eol")] for row in codes]
    opening = [sid("boi"), sid("size_3"), sid("size_x"), sid("size_4"), sid("img")]
    image = opening + sum(rows, []) + [sid("eof"), sid("eoi")]
    expected = [1, 2] + image
    n = len(expected)
    assert n == 2 + 5 + 15 + 2
    assert batch.input_ids.shape == (1, 40)
    assert batch.input_ids[0, :n].tolist() == expected
    assert (batch.input_ids[0, n:] == 0).all() and (batch.doc_ids[0, n:] == -1).all()
    # heads describe the token each position predicts: codes -> IMAGE_CODE, structure and text -> TEXT
    kinds = [Head.TEXT] + [Head.TEXT] * 5 + ([Head.IMAGE_CODE] * 4 + [Head.TEXT]) * 3 + [Head.TEXT] * 2
    assert batch.heads[0, :n - 1].tolist() == [int(k) for k in kinds]
    assert batch.heads[0, n - 1:].eq(Head.NONE).all()
    # 2D positions of the codes (image 0), -1 elsewhere; next positions one step earlier
    grid = batch.image_positions[0]
    first_code = 7
    for r in range(3):
        for c in range(4):
            assert grid[first_code + r * 5 + c].tolist() == [r, c, 0]
            assert batch.next_image_positions[0, first_code + r * 5 + c - 1].tolist() == [r, c]
    assert (grid[first_code + 4] == -1).all()  # EOL
    assert batch.next_image_positions[0, first_code + 3].tolist() == [-1, -1]  # predicts EOL
    assert (grid[:first_code] == -1).all()  # BOI, size and image token: no grid cell


def test_emu3_33x32_image_is_1098_tokens_in_emu3_order():
    """Emu3's processor (``Emu3Processor``) writes an image of h x w codes as
    ``<|image start|> "h*w" <|image token|> (codes <|extra_200|>) x h <|extra_201|> <|image end|>``:
    1 + 5 + 1 + 33 * (32 + 1) + 2 = 1,098 tokens for 33 x 32 (its tokenizer splits "33*32" into
    five single-character tokens)."""
    h, w = 33, 32
    codes = torch.randint(0, 100, (h, w), generator=seeded(5))
    batch = pack([[DiscreteImage(codes)]], 1100, vocab=VOCAB)
    assert batch.placements == [(0, 0, 1098)]
    ids = batch.input_ids[0, :1098].tolist()
    size = [sid(f"size_{c}") for c in "33"] + [sid("size_x")] + [sid(f"size_{c}") for c in "32"]
    assert ids[:7] == [sid("boi")] + size + [sid("img")]
    body = torch.tensor(ids[7:7 + h * (w + 1)]).view(h, w + 1)
    assert torch.equal(body[:, :w], codes + CODE0) and (body[:, w] == sid("eol")).all()
    assert ids[-2:] == [sid("eof"), sid("eoi")]
    # with a tokenizer's own ids for "33*32" (a callable size), the same layout and length
    tokenizer_size = ImageFormat(size=lambda h, w: [3, 3, 42, 3, 2], image_token="img", end_of_line="eol",
                                 end_of_frame="eof")
    own = pack([[DiscreteImage(codes, format=tokenizer_size)]], 1100, vocab=VOCAB)
    assert own.placements == [(0, 0, 1098)]
    assert own.input_ids[0, :7].tolist() == [sid("boi"), 3, 3, 42, 3, 2, sid("img")]
    assert torch.equal(own.input_ids[0, 7:1098], batch.input_ids[0, 7:1098])
    # the image token is optional: other formats do not write it
    assert EMU3_FORMAT.image_token == "img" and PLAIN_FORMAT.image_token is None
    without = pack([[DiscreteImage(codes, format=ImageFormat(size="digits", end_of_line="eol", end_of_frame="eof"))]],
                   1100, vocab=VOCAB)
    assert without.placements == [(0, 0, 1097)] and sid("img") not in without.input_ids[0].tolist()
    with pytest.raises(TypeError, match="image_token"):
        ImageFormat(image_token=7)


def test_size_formats():
    emu3_text = ImageFormat(size=lambda h, w: [10 + h, 20, 10 + w], image_token="img", end_of_line="eol",
                            end_of_frame="eof")
    batch = pack([[DiscreteImage(torch.zeros(2, 13, dtype=torch.long), format=emu3_text)]], 64, vocab=VOCAB)
    assert batch.input_ids[0, :5].tolist() == [sid("boi"), 12, 20, 23, sid("img")]
    digits = pack([[DiscreteImage(torch.zeros(24, 3, dtype=torch.long))]], 128, vocab=VOCAB)
    assert digits.input_ids[0, :6].tolist() == [sid("boi"), sid("size_2"), sid("size_4"), sid("size_x"), sid("size_3"),
                                                sid("img")]
    plain = pack([[DiscreteImage(torch.tensor([[5, 6]]), format=PLAIN_FORMAT)]], 8, vocab=VOCAB)
    assert plain.input_ids[0, :4].tolist() == [sid("boi"), CODE0 + 5, CODE0 + 6, sid("eoi")]


def test_masks_prefix_lm_bidirectional_image_several_docs_and_padding():
    image = DiscreteImage(torch.tensor([[1, 2], [3, 4]]), loss=False, bidirectional=True, format=PLAIN_FORMAT)
    doc_a = [Text([1], loss=False), image, Text([7, 8], loss=False, bidirectional=True), Text([9, 10, 11])]
    doc_b = [Text([3, 4, 5])]
    doc_c = [DiscreteImage(torch.tensor([[1, 2, 3]]), format=PLAIN_FORMAT, bidirectional=True, loss=False),
             Text([6, 6])]
    batch = pack([doc_a, doc_b, doc_c], 16, vocab=VOCAB)
    # doc_a: 1 + 6 (boi, 4 codes, eoi) + 2 + 3 = 12 tokens; doc_b (3) fits after it; doc_c (7) opens row 1
    assert batch.placements == [(0, 0, 12), (0, 12, 3), (1, 0, 7)]
    expected = torch.zeros(2, 16, 16, dtype=torch.bool)
    for i in range(12):  # doc_a: BOS causal, [image + question] one bidirectional span (1..8), answer causal
        end = 9 if 1 <= i < 9 else i + 1
        expected[0, i, :end] = True
    for i in range(12, 15):
        expected[0, i, 12:i + 1] = True
    for i in range(7):  # doc_c: image span 0..4 bidirectional, then causal text
        expected[1, i, :(5 if i < 5 else i + 1)] = True
    assert torch.equal(batch.mask.to_dense(16), expected)  # padding rows (row 0: 15, row 1: 7..15) see nothing
    assert batch.doc_ids[0].tolist() == [0] * 12 + [1] * 3 + [-1]
    assert batch.positions[0].tolist() == list(range(12)) + [0, 1, 2] + [0]
    assert batch.positions[1, :7].tolist() == list(range(7))


def test_targets_shift_within_documents_with_weights():
    doc_a = [Text([1, 2], loss=False), Text([3, 4], weight=0.5)]
    doc_b = [Text([5, 6, 7])]
    batch = pack([doc_a, doc_b], 8, vocab=VOCAB)
    # position p predicts the token at p + 1 of the same document; the prompt's tokens carry no loss
    assert batch.targets[0].tolist() == [IGNORE_INDEX, 3, 4, IGNORE_INDEX, 6, 7, IGNORE_INDEX, IGNORE_INDEX]
    assert batch.loss_weights[0].tolist() == [0, 0.5, 0.5, 0, 1, 1, 0, 0]
    assert batch.heads[0].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert batch.positions[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0]


def test_continuous_target_features_and_metamorph_format():
    features = torch.randn(3, 5, generator=seeded(0))
    prompt = torch.randn(2, 7, generator=seeded(1))
    doc = [ContinuousImage(prompt, encoder="siglip", format=METAMORPH_FORMAT), Text([4, 5]),
           ContinuousImage(features, role="target", format=METAMORPH_FORMAT), Text([6])]
    batch = pack([doc], 16, vocab=VOCAB, placeholder_id=3)
    start, end = sid("image_start"), sid("image_end")
    assert batch.input_ids[0, :12].tolist() == [start, 3, 3, end, 4, 5, start, 3, 3, 3, end, 6]
    assert set(batch.input_features) == {"siglip", "image"}
    assert batch.input_features["siglip"].positions.tolist() == [1, 2]
    assert torch.equal(batch.input_features["siglip"].values, prompt)
    # the target image is an input too (teacher forcing), and is predicted one position earlier
    assert batch.input_features["image"].positions.tolist() == [7, 8, 9]
    assert batch.target_features.positions.tolist() == [6, 7, 8]
    assert torch.equal(batch.target_features.values, features)
    assert batch.heads[0, :12].tolist() == [0, 0, 0, 1, 1, 1, 3, 3, 3, 1, 1, 0]  # the input image: no loss
    assert batch.targets[0, 5].item() == start and batch.targets[0, 9].item() == end
    assert (batch.targets[0, 6:9] == IGNORE_INDEX).all()
    assert batch.loss_weights[0, :12].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0]


def test_hybrid_images_sequence_and_add():
    codes = torch.tensor([[1, 2], [3, 4]])
    features = torch.randn(3, 6, generator=seeded(2))
    batch = pack([[HybridImage(codes, features)]], 12, vocab=VOCAB, placeholder_id=1)
    assert batch.input_ids[0, :10].tolist() == ([sid("boi")] + [CODE0 + c for c in (1, 2, 3, 4)] + [sid("sep")]
                                                + [1, 1, 1] + [sid("eoi")])
    assert batch.input_features["image"].positions.tolist() == [6, 7, 8]
    assert batch.heads.eq(Head.NONE).all()  # loss=False by default: an understanding input
    fused = pack([[Text([1]), HybridImage(codes, torch.randn(4, 6), fusion="add", loss=True)]], 12, vocab=VOCAB)
    assert fused.input_ids[0, :7].tolist() == [1, sid("boi")] + [CODE0 + c for c in (1, 2, 3, 4)] + [sid("eoi")]
    assert fused.added_features["image"].positions.tolist() == [2, 3, 4, 5] and not fused.input_features
    assert fused.heads[0, :6].tolist() == [1, 2, 2, 2, 2, 1]


def test_random_order_permutes_and_records_next_positions():
    features = torch.randn(6, 4, generator=seeded(3))
    doc = [Text([1, 2]), ContinuousImage(features, role="target", shape=(2, 3), format=UNIFLUID_FORMAT)]
    batch = pack([doc], 10, vocab=VOCAB, random_order=1.0, generator=seeded(4))
    again = pack([doc], 10, vocab=VOCAB, random_order=1.0, generator=seeded(4))
    raster = pack([doc], 10, vocab=VOCAB)
    order = batch.image_positions[0, 3:9, 0] * 3 + batch.image_positions[0, 3:9, 1]
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    assert torch.equal(again.image_positions, batch.image_positions)
    assert torch.equal(batch.target_features.values, features[order])
    assert torch.equal(batch.input_features["image"].values, features[order])
    # the BOI (position 2) predicts the first permuted token; the last token predicts nothing
    assert torch.equal(batch.next_image_positions[0, 2:8], batch.image_positions[0, 3:9, :2])
    assert batch.next_image_positions[0, 8].tolist() == [-1, -1]
    assert raster.image_positions[0, 3:9, 0].tolist() == [0, 0, 0, 1, 1, 1]
    explicit = pack([[Text([1, 2]), ContinuousImage(features, role="target", shape=(2, 3), order=order)]], 12,
                    vocab=VOCAB)
    assert torch.equal(explicit.image_positions[0, 3:9], batch.image_positions[0, 3:9])


def test_first_fit_and_rows():
    docs = [[Text([1] * 6)], [Text([2] * 5)], [Text([3] * 3)], [Text([4] * 2)]]
    batch = pack(docs, 8, vocab=VOCAB, num_rows=3)
    assert batch.placements == [(0, 0, 6), (1, 0, 5), (1, 5, 3), (0, 6, 2)]
    assert batch.input_ids.shape == (3, 8) and (batch.doc_ids[2] == -1).all()
    moved = batch.to("cpu")
    assert torch.equal(moved.mask.kv_end, batch.mask.kv_end) and moved.vocab == VOCAB


@pytest.mark.parametrize("documents, kwargs, message", [
    ([[Text(list(range(9)))]], {}, "9 tokens do not fit in max_tokens=8"),
    ([[DiscreteImage(torch.tensor([[1, 100]]), format=PLAIN_FORMAT)]], {},
     r"num_image_codes=100\), got values in \[1, 100\]"),
    ([[DiscreteImage(torch.tensor([[-1]]), format=PLAIN_FORMAT)]], {}, "must be in"),
    ([[Text([1, 2], bidirectional=True)]], {}, "bidirectional Text cannot carry a loss"),
    ([[ContinuousImage(torch.randn(2, 3), role="target", bidirectional=True)]], {}, "cannot carry a loss"),
    ([[ContinuousImage(torch.randn(2, 3))], [ContinuousImage(torch.randn(2, 4))]], {}, "mismatched feature dims"),
    ([[ContinuousImage(torch.randn(2, 3), role="target", encoder="a")],
      [ContinuousImage(torch.randn(2, 4), role="target", encoder="b")]], {}, "continuous targets have mismatched"),
    ([[Text([CODE0])]], {}, "image codes belong in a DiscreteImage"),
    ([[Text([1] * 5)], [Text([2] * 5)]], {"num_rows": 1}, "num_rows=1 is too small"),
    ([[ContinuousImage(torch.randn(4, 3), role="target")]], {"random_order": 1.0}, "random_order needs"),
    ([[ContinuousImage(torch.randn(4, 3), shape=(2, 2), order=torch.tensor([0, 0, 1, 2]))]], {}, "permutation"),
    ([[ContinuousImage(torch.randn(4, 3), shape=(3, 2))]], {}, r"h \* w = 4"),
    ([[ContinuousImage(torch.randn(4, 3), role="sample")]], {}, "role must be"),
    ([[ContinuousImage(torch.randn(4, 3), shape=(2, 2), order=torch.arange(4),
                       format=ImageFormat(end_of_line="eol"))]], {}, "end-of-line"),
    ([[HybridImage(torch.ones(2, 2, dtype=torch.long), torch.randn(3, 2), fusion="add")]], {}, "one feature per code"),
    ([[Text([1], weight=0.0)]], {}, "weight must be a positive"),
    ([[]], {}, "has no tokens"),
    ([Text([1])], {}, "bare segment"),
])
def test_bad_inputs(documents, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pack(documents, 8, vocab=VOCAB, **kwargs)


def test_missing_special_tokens_and_codes():
    with pytest.raises(ValueError, match="'eol' is not in the vocabulary"):
        pack([[DiscreteImage(torch.zeros(1, 1, dtype=torch.long))]], 8,
             vocab=VocabLayout(50, ("boi", "eoi", "img") + SIZE_TOKENS, 4))
    with pytest.raises(ValueError, match="'img' is not in the vocabulary"):
        pack([[DiscreteImage(torch.zeros(1, 1, dtype=torch.long))]], 8,
             vocab=VocabLayout(50, ("boi", "eoi", "eol", "eof") + SIZE_TOKENS, 4))
    with pytest.raises(ValueError, match="num_image_codes=0"):
        pack([[DiscreteImage(torch.zeros(1, 1, dtype=torch.long))]], 8, vocab=VocabLayout(50, DEFAULT_SPECIAL_TOKENS))
    with pytest.raises(TypeError, match="VocabLayout"):
        pack([[Text([1])]], 8, vocab=None)
