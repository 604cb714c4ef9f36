"""Generation engine: KV-cached decoding against no-cache loops (text, image spans, bidirectional
prefixes, ragged batches, CFG), image structure, continuous images (diffusion replayed token by
token, regression, random order), interleaved text -> image -> text, sampler statistics, bad
inputs; on a GPU, CUDA-graph decoding against eager decoding.

Tiny random fp32 models on the reference backend.
"""

import copy
import functools
import sys
import warnings

import pytest
import torch

from unimm import testing
from unimm.kernels import AttentionMask
from unimm.models import (
    ContinuousImage,
    Decoder,
    DiffusionHead,
    DiscreteImage,
    RegressionHead,
    Text,
    UnifiedModel,
    pack,
)
from unimm.models.generation import ImageSpec, unconditional_prompt
from unimm.models.generation import engine as engine_module
from unimm.models.generation.engine import Engine
from unimm.models.generation.planning import ImagePlan
from unimm.models.generation.timing import PHASES
from unimm.models.sequence import EMU3_FORMAT, METAMORPH_FORMAT, PLAIN_FORMAT, UNIFLUID_FORMAT
from unimm.models.vocab import ImageFormat
from unimm.testing import DEVICE, seeded

HIDDEN = 32
TEXT_VOCAB = 64


pytestmark = pytest.mark.usefixtures("reference_backend")


# a larger init spreads the logits, so greedy choices are far from ties
tiny_decoder = functools.partial(testing.tiny_decoder, init_std=0.3)


def discrete_model(family="llama", grid=False, codes=16, device="cpu"):
    options = dict(image_grid=(3, 3), next_position_embeddings=True) if grid else {}
    return UnifiedModel.from_decoder(tiny_decoder(family, device=device), num_image_codes=codes, **options).to(device)


def continuous_model(head, *, grid=True, format_dims=4):
    options = dict(image_grid=(3, 3), next_position_embeddings=True) if grid else {}
    model = UnifiedModel.from_decoder(tiny_decoder("gemma2"), feature_dims={"image": format_dims},
                                      continuous_head=head, **options)
    with torch.no_grad():  # MAR zero-initialises the head's output layers: give them values
        for param in head.parameters():
            param.add_(torch.randn(param.shape, generator=seeded(param.numel())) * 0.3)
    return model


# ---- plain decoder: ids in, ids out ---------------------------------------------------------

def no_cache_greedy(decoder, prompt: torch.Tensor, steps: int) -> list[int]:
    """Argmax loop with one full forward over the growing sequence per step."""
    seq = prompt.tolist()
    for _ in range(steps):
        logits = decoder.logits(decoder(torch.tensor([seq]))[0, -1])
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_decoder_greedy_matches_no_cache_loop_ragged(family):
    decoder = tiny_decoder(family)
    ids = torch.randint(0, TEXT_VOCAB, (3, 7), generator=seeded(1))
    lens = [7, 3, 5]
    out = decoder.generate(ids, 6, prompt_lens=lens)
    assert out.shape == (3, 13) and out.dtype == torch.long
    with torch.no_grad():
        for b, n in enumerate(lens):
            assert out[b, :n].tolist() == ids[b, :n].tolist()
            assert out[b, n:n + 6].tolist() == no_cache_greedy(decoder, ids[b, :n], 6)
            assert (out[b, n + 6:] == 0).all()
    mask = (torch.arange(7) < torch.tensor(lens)[:, None]).long()
    assert torch.equal(decoder.generate(ids, 6, attention_mask=mask), out)
    assert torch.equal(decoder.generate(ids, 6, prompt_lens=lens, cuda_graphs=False, max_len=40), out)


def test_decoder_stop_tokens_pad_and_stop_early():
    decoder = tiny_decoder()
    ids = torch.randint(0, TEXT_VOCAB, (2, 4), generator=seeded(2))
    free = decoder.generate(ids, 8)
    stop = int(free[0, 6])  # row 0's third new token
    first = free[0, 4:].tolist().index(stop)
    out = decoder.generate(ids, 8, stop_tokens=[stop], pad_id=63)
    assert out[0, :5 + first].tolist() == free[0, :5 + first].tolist()
    assert (out[0, 5 + first:] == 63).all()
    row1 = free[1, 4:].tolist()
    if stop in row1:
        assert out.shape[1] == 4 + max(first, row1.index(stop)) + 1  # stopped as soon as every row had
    else:
        assert out[1].tolist() == free[1].tolist()
    every = decoder.generate(ids, 8, stop_tokens=list(range(TEXT_VOCAB)))
    assert every.shape == (2, 5) and torch.equal(every, free[:, :5])  # all rows stop at step 1: no more steps
    assert decoder.generate(ids, 0).tolist() == ids.tolist()


