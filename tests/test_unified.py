"""UnifiedModel: vocabulary expansion, losses against a plain-PyTorch recomputation of each
document run alone, continuous heads, 2D / next-position embeddings, gradients, bad inputs."""

import functools

import pytest
import torch
import torch.nn.functional as F

from unimm import testing
from unimm.kernels import AttentionMask
from unimm.models import (
    ContinuousImage,
    DiffusionHead,
    DiscreteImage,
    HybridImage,
    RegressionHead,
    Text,
    UnifiedModel,
    VocabLayout,
    pack,
)
from unimm.models.sequence import METAMORPH_FORMAT, PLAIN_FORMAT, UNIFLUID_FORMAT
from unimm.testing import seeded

HIDDEN = 32


# two query heads on one KV head, untied, gemma2 with a window of 8 and its own final-logit softcap
tiny_decoder = functools.partial(testing.tiny_decoder, heads=(2, 1), tied=False, window=8, softcap=None)
pytestmark = pytest.mark.usefixtures("reference_backend")


def alone(model, ids, *, prefix=0, replace=(), add=(), extra=None):
    """Hidden states ``[n, D]`` of one document run by itself: embeddings of ``ids`` with
    ``replace`` / ``add`` lists of (local positions, projected rows), plus ``extra [n, D]``."""
    x = model.decoder.embed_tokens(ids).clone()
    for positions, rows in replace:
        x[positions] = rows
    for positions, rows in add:
        x[positions] = x[positions] + rows
    if extra is not None:
        x = x + extra
    mask = AttentionMask.prefix_lm(torch.tensor([prefix]), ids.numel())  # prefix 0: causal
    return model.decoder(inputs_embeds=x[None], mask=mask)[0]


def doc_ids(batch, index):
    row, start, length = batch.placements[index]
    return batch.input_ids[row, start:start + length]


def dense_ce(model, hidden, targets, vocab_range=None):
    """Mean cross-entropy from materialised logits (``vocab_range``: softmax over that block)."""
    lo, hi = vocab_range or (0, model.vocab.size)
    logits = hidden @ model.decoder.lm_head.weight[lo:hi].T
    return F.cross_entropy(logits, targets - lo)


# ---- expansion ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family, tied", [("llama", False), ("llama", True), ("gemma2", True)])
def test_expansion_keeps_text_rows_and_logits(family, tied):
    decoder = tiny_decoder(family, tied=tied)
    embed, head = decoder.embed_tokens.weight.detach().clone(), decoder.lm_head.weight.detach().clone()
    ids = torch.randint(0, 64, (2, 9), generator=seeded(0))
    with torch.no_grad():
        before = decoder.logits(decoder(ids))
    model = UnifiedModel.from_decoder(decoder, num_image_codes=40, init_seed=3)
    vocab = model.vocab
    assert vocab.text == (0, 64) and vocab.specials == (64, 83) and vocab.image_codes == (83, 123)
    assert model.special_id("boi") == 64 and decoder.config.vocab_size == 123
    new_embed, new_head = decoder.embed_tokens.weight, decoder.lm_head.weight
    assert new_embed.shape == (123, HIDDEN) and new_head.shape == (123, HIDDEN)
    assert torch.equal(new_embed[:64], embed) and torch.equal(new_head[:64], head)
    assert (new_head is new_embed) == tied
    # new rows: per-dimension normal with the old rows' statistics
    fresh = new_embed[64:].detach()
    assert torch.isfinite(fresh).all() and fresh.std() > 0.5 * embed.std() and fresh.std() < 2 * embed.std()
    with torch.no_grad():
        after = model.logits(decoder(ids))
    assert after.shape == (2, 9, 123)
    torch.testing.assert_close(after[..., :64], before, rtol=0, atol=0)
    torch.testing.assert_close(model.logits(decoder(ids), vocab.image_codes), after[..., 83:])
    again = UnifiedModel.from_decoder(tiny_decoder(family, tied=tied), num_image_codes=40, init_seed=3)
    assert torch.equal(again.decoder.embed_tokens.weight, new_embed)