def test_decoder_vocab_range_and_sampling_reproducible():
    decoder = tiny_decoder()
    ids = torch.randint(0, TEXT_VOCAB, (3, 5), generator=seeded(3))
    out = decoder.generate(ids, 6, temperature=1.0, top_k=5, vocab_range=(10, 20), generator=seeded(4))
    assert ((out[:, 5:] >= 10) & (out[:, 5:] < 20)).all()
    assert torch.equal(out, decoder.generate(ids, 6, temperature=1.0, top_k=5, vocab_range=(10, 20),
                                             generator=seeded(4)))
    nucleus = decoder.generate(ids, 6, temperature=0.9, top_p=0.5, generator=seeded(5))
    assert nucleus.shape == (3, 11)


def test_sampled_tokens_follow_the_softmax():
    """Many rows of one prompt, one token each: the empirical distribution is the softmax of
    logits / temperature; top-k never leaves the k best."""
    decoder = tiny_decoder(vocab=8)
    prompt = torch.tensor([[1, 5, 2]])
    rows = 6000
    with torch.no_grad():
        probs = torch.softmax(decoder.logits(decoder(prompt))[0, -1] / 0.7, -1)
    out = decoder.generate(prompt.expand(rows, 3), 1, temperature=0.7, generator=seeded(6))[:, -1]
    freq = torch.bincount(out, minlength=8).double() / rows
    assert (freq - probs.double()).abs().max() < 0.035  # > 4 standard deviations of any frequency
    top3 = decoder.generate(prompt.expand(500, 3), 1, temperature=1.0, top_k=3, generator=seeded(7))[:, -1]
    assert set(top3.tolist()) <= set(probs.topk(3).indices.tolist())


# ---- unified model: references ----------------------------------------------------------------

def packed(model, document):
    return pack([document], 256, vocab=model.vocab)


def growing_hidden(model, batch, p: int) -> torch.Tensor:
    """Hidden state at position p - 1 of a full forward over the first p tokens of the batch row."""
    embeds = model.embed(batch.input_ids, features=batch.input_features, image_positions=batch.image_positions,
                         next_image_positions=batch.next_image_positions)
    mask = AttentionMask.from_intervals(batch.mask.kv_start[:, :p], batch.mask.kv_end[:, :p].clamp_max(p))
    return model.decoder(inputs_embeds=embeds[:, :p], positions=batch.positions[:, :p], mask=mask)[0, -1]


def check_against_no_cache(model, prompt, continuation, *, uncond=None, cfg_scale=1.0, check_text=True):
    """Every image code (and text token) of ``continuation`` is the argmax of a no-cache forward
    over the growing sequence (guided with ``uncond`` at ``cfg_scale``); structure tokens come
    from ``pack``. Returns the number of tokens checked."""
    cond = packed(model, prompt + continuation)
    plain = packed(model, prompt)
    start, length = plain.placements[0][2], cond.placements[0][2]
    ucond = packed(model, uncond + continuation) if uncond is not None else None
    shift = (ucond.placements[0][2] - length) if ucond is not None else 0
    lo = model.vocab.image_codes[0]
    text_positions = set()
    position = start
    for segment in continuation:
        count = packed(model, [segment]).placements[0][2]
        if isinstance(segment, Text):
            text_positions.update(range(position, position + count))
        position += count
    checked = 0
    with torch.no_grad():
        for p in range(start, length):
            token = int(cond.input_ids[0, p])
            is_code = token >= lo
            if not is_code and not (check_text and p in text_positions):
                continue
            block = model.vocab.image_codes if is_code else (0, lo)
            logits = model.logits(growing_hidden(model, cond, p), block)
            if is_code and ucond is not None:
                unguided = model.logits(growing_hidden(model, ucond, p + shift), block)
                logits = unguided + cfg_scale * (logits - unguided)
            assert int(logits.argmax()) + block[0] == token, f"position {p}"
            checked += 1
    return checked


# ---- unified model: text, discrete images --------------------------------------------------

@pytest.mark.parametrize("family, grid", [("llama", False), ("gemma2", True)])
def test_unified_greedy_matches_no_cache_loop(family, grid):
    """Ragged prompts, one with a bidirectional image + question prefix; text-to-image then text."""
    model = discrete_model(family, grid=grid)
    codes = torch.randint(0, 16, (2, 2), generator=seeded(8))
    prompts = [[Text([1, 2, 3, 4, 5])],
               [DiscreteImage(codes, loss=False, bidirectional=True, format=PLAIN_FORMAT),
                Text([6, 7], loss=False, bidirectional=True)]]
    spec = ImageSpec("discrete", shape=(2, 3), temperature=0.0)
    out = model.generate(prompts, max_new_tokens=3, image=spec, start_image=True)
    assert len(out) == 2
    for prompt, continuation in zip(prompts, out):
        assert [type(s) for s in continuation] == [DiscreteImage, Text]
        image = continuation[0]
        assert image.codes.shape == (2, 3) and image.format == EMU3_FORMAT
        assert len(continuation[1].ids) == 3
        ids = packed(model, continuation).input_ids[0]  # BOI size_2 size_x size_3 IMG (3 codes EOL) x2 EOF EOI text
        v = model.vocab
        assert ids[:5].tolist() == [v.special_id(n) for n in ("boi", "size_2", "size_x", "size_3", "img")]
        assert ids[8] == ids[12] == v.special_id("eol") and ids[13] == v.special_id("eof")
        assert ids[14] == v.special_id("eoi")
        assert check_against_no_cache(model, prompt, continuation) == 9

    text = model.generate(prompts, max_new_tokens=4)  # text only: never an image code
    for prompt, continuation in zip(prompts, text):
        assert len(continuation) == 1 and len(continuation[0].ids) == 4
        assert max(continuation[0].ids) < model.vocab.image_codes[0]
        assert check_against_no_cache(model, prompt, continuation) == 4


def test_generation_writes_the_emu3_structure_tokens_pack_writes(monkeypatch):
    """The engine writes an Emu3 image's structure tokens itself (BOI, size, image token, EOL per
    row, EOF, EOI): the ids it feeds the decoder for a generated image are ``pack``'s ids of that
    image, token for token, whether the image is started by the caller or by a sampled BOI."""
    engines = []
    run = Engine.run

    def recording(self, prefill):
        engines.append(self)
        return run(self, prefill)

    monkeypatch.setattr(Engine, "run", recording)
    model = discrete_model()
    vocab = model.vocab
    spec = ImageSpec("discrete", shape=(3, 11), temperature=1.0, top_k=8)  # a two-digit width
    opening = [vocab.special_id(n) for n in ("boi", "size_3", "size_x", "size_1", "size_1", "img")]
    out = model.generate([[Text([1, 2])], [Text([3])]], max_new_tokens=0, image=spec, start_image=True,
                         generator=seeded(12))
    written = torch.stack(engines[-1].step_ids, 1).cpu()  # [rows, steps]: every token the engine produced
    assert written.shape == (2, 6 + 3 * 12 + 2)
    for b, [image] in enumerate(out):
        batch = packed(model, [image])
        assert batch.placements[0][2] == written.shape[1]
        assert written[b].tolist() == batch.input_ids[0, :written.shape[1]].tolist()
        assert written[b, :6].tolist() == opening

    # a BOI sampled in text starts the image; the engine writes the rest
    real_logits = model.logits

    def choose_boi(hidden, vocab_range=None):
        logits = real_logits(hidden, vocab_range)
        if vocab_range == (0, vocab.image_codes[0]):
            logits = torch.full_like(logits, -1e4)
            logits[:, vocab.special_id("boi")] = 0.0
        return logits

    monkeypatch.setattr(model, "logits", choose_boi)
    [[image]] = model.generate([[Text([4, 5])]], max_new_tokens=1, image=spec, generator=seeded(13))
    written = torch.stack(engines[-1].step_ids, 1)[0].cpu()
    assert written.tolist() == packed(model, [image]).input_ids[0, :written.numel()].tolist()
    assert written[:6].tolist() == opening and written.numel() == 6 + 3 * 12 + 2

    # Emu3's 33 x 32 image: 1,098 tokens per generated image, the plan laid out as pack lays it out
    plan = ImagePlan(ImageSpec("discrete", shape=(33, 32)), model)
    span = pack([[DiscreteImage(torch.zeros(33, 32, dtype=torch.long), loss=False)]], 1100, vocab=vocab)
    assert len(plan) == 1098 and span.placements[0][2] == 1098
    ids = span.input_ids[0, :1098]
    assert plan.ids == torch.where(ids >= vocab.image_codes[0], -1, ids).tolist()
    assert plan.ids[6] == vocab.special_id("img") and plan.ids[7] == -1


def test_cfg_greedy_matches_guided_no_cache_loop():
    model = discrete_model()
    prompts = [[Text([9, 3, 4, 7])], [Text([9, 5])]]
    uncond = [[Text([9])], [Text([9, 1, 1])]]
    spec = ImageSpec("discrete", shape=(2, 2), cfg_scale=3.0, temperature=0.0, format=PLAIN_FORMAT)
    out = model.generate(prompts, max_new_tokens=0, image=spec, start_image=True, uncond_prompts=uncond)
    for prompt, u, continuation in zip(prompts, uncond, out):
        assert [type(s) for s in continuation] == [DiscreteImage]
        assert check_against_no_cache(model, prompt, continuation, uncond=u, cfg_scale=3.0) == 4
    # default unconditional prompt: the prompt's first token (BOS)
    assert unconditional_prompt(prompts[0])[0].ids == [9]
    again = model.generate(prompts, max_new_tokens=0, image=spec, start_image=True,
                           uncond_prompts=lambda prompt: [Text([9])])
    default = model.generate(prompts, max_new_tokens=0, image=spec, start_image=True)
    assert all(torch.equal(a[0].codes, b[0].codes) for a, b in zip(again, default))