def test_text_only_model_matches_decoder_loss():
    decoder = tiny_decoder()
    model = UnifiedModel.from_decoder(decoder)
    assert model.vocab == VocabLayout(64) and decoder.embed_tokens.weight.shape[0] == 64
    batch = pack([[Text([1, 2, 3, 4, 5])], [Text([6, 7], loss=False), Text([8, 9, 10])]], 16, vocab=model.vocab)
    out = model(batch)
    first = alone(model, torch.tensor([1, 2, 3, 4, 5]))
    second = alone(model, torch.tensor([6, 7, 8, 9, 10]))
    want = dense_ce(model, torch.cat([first[:4], second[1:4]]), torch.tensor([2, 3, 4, 5, 8, 9, 10]))
    torch.testing.assert_close(out["text_loss"], want, rtol=1e-5, atol=1e-6)
    assert out["num_text_tokens"] == 7 and out["num_image_code_tokens"] == 0 and out["loss"] is not None


# ---- losses against documents run alone --------------------------------------------------------

@pytest.mark.parametrize("image_vocab_range", [False, True])
def test_discrete_loss_matches_dense_recomputation(image_vocab_range):
    model = UnifiedModel.from_decoder(tiny_decoder(), num_image_codes=40, image_vocab_range=image_vocab_range,
                                      text_loss_weight=0.3)
    vocab = model.vocab
    codes = torch.randint(0, 40, (2, 3), generator=seeded(1))
    generation = [Text([1, 2, 3]), DiscreteImage(codes, weight=2.0), Text([4])]
    understanding = [DiscreteImage(codes.flip(0), loss=False, bidirectional=True, format=PLAIN_FORMAT),
                     Text([5, 6], loss=False, bidirectional=True), Text([7, 8, 9])]
    batch = pack([generation, understanding, [Text([10, 11])]], 48, vocab=vocab)
    out = model(batch)

    gen_ids, und_ids = doc_ids(batch, 0), doc_ids(batch, 1)
    gen_hidden = alone(model, gen_ids)
    prefix = 8 + 2  # boi, 6 codes, eoi; the question
    und_hidden = alone(model, und_ids, prefix=prefix)
    short_hidden = alone(model, torch.tensor([10, 11]))
    # generation: every token is a target; the image's tokens weigh 2
    gen_targets = gen_ids[1:]
    gen_weights = torch.tensor([1.0, 1.0] + [2.0] * (len(gen_ids) - 4) + [1.0])
    is_code = (gen_targets >= vocab.image_codes[0])
    text_hidden = torch.cat([gen_hidden[:-1][~is_code], und_hidden[prefix - 1:-1], short_hidden[:1]])
    text_targets = torch.cat([gen_targets[~is_code], und_ids[prefix:], torch.tensor([11])])
    text_weights = torch.cat([gen_weights[~is_code], torch.ones(4)])
    logits = text_hidden @ model.decoder.lm_head.weight.T
    text_ce = F.cross_entropy(logits, text_targets, reduction="none")
    want_text = (text_ce * text_weights).sum() / text_weights.sum()
    want_code = dense_ce(model, gen_hidden[:-1][is_code], gen_targets[is_code],
                         vocab.image_codes if image_vocab_range else None)
    torch.testing.assert_close(out["text_loss"], want_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["image_code_loss"], want_code, rtol=1e-5, atol=1e-6)
    assert out["num_image_code_tokens"] == 6 and out["num_text_tokens"] == int((~is_code).sum()) + 4
    torch.testing.assert_close(out["visual_loss"], want_code, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], want_code + 0.3 * want_text, rtol=1e-5, atol=1e-6)


def test_text_loss_weight_lambda():
    batch_docs = [[Text([1, 2]), DiscreteImage(torch.tensor([[1, 2]]), format=PLAIN_FORMAT)]]
    results = []
    for weight in (1.0, 0.005):
        model = UnifiedModel.from_decoder(tiny_decoder(), num_image_codes=8, text_loss_weight=weight)
        out = model(pack(batch_docs, 12, vocab=model.vocab))
        torch.testing.assert_close(out["loss"], out["image_code_loss"] + weight * out["text_loss"])
        results.append(out)
    torch.testing.assert_close(results[0]["text_loss"], results[1]["text_loss"])