def test_cfg_scale_one_equals_unguided_sampling():
    model = discrete_model()
    prompts = [[Text([1, 2, 3])], [Text([4])]]
    spec = dict(kind="discrete", shape=(3, 3), temperature=1.0, top_k=8, top_p=0.9)
    unguided = model.generate(prompts, max_new_tokens=2, image=ImageSpec(**spec), start_image=True,
                              temperature=1.0, generator=seeded(9))
    scale_one = model.generate(prompts, max_new_tokens=2, image=ImageSpec(**spec, cfg_scale=1.0), start_image=True,
                               temperature=1.0, generator=seeded(9), uncond_prompts=[[Text([0])], [Text([0])]])
    for a, b in zip(unguided, scale_one):
        assert torch.equal(a[0].codes, b[0].codes) and a[1].ids == b[1].ids
    guided = model.generate(prompts, max_new_tokens=0, image=ImageSpec(**spec, cfg_scale=4.0), start_image=True,
                            generator=seeded(9))
    assert all(g[0].codes.shape == (3, 3) for g in guided)


def test_interleaved_text_image_text_with_scripted_text_choices(monkeypatch):
    """Rows leave and re-enter text at different steps (mixed steps: text, structure and codes at
    once). Text choices are scripted through the logits; codes are the model's greedy ones."""
    model = discrete_model(grid=True)
    vocab, lo = model.vocab, model.vocab.image_codes[0]
    boi, stop = vocab.special_id("boi"), 2
    # per text step, the members' tokens: row 0 starts its image at once, row 1 two steps later
    script = iter([[boi, 5], [6], [boi], [7], [stop], [8], [stop]])
    real_logits = model.logits

    def scripted(hidden, vocab_range=None):
        logits = real_logits(hidden, vocab_range)
        if vocab_range == (0, lo):
            chosen = torch.tensor(next(script))
            assert chosen.numel() == hidden.shape[0]
            logits = torch.full_like(logits, -1e4)
            logits[torch.arange(chosen.numel()), chosen] = 0.0
        return logits

    monkeypatch.setattr(model, "logits", scripted)
    prompts = [[Text([1, 3])], [Text([4, 4, 4])]]
    spec = ImageSpec("discrete", shape=(1, 2), temperature=0.0, format=PLAIN_FORMAT)
    out = model.generate(prompts, max_new_tokens=10, stop_tokens=[stop], image=spec)
    assert [type(s) for s in out[0]] == [DiscreteImage, Text] and out[0][1].ids == [7, stop]
    assert [type(s) for s in out[1]] == [Text, DiscreteImage, Text]
    assert out[1][0].ids == [5, 6] and out[1][2].ids == [8, stop]
    monkeypatch.setattr(model, "logits", real_logits)
    for prompt, continuation in zip(prompts, out):
        assert check_against_no_cache(model, prompt, continuation, check_text=False) == 2

    # out of images (max_images=1), a scripted begin token is banned: the argmax falls elsewhere
    script = iter([[boi], [boi]])
    monkeypatch.setattr(model, "logits", scripted)
    once = model.generate(prompts[:1], max_new_tokens=2, image=spec)
    assert [type(s) for s in once[0]] == [DiscreteImage, Text] and once[0][1].ids == [0]


# ---- unified model: continuous images ------------------------------------------------------

def test_diffusion_random_order_replays_token_by_token():
    """UniFluid: BOI then 2x3 continuous tokens in a random order with CFG. Each token is what
    ``DiffusionHead.sample`` makes from the teacher-forced hidden states of the returned image,
    replayed with the same generator; features come back in raster order."""
    head = DiffusionHead(4, HIDDEN, 16, 1)
    model = continuous_model(head)
    prompt = [Text([1, 2, 3], loss=False, bidirectional=True)]
    uncond = [Text([1])]
    spec = ImageSpec("continuous", shape=(2, 3), format=UNIFLUID_FORMAT, random_order=True, cfg_scale=2.5,
                     diffusion_steps=4, diffusion_temperature=0.9, clip_denoised=3.0)
    [out] = model.generate([prompt], max_new_tokens=0, image=spec, start_image=True, uncond_prompts=[uncond],
                           generator=seeded(10))
    [image] = out
    assert isinstance(image, ContinuousImage) and image.features.shape == (6, 4) and image.shape == (2, 3)
    order = image.order
    assert sorted(order.tolist()) == list(range(6))

    replay = seeded(10)
    assert torch.equal(torch.randperm(6, generator=replay), order)
    target = dict(features=image.features, role="target", shape=(2, 3), order=order, format=UNIFLUID_FORMAT)
    with torch.no_grad():
        conds = []
        for context in (prompt, uncond):
            batch = packed(model, context + [ContinuousImage(**target)])
            embeds = model.embed(batch.input_ids, features=batch.input_features,
                                 image_positions=batch.image_positions, next_image_positions=batch.next_image_positions)
            hidden = model.decoder(inputs_embeds=embeds, positions=batch.positions, mask=batch.mask)
            conds.append(hidden.reshape(-1, HIDDEN)[batch.target_features.positions])
        for t in range(6):
            token = head.sample(torch.cat([conds[0][t:t + 1], conds[1][t:t + 1]]), num_steps=4, cfg_scale=2.5,
                                temperature=0.9, generator=replay, clip_denoised=3.0)
            torch.testing.assert_close(token[0], image.features[order[t]], rtol=1e-4, atol=1e-4)

    again = model.generate([prompt], max_new_tokens=0, image=spec, start_image=True, uncond_prompts=[uncond],
                           generator=seeded(10))
    assert torch.equal(again[0][0].features, image.features)
    other = model.generate([prompt], max_new_tokens=0, image=spec, start_image=True, uncond_prompts=[uncond],
                           generator=seeded(11))
    assert not torch.equal(other[0][0].features, image.features)


def test_regression_metamorph_then_text_matches_teacher_forcing():
    """MetaMorph: <image_start> 4 regressed tokens <image_end>, then greedy text; raster order
    without a grid; two ragged prompts at once."""
    model = continuous_model(RegressionHead(4, HIDDEN), grid=False)
    prompts = [[Text([1, 2, 3, 4], loss=False)], [Text([5, 6], loss=False)]]
    spec = ImageSpec("regression", num_tokens=4)
    assert spec.format == METAMORPH_FORMAT
    out = model.generate(prompts, max_new_tokens=2, image=spec, start_image=True)
    for prompt, continuation in zip(prompts, out):
        image, text = continuation
        assert image.features.shape == (4, 4) and image.order is None and len(text.ids) == 2
        doc = prompt + [ContinuousImage(image.features, role="target", format=METAMORPH_FORMAT), text]
        with torch.no_grad():
            batch = packed(model, doc)
            embeds = model.embed(batch.input_ids, features=batch.input_features)
            hidden = model.decoder(inputs_embeds=embeds, positions=batch.positions, mask=batch.mask)
            predicted = model.continuous_head(hidden.reshape(-1, HIDDEN)[batch.target_features.positions])
        torch.testing.assert_close(predicted, image.features, rtol=1e-4, atol=1e-5)
        assert check_against_no_cache(model, prompt, continuation) == 2


def test_continuous_raster_order_without_begin_token():
    """An image format without a begin token: the prompt's last token carries the next-position
    embedding of the first image token (checked by teacher forcing with a regression head)."""
    model = continuous_model(RegressionHead(4, HIDDEN))
    fmt = ImageFormat(begin=None, end="eoi")
    spec = ImageSpec("regression", shape=(2, 2), format=fmt)
    prompt = [Text([7, 8], loss=False)]
    [[image]] = model.generate([prompt], max_new_tokens=0, image=spec, start_image=True)
    with torch.no_grad():
        batch = packed(model, prompt + [ContinuousImage(image.features, role="target", shape=(2, 2), format=fmt)])
        embeds = model.embed(batch.input_ids, features=batch.input_features, image_positions=batch.image_positions,
                             next_image_positions=batch.next_image_positions)
        hidden = model.decoder(inputs_embeds=embeds, positions=batch.positions, mask=batch.mask)
        predicted = model.continuous_head(hidden.reshape(-1, HIDDEN)[batch.target_features.positions])
    torch.testing.assert_close(predicted, image.features, rtol=1e-4, atol=1e-5)


# ---- bad inputs ---------------------------------------------------------------------------