def test_regression_head_metamorph_matches_and_trains():
    model = UnifiedModel.from_decoder(tiny_decoder(), feature_dims={"siglip": 6},
                                      continuous_head=RegressionHead(6, HIDDEN))
    prompt, answer = torch.randn(3, 6, generator=seeded(2)), torch.randn(4, 6, generator=seeded(3))
    doc = [ContinuousImage(prompt, encoder="siglip", format=METAMORPH_FORMAT), Text([1, 2], loss=False),
           ContinuousImage(answer, role="target", encoder="siglip", format=METAMORPH_FORMAT), Text([3])]
    batch = pack([doc], 24, vocab=model.vocab, placeholder_id=0)
    out = model(batch)

    ids = doc_ids(batch, 0)  # start p p p end 1 2 start a a a a end 3
    project = model.input_projectors["siglip"]
    hidden = alone(model, ids, replace=[(torch.arange(1, 4), project(prompt)), (torch.arange(8, 12), project(answer))])
    prediction = model.continuous_head(hidden[7:11])
    want_continuous = (1 - F.cosine_similarity(prediction, answer, dim=-1)).mean()
    want_text = dense_ce(model, hidden[torch.tensor([6, 11, 12])], ids[torch.tensor([7, 12, 13])])
    torch.testing.assert_close(out["continuous_loss"], want_continuous, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["text_loss"], want_text, rtol=1e-5, atol=1e-6)
    assert out["num_continuous_tokens"] == 4 and out["num_text_tokens"] == 3

    out["loss"].backward()
    for name, param in [("decoder", model.decoder.layers[0].mlp.up_proj.weight),
                        ("embedding", model.decoder.embed_tokens.weight),
                        ("projector", project.net[0].weight), ("head", model.continuous_head.proj.weight)]:
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_diffusion_head_random_order_unifluid():
    head = DiffusionHead(4, HIDDEN, 16, 1)
    model = UnifiedModel.from_decoder(tiny_decoder(family="gemma2", tied=True), feature_dims={"image": 4},
                                      continuous_head=head, image_grid=(3, 3), next_position_embeddings=True,
                                      text_loss_weight=0.005)
    with torch.no_grad():  # MAR zero-initialises the output layers: give them values so every part gets gradients
        for param in head.parameters():
            param.add_(torch.randn(param.shape, generator=seeded(param.numel())) * 0.05)
    latents = torch.randn(6, 4, generator=seeded(4))
    doc = [Text([1, 2, 3], loss=False, bidirectional=True),
           ContinuousImage(latents, role="target", shape=(2, 3), format=UNIFLUID_FORMAT)]
    batch = pack([doc], 12, vocab=model.vocab, random_order=1.0, generator=seeded(5))
    out = model(batch, generator=seeded(6))

    order = batch.image_positions[0, 4:10, 0] * 3 + batch.image_positions[0, 4:10, 1]
    assert sorted(order.tolist()) == list(range(6)) and order.tolist() != list(range(6))
    ids = doc_ids(batch, 0)  # 1 2 3 boi x x x x x x
    cells = torch.stack([order // 3, order % 3], 1)
    extra = torch.zeros(10, HIDDEN)
    extra[4:10] += model.image_position_embed[cells[:, 0] * 3 + cells[:, 1]]
    extra[3:9] += model.next_position_embed[cells[:, 0] * 3 + cells[:, 1]]  # each predicts the next cell
    projected = model.input_projectors["image"](latents[order])
    hidden = alone(model, ids, prefix=3, replace=[(torch.arange(4, 10), projected)], extra=extra)
    want_continuous = head.loss(hidden[3:9], latents[order], batch_mul=4, generator=seeded(6))
    want_text = F.cross_entropy(model.logits(hidden[2:3]), ids[3:4])  # the BOI (soft-capped logits)
    torch.testing.assert_close(out["continuous_loss"], want_continuous, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["text_loss"], want_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], want_continuous + 0.005 * want_text)

    out["loss"].backward()
    for name, param in [("decoder", model.decoder.layers[1].self_attn.q_proj.weight),
                        ("projector", model.input_projectors["image"].net[2].weight),
                        ("head", head.net.input_proj.weight), ("2d", model.image_position_embed),
                        ("next", model.next_position_embed)]:
        assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert model.image_position_embed.grad[6:].abs().sum() == 0  # rows of the 3rd grid row are unused


def test_hybrid_unitoken_and_toklip():
    model = UnifiedModel.from_decoder(tiny_decoder(), num_image_codes=16, feature_dims={"image": 5})
    codes = torch.randint(0, 16, (2, 2), generator=seeded(7))
    siglip, semantic = torch.randn(3, 5, generator=seeded(8)), torch.randn(4, 5, generator=seeded(9))
    unitoken = [Text([1]), HybridImage(codes, siglip), Text([2, 3])]
    toklip = [Text([4]), HybridImage(codes, semantic, fusion="add", loss=True)]
    batch = pack([unitoken, toklip], 32, vocab=model.vocab)
    out = model(batch)

    project = model.input_projectors["image"]
    ids_u, ids_t = doc_ids(batch, 0), doc_ids(batch, 1)  # 1 boi c c c c sep f f f eoi 2 3 | 4 boi c c c c eoi
    hidden_u = alone(model, ids_u, replace=[(torch.arange(7, 10), project(siglip))])
    hidden_t = alone(model, ids_t, add=[(torch.arange(2, 6), project(semantic))])
    text_hidden = torch.cat([hidden_u[10:12], hidden_t[:1], hidden_t[5:6]])
    want_text = dense_ce(model, text_hidden, torch.cat([ids_u[11:13], ids_t[1:2], ids_t[6:7]]))
    want_code = dense_ce(model, hidden_t[1:5], ids_t[2:6])
    torch.testing.assert_close(out["text_loss"], want_text, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["image_code_loss"], want_code, rtol=1e-5, atol=1e-6)


def test_embed_public_pieces():
    model = UnifiedModel.from_decoder(tiny_decoder(), num_image_codes=8, feature_dims={"image": 3}, image_grid=(2, 2))
    batch = pack([[Text([1]), ContinuousImage(torch.randn(4, 3), shape=(2, 2))]], 8, vocab=model.vocab)
    x = model.embed(batch.input_ids, features=batch.input_features, image_positions=batch.image_positions)
    assert x.shape == (1, 8, HIDDEN)
    projected = model.project_features(batch.input_features["image"].values)
    torch.testing.assert_close(x[0, 2:6], projected + model.image_position_embed)
    torch.testing.assert_close(x[0, :2], model.decoder.embed_tokens(batch.input_ids[0, :2]))
    with pytest.raises(ValueError, match=r"up to row 0, col 2, outside image_grid = \(2, 2\)"):
        model(pack([[ContinuousImage(torch.randn(3, 3), shape=(1, 3))]], 8, vocab=model.vocab))


# ---- bad inputs ---------------------------------------------------------------------------------

def test_bad_batches():
    model = UnifiedModel.from_decoder(tiny_decoder(), num_image_codes=8, feature_dims={"image": 3})
    target = [[ContinuousImage(torch.randn(2, 3), role="target")]]
    with pytest.raises(ValueError, match="no continuous_head"):
        model(pack(target, 8, vocab=model.vocab))
    with pytest.raises(ValueError, match="packed for"):
        model(pack([[Text([1, 2])]], 8, vocab=VocabLayout(64)))
    with pytest.raises(ValueError, match="no input projector for it"):
        model(pack([[ContinuousImage(torch.randn(2, 3), encoder="siglip")]], 8, vocab=model.vocab))
    with pytest.raises(ValueError, match="projector takes 3"):
        model(pack([[ContinuousImage(torch.randn(2, 5))]], 8, vocab=model.vocab))
    with pytest.raises(ValueError, match=r"num_image_codes=8\)"):
        pack([[DiscreteImage(torch.tensor([[8]]))]], 16, vocab=model.vocab)
    with pytest.raises(TypeError, match="Batch"):
        model({"input_ids": torch.zeros(1, 4, dtype=torch.long)})
    regression = UnifiedModel.from_decoder(tiny_decoder(), feature_dims={"image": 3},
                                           continuous_head=RegressionHead(4, HIDDEN))
    with pytest.raises(ValueError, match="token_dim is 4"):
        regression(pack(target, 8, vocab=regression.vocab))


def test_bad_constructions():
    with pytest.raises(ValueError, match="cond_dim must be the decoder's hidden size"):
        UnifiedModel.from_decoder(tiny_decoder(), feature_dims={"image": 3}, continuous_head=RegressionHead(3, 16))
    with pytest.raises(ValueError, match="next_position_embeddings needs image_grid"):
        UnifiedModel.from_decoder(tiny_decoder(), next_position_embeddings=True)
    with pytest.raises(ValueError, match="image_vocab_range needs image codes"):
        UnifiedModel.from_decoder(tiny_decoder(), image_vocab_range=True)
    with pytest.raises(ValueError, match="from_decoder to expand"):
        UnifiedModel(tiny_decoder(), VocabLayout(64, ("boi",)))
    with pytest.raises(TypeError, match="unimm Decoder"):
        UnifiedModel.from_decoder(torch.nn.Linear(2, 2))