def test_bad_inputs_raise():
    decoder = tiny_decoder()
    ids = torch.randint(0, TEXT_VOCAB, (2, 5), generator=seeded(12))
    with pytest.raises(ValueError, match=r"max_len=6 is too small: the longest prompt \(5 tokens\)"):
        decoder.generate(ids, 4, max_len=6)
    with pytest.raises(ValueError, match=r"vocab_range must be \(lo, hi\) with 0 <= lo < hi <= vocab_size = 64"):
        decoder.generate(ids, 2, vocab_range=(0, 65))
    with pytest.raises(ValueError, match="right-padded"):
        decoder.generate(ids, 2, attention_mask=torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, 5\]"):
        decoder.generate(ids, 2, prompt_lens=[0, 5])
    with pytest.raises(ValueError, match="not both"):
        decoder.generate(ids, 2, prompt_lens=[5, 5], attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="stop_tokens must be token ids"):
        decoder.generate(ids, 2, stop_tokens=[64])
    with pytest.raises(ValueError, match="temperature must be"):
        decoder.generate(ids, 2, temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be"):
        decoder.generate(ids, -1)
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        decoder.generate(ids.float(), 2)

    with pytest.raises(ValueError, match="shape .* is required for discrete images"):
        ImageSpec("discrete")
    with pytest.raises(ValueError, match="kind must be one of"):
        ImageSpec("pixels", shape=(2, 2))
    with pytest.raises(ValueError, match="random_order applies to continuous images only"):
        ImageSpec("discrete", shape=(2, 2), random_order=True)
    model = discrete_model()
    prompts = [[Text([1, 2])], [Text([3])]]
    spec = ImageSpec("discrete", shape=(2, 2), cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"uncond_prompts must be one prompt per prompt \(2\)"):
        model.generate(prompts, max_new_tokens=0, image=spec, start_image=True, uncond_prompts=[[Text([0])]])
    with pytest.raises(ValueError, match="start_image=True needs image"):
        model.generate(prompts, max_new_tokens=0, start_image=True)
    with pytest.raises(ValueError, match=r"max_len=10 is too small"):
        model.generate(prompts, max_new_tokens=0, image=spec, start_image=True, max_len=10)
    with pytest.raises(ValueError, match=r"prompts\[1\]: .*image codes"):
        model.generate([[Text([1])], [Text([90])]], max_new_tokens=1)
    with pytest.raises(ValueError, match="continuous images need a DiffusionHead"):
        model.generate(prompts, max_new_tokens=0, image=ImageSpec("continuous", shape=(2, 2)), start_image=True)
    with pytest.raises(ValueError, match="exceeds the model's image_grid"):
        discrete_model(grid=True).generate(prompts, max_new_tokens=0, image=ImageSpec("discrete", shape=(4, 1)))
    with pytest.raises(ValueError, match="discrete images need image codes"):
        UnifiedModel.from_decoder(tiny_decoder(), feature_dims={"image": 4}).generate(
            prompts, max_new_tokens=0, image=ImageSpec("discrete", shape=(1, 1)))
    unordered = continuous_model(DiffusionHead(4, HIDDEN, 16, 1), grid=False)
    with pytest.raises(ValueError, match="random_order needs a model with next_position_embeddings"):
        unordered.generate(prompts, max_new_tokens=0, image=ImageSpec("continuous", shape=(1, 2), random_order=True))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        model.generate(prompts, max_new_tokens=1, generator="seed")


# ---- GPU: CUDA graphs ------------------------------------------------------------------------
#
# Fast tier (`pytest -m gpu`), counted for a cold Triton cache (automatic dispatch; sampling is the
# CUDA kernel, no compile):
#   * test_cuda_graph_decode_equals_eager: tiny fp32 models (head_dim 16: Triton decode). Gemma-2:
#     prefill attention (soft-cap), the sliding layer's one-row attention step, the decode split
#     kernel = 3 compiles; Llama with images and guidance: prefill attention and the decode split
#     kernel = 2 (the caches are short: one split, no combine kernel).
#   * test_cuda_graph_decode_bf16: a Gemma-2 block at head_dim 128 in bf16 (its full layer decodes
#     with the CUDA kernel): prefill attention and the sliding layer's one-row step = 2 compiles.
# Total: 7 Triton compiles (~8 s).
# Full tier (`pytest -m gpu_full`): test_cuda_graph_continuous_generation (the diffusion head's
# captured sampler inside captured decoding).

@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(monkeypatch):
    monkeypatch.delenv("UNIMM_BACKEND")
    device = DEVICE
    decoder = tiny_decoder("gemma2", device=device)
    ids = torch.randint(0, TEXT_VOCAB, (3, 9), generator=seeded(13)).to(device)
    lens = [9, 4, 6]
    graphed = decoder.generate(ids, 12, prompt_lens=lens)
    eager = decoder.generate(ids, 12, prompt_lens=lens, cuda_graphs=False)
    assert torch.equal(graphed, eager)

    model = discrete_model("llama", grid=True, device=device)
    spec = ImageSpec("discrete", shape=(3, 3), cfg_scale=3.0, temperature=1.0, top_k=6)
    prompts = [[Text([1, 2, 3])], [Text([4, 5])]]
    runs = [model.generate(prompts, max_new_tokens=3, image=spec, start_image=True, temperature=1.0,
                           generator=torch.Generator(device).manual_seed(14), cuda_graphs=graphs)
            for graphs in (True, False)]
    for a, b in zip(*runs):
        assert torch.equal(a[0].codes, b[0].codes) and a[1].ids == b[1].ids


def gemma2_block(device, dtype=torch.bfloat16, vocab=32000):
    """Two Gemma-2 layers (sliding window, then full attention) at a real head size: 8 query and 4
    kv heads of 128, a window of 32 that decoding slides past, both soft-caps. The output head is
    untied: a random model with tied embeddings mostly repeats its input token, which any
    decode step, right or wrong, would predict."""
    config = dict(model_type="gemma2", vocab_size=vocab, hidden_size=1024, intermediate_size=2048,
                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
                  query_pre_attn_scalar=128, sliding_window=32, max_position_embeddings=4096,
                  tie_word_embeddings=False)
    torch.manual_seed(20)
    decoder = Decoder.from_config(config)
    with torch.no_grad():  # unit-gain projections; a wider output head spreads the logits
        for name, param in decoder.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, (3.0 if "lm_head" in name else 1.0) / param.shape[1] ** 0.5)
    return decoder.to(device, dtype)


def assert_near_argmax_in_fp32(decoder, out, lens, steps, margin):
    """Teacher-forced through an fp32 copy (reference attention): every generated token's fp32
    logit is within ``margin`` of the best one at its position."""
    reference = copy.deepcopy(decoder).float()
    with torch.no_grad():
        for b, n in enumerate(lens):
            seq = out[b, :n + steps]
            logits = reference.logits(reference(seq[None])[0, n - 1:n + steps - 1]).float()
            gap = logits.max(-1).values - logits.gather(1, seq[n:, None])[:, 0]
            assert gap.max() <= margin, f"row {b}: a generated token is {gap.max():.3g} below the fp32 best"


GEMMA2_BF16_MARGIN = 0.5  # the best logit stands ~12 above the mean (spread ~3); bf16 moved choices by < 0.05 (CPU)


@pytest.mark.gpu
def test_cuda_graph_decode_bf16(monkeypatch):
    """bf16 decoding at a real head size: graphed equals eager (greedy and sampled), and the greedy
    tokens are the fp32 model's choices up to bf16 rounding."""
    monkeypatch.delenv("UNIMM_BACKEND")
    device = DEVICE
    decoder = gemma2_block(device)
    ids = torch.randint(0, 32000, (3, 48), generator=seeded(21)).to(device)
    lens, steps = [48, 17, 33], 40
    greedy = decoder.generate(ids, steps, prompt_lens=lens)
    assert torch.equal(greedy, decoder.generate(ids, steps, prompt_lens=lens, cuda_graphs=False))
    sampled = [decoder.generate(ids, steps, prompt_lens=lens, temperature=0.8, top_k=50, top_p=0.9,
                                generator=torch.Generator(device).manual_seed(22), cuda_graphs=graphs)
               for graphs in (True, False)]
    assert torch.equal(*sampled)
    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    assert_near_argmax_in_fp32(decoder, greedy, lens, steps, margin=GEMMA2_BF16_MARGIN)


@pytest.mark.gpu_full
def test_cuda_graph_continuous_generation(monkeypatch):
    """UniFluid-style continuous tokens (random order, guidance) on a GPU: the diffusion head samples
    through its own captured loop inside captured decode steps; equal to eager decoding."""
    monkeypatch.delenv("UNIMM_BACKEND")
    device = DEVICE
    model = continuous_model(DiffusionHead(4, HIDDEN, 16, 1)).to(device)
    prompts = [[Text([1, 2, 3], loss=False, bidirectional=True)], [Text([4, 5])]]
    spec = ImageSpec("continuous", shape=(2, 3), format=UNIFLUID_FORMAT, random_order=True, cfg_scale=2.5,
                     diffusion_steps=8, diffusion_temperature=0.9, clip_denoised=3.0)
    runs = [model.generate(prompts, max_new_tokens=2, image=spec, start_image=True,
                           generator=torch.Generator(device).manual_seed(23), cuda_graphs=graphs)
            for graphs in (True, False)]
    for a, b in zip(*runs):
        assert torch.equal(a[0].features, b[0].features) and torch.equal(a[0].order, b[0].order)
        assert a[1].ids == b[1].ids


# ---- captured decode steps are reused across calls ------------------------------------------------

class _ReplayingGraph:
    """What a captured step does at replay, on the CPU: run the step and write its output in place."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step())


def _counting_capture(monkeypatch, captures: list):
    def capture(step, device, *, warmups=1, reset=None):
        captures.append(device)
        for _ in range(warmups):
            step()
            reset()
        out = step()  # a real capture runs nothing: undo the step's length update
        reset()
        return _ReplayingGraph(step, out), out

    monkeypatch.setattr(engine_module, "graphable", lambda device: True)
    monkeypatch.setattr(engine_module, "capture_cuda_graph", capture)


def test_decode_graph_captured_once_per_shape(monkeypatch):
    """A second ``generate`` of the same shapes captures nothing new and returns the eager tokens;
    new shapes capture once more; the cache of captured steps stays bounded."""
    decoder = tiny_decoder("gemma2")
    engine_module.release_decode_steps()
    ids = torch.randint(0, TEXT_VOCAB, (3, 9), generator=seeded(30))
    lens = [9, 4, 6]
    eager = decoder.generate(ids, 7, prompt_lens=lens, cuda_graphs=False)
    captures = []
    _counting_capture(monkeypatch, captures)
    first = decoder.generate(ids, 7, prompt_lens=lens)
    second = decoder.generate(ids, 7, prompt_lens=lens)
    assert len(captures) == 1 and torch.equal(first, eager) and torch.equal(second, eager)
    other = decoder.generate(ids[:2], 5, prompt_lens=lens[:2])  # other rows and cache length
    assert len(captures) == 2
    assert torch.equal(other, decoder.generate(ids[:2], 5, prompt_lens=lens[:2], cuda_graphs=False))
    assert len(captures) == 2
    for steps in range(1, engine_module.MAX_CACHED_STEPS + 2):
        decoder.generate(ids, steps, prompt_lens=lens)
    assert len(engine_module._STEPS[decoder]) == engine_module.MAX_CACHED_STEPS
    engine_module.release_decode_steps(decoder)
    assert decoder not in engine_module._STEPS


def test_continuous_generation_reads_back_once_not_per_token(monkeypatch):
    """Continuous tokens (diffusion head, CFG, random order) make no device read per token: the
    generation code and the head read back as often for a 2x2 image as for a 3x3 one (the
    output's own copies). The decoder's reads are left out: they are checks of host data (CPU
    cache lengths, a Python constant), which a GPU decode step does not make."""
    head = DiffusionHead(4, HIDDEN, 16, 1)
    model = continuous_model(head)
    prompt = [Text([1, 2, 3], loss=False, bidirectional=True)]
    reads = []
    watched = ("/unimm/models/generation/", "/unimm/models/heads.py", "/unimm/kernels/")

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if any(part in caller for part in watched):
                reads.append((name, caller))
            return original(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    counts = []
    for shape in ((2, 2), (3, 3)):
        spec = ImageSpec("continuous", shape=shape, format=UNIFLUID_FORMAT, random_order=True, cfg_scale=2.5,
                         diffusion_steps=3)
        reads.clear()
        model.generate([prompt], max_new_tokens=0, image=spec, start_image=True, uncond_prompts=[[Text([1])]],
                       generator=seeded(31))
        counts.append(len(reads))
    assert counts[0] == counts[1], counts


@pytest.mark.gpu
def test_gpu_decode_graph_captured_once(monkeypatch):
    monkeypatch.delenv("UNIMM_BACKEND")
    decoder = tiny_decoder("gemma2", device=DEVICE)
    engine_module.release_decode_steps()
    captures = []
    real = engine_module.capture_cuda_graph
    monkeypatch.setattr(engine_module, "capture_cuda_graph",
                        lambda *a, **k: (captures.append(1), real(*a, **k))[1])
    ids = torch.randint(0, TEXT_VOCAB, (3, 9), generator=seeded(32)).to(DEVICE)
    first = decoder.generate(ids, 6, prompt_lens=[9, 4, 6])
    second = decoder.generate(ids, 6, prompt_lens=[9, 4, 6])
    assert len(captures) == 1 and torch.equal(first, second)
    assert torch.equal(first, decoder.generate(ids, 6, prompt_lens=[9, 4, 6], cuda_graphs=False))


def test_return_timings_names_every_phase():
    decoder = tiny_decoder("llama")
    ids = torch.randint(0, TEXT_VOCAB, (2, 5), generator=seeded(33))
    out, timings = decoder.generate(ids, 3, return_timings=True)
    assert torch.equal(out, decoder.generate(ids, 3))
    assert set(timings) == set(PHASES) and all(v >= 0 for v in timings.values())
    assert timings["prefill"] > 0 and timings["decode_steps"] > 0 and timings["sampling"] > 0
    model = continuous_model(DiffusionHead(4, HIDDEN, 16, 1))
    spec = ImageSpec("continuous", shape=(2, 2), format=UNIFLUID_FORMAT, cfg_scale=2.0, diffusion_steps=2)
    segments, timings = model.generate([[Text([1, 2])]], max_new_tokens=1, image=spec, start_image=True,
                                       generator=seeded(34), return_timings=True)
    assert timings["diffusion_head"] > 0 and timings["structure_tokens"] > 0 and timings["inputs"] > 0
    with pytest.raises((TypeError, ValueError), match="return_timings"):
        decoder.generate(ids, 3, return_timings="yes")


@pytest.mark.gpu
def test_gpu_continuous_generation_syncs_once_per_call_not_per_token(monkeypatch):
    """torch's sync debug mode counts every synchronising call: a 3x3 continuous image (CFG,
    random order, diffusion head) makes no more of them than a 2x2 one."""
    monkeypatch.delenv("UNIMM_BACKEND")
    model = continuous_model(DiffusionHead(4, HIDDEN, 16, 1)).to(DEVICE)
    prompt = [Text([1, 2, 3], loss=False, bidirectional=True)]
    counts = []
    for shape in ((2, 2), (3, 3)):
        spec = ImageSpec("continuous", shape=shape, format=UNIFLUID_FORMAT, random_order=True, cfg_scale=2.5,
                         diffusion_steps=3)
        run = functools.partial(model.generate, [prompt], max_new_tokens=0, image=spec, start_image=True,
                                uncond_prompts=[[Text([1])]], generator=torch.Generator(DEVICE).manual_seed(35))
        run()  # captures and compiles outside the count
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchronizing" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


def test_lru_per_owner_keeps_the_most_recent_entries_of_each_owner():
    """The bounded graph caches of the engine and the diffusion loop: an entry is built once, a hit
    refreshes it, the least recently used goes past the limit, and an owner's entries die with it."""
    import gc
    import weakref

    from unimm.kernels._common import lru_per_owner

    class Owner:
        pass

    store, built = weakref.WeakKeyDictionary(), []

    def get(owner, key):
        return lru_per_owner(store, owner, key, 2, lambda: built.append(key) or f"entry {key}")

    a, b = Owner(), Owner()
    assert get(a, 1) == "entry 1" and get(a, 2) == "entry 2" and get(a, 1) == "entry 1"
    assert get(a, 3) == "entry 3"  # drops 2, the least recently used
    assert get(a, 1) == "entry 1" and get(a, 2) == "entry 2"
    assert built == [1, 2, 3, 2]
    get(b, 1)
    assert built == [1, 2, 3, 2, 1]  # owners do not share entries
    del a
    gc.collect()
    assert list(store.keys()) == [b]
