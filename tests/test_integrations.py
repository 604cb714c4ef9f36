"""unimm.integrations.transformers.apply: a patched Hugging Face model computes what the original
does (loss, every gradient, logits, generation), through unimm's attention and fused loss.

Tiny random Llama / Qwen2 / Qwen3 / Gemma-2 / Gemma-3 (text only, and with a SigLIP vision tower)
/ Chameleon models in fp32 on the CPU; the reference is the same model, unpatched, on
transformers' eager attention. Most tests force UNIMM_BACKEND=reference for speed; one runs every
live backend (Triton through its interpreter here).

The tests run on every transformers the ``test`` extra admits (CI: the newest and the floor,
4.52.1). Where releases treat a hand-made mask differently (4.x: one 4-D mask that sliding layers
window themselves; 5.x: a mask per layer type), the reference gets its mask per attention layer
through a forward pre-hook, which both honour as given.
"""

import contextlib
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unimm.integrations import transformers as hf  # noqa: E402
from unimm.kernels import AttentionMask  # noqa: E402
from unimm.kernels.masks import packed_documents  # noqa: E402
from unimm.testing import rel_err  # noqa: E402

VOCAB = 97
IMAGE = VOCAB - 1  # Gemma-3's image placeholder token
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)
CHAMELEON_IMAGE_TOKENS = list(range(VOCAB - 8, VOCAB))  # its VQ codes 0..7 as text tokens


def _config(family: str, **overrides):
    if family == "llama":
        config = transformers.LlamaConfig(**{**COMMON, **overrides})
    elif family == "qwen2":
        config = transformers.Qwen2Config(**{**COMMON, "head_dim": 32, "num_attention_heads": 2, **overrides})
    elif family == "qwen3":  # q/k RMSNorm
        config = transformers.Qwen3Config(**{**COMMON, **overrides})
    elif family == "gemma2":  # sliding layers (window 4 < the sequences), both soft-caps
        config = transformers.Gemma2Config(**{**COMMON, "sliding_window": 4, "attn_logit_softcapping": 2.0,
                                              "final_logit_softcapping": 3.0, **overrides})
    elif family == "gemma3":  # q/k RMSNorm, sliding then global layer, two RoPE bases, final soft-cap
        config = transformers.Gemma3TextConfig(**{**COMMON, "sliding_window": 4, "sliding_window_pattern": 2,
                                                  "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 16,
                                                  **overrides})
    elif family == "gemma3-vision":  # Gemma-3's language model under a tiny SigLIP: 4 tokens per image
        text = _config("gemma3", **{"sliding_window": 3, **overrides})
        vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=16, patch_size=4)
        vision._attn_implementation = "eager"
        config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                           image_token_index=IMAGE, boi_token_index=VOCAB - 3,
                                           eoi_token_index=VOCAB - 2)
    elif family == "chameleon":  # per-head q/k LayerNorm; a tiny VQ-VAE it does not use here
        vocabulary = {f"IMGIMG{chr(ord('A') + code)}Z": token for code, token in enumerate(CHAMELEON_IMAGE_TOKENS)}
        vq = dict(embed_dim=4, num_embeddings=8, latent_channels=4, resolution=16, base_channels=32,
                  channel_multiplier=[1], num_res_blocks=1, attn_resolutions=[])
        config = transformers.ChameleonConfig(**{**{k: v for k, v in COMMON.items() if k != "head_dim"},
                                                 "vocabulary_map": vocabulary, "vq_config": vq, **overrides})
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    return config


MODEL_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM",
                 "gemma3-vision": "Gemma3ForConditionalGeneration", "chameleon": "ChameleonForConditionalGeneration"}
FAMILIES = list(MODEL_CLASSES)


def _pair(family: str, seed: int = 0, **overrides):
    """(reference model, patched deep copy with the same weights), in train mode."""
    torch.manual_seed(seed)
    reference = getattr(transformers, MODEL_CLASSES[family])(_config(family, **overrides))
    with torch.no_grad():  # Gemma initialises its norms at 0 (scale 1 + w): make them matter
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    assert hf._decoder(reference.model).config._attn_implementation == "eager"
    return reference, hf.apply(copy.deepcopy(reference))


def _assert_same_step(reference, patched, **inputs):
    """One forward + backward of each: same loss, same gradient for every parameter (and no
    gradient where the reference has none, e.g. Chameleon's unused VQ-VAE)."""
    expected = reference(**inputs)
    actual = patched(**inputs)
    expected.loss.backward()
    actual.loss.backward()
    assert actual.logits is None
    assert rel_err(actual.loss, expected.loss) < 1e-5
    checked = 0
    for (name, want), got in zip(reference.named_parameters(), patched.parameters()):
        assert (got.grad is None) == (want.grad is None), name
        if want.grad is not None:
            assert rel_err(got.grad, want.grad) < 1e-5, name
            checked += 1
    assert checked


def _tokens(batch: int, seq_len: int, seed: int = 1, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, high, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _additive(visible: torch.Tensor) -> torch.Tensor:
    """The 4-D additive float mask transformers' eager attention takes for bool ``[B, S, K]``."""
    return torch.zeros(visible[:, None].shape).masked_fill(~visible[:, None], torch.finfo(torch.float32).min)


def _visible(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, S, K]`` from a 4-D mask transformers built (bool, or additive float)."""
    return mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] == 0


def _attention_modules(model):
    return [layer.self_attn for layer in hf._decoder(model.model).layers]


@contextlib.contextmanager
def _layer_masks(model, full: torch.Tensor, sliding: torch.Tensor | None = None):
    """Hands every attention module of ``model`` the 4-D mask of its layer type (``sliding``
    where the module has a window), whatever mask transformers built."""
    def hand(mask):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = mask
            return args, kwargs
        return hook
    handles = [module.register_forward_pre_hook(
        hand(sliding if sliding is not None and getattr(module, "sliding_window", None) else full), with_kwargs=True)
        for module in _attention_modules(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _transformers_masks(model):
    """Records the mask transformers hands each attention module of ``model``, in layer order."""
    seen = []
    handles = [module.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True)
        for module in _attention_modules(model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def unimm_masks(monkeypatch):
    """Records the AttentionMask of every unimm attention call, in call order."""
    seen = []
    original = hf.attention
    monkeypatch.setattr(hf, "attention", lambda q, k, v, mask, **kw: seen.append(mask) or original(q, k, v, mask, **kw))
    return seen


# ---- Gemma-3 inputs with images --------------------------------------------------------------

def _image_batch(seed: int = 1):
    """Two rows of 14 tokens: row 0 holds two images (4 tokens each) between text, row 1 is left
    padded (2) and holds one image. -> (input_ids, pixel_values [3 images], token_type_ids,
    padding mask, labels with images and padding ignored)."""
    ids = _tokens(2, 14, seed, high=VOCAB - 4) + 1  # text tokens avoid 0 (padding) and the specials
    image = torch.zeros(2, 14, dtype=torch.bool)
    image[0, 2:6] = image[0, 8:12] = image[1, 3:7] = True
    ids[image] = IMAGE
    padding = torch.ones(2, 14, dtype=torch.long)
    padding[1, :2] = 0
    ids[padding == 0] = 0
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = _padded_labels(ids, padding).masked_fill(image, -100)
    return ids, pixels, image.long(), padding, labels


def _padded_labels(ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """Labels where padded positions neither are targets nor predict them (their rows differ:
    unimm gives them 0, eager a uniform average)."""
    labels = ids.masked_fill(padding == 0, -100)
    labels[:, 1:].masked_fill_(padding[:, :-1] == 0, -100)
    return labels


# ---- loss, gradients, logits ----------------------------------------------------------------

@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3-vision"])
def test_loss_and_gradients_match(family, reference_backend):
    reference, patched = _pair(family)
    ids = _tokens(2, 11, high=VOCAB - 8)  # no Chameleon image token as a target
    labels = ids.clone()
    labels[0, 2:6] = -100
    labels[1, -1] = -100
    _assert_same_step(reference, patched, input_ids=ids, labels=labels)


def test_gemma3_with_images_loss_and_gradients_match(reference_backend):
    """Gemma-3 with a vision tower: images in the text, bidirectional within each image, left
    padding; every gradient down to the vision tower (which keeps its own attention)."""
    reference, patched = _pair("gemma3-vision")
    assert patched.config.vision_config._attn_implementation != hf.IMPLEMENTATION
    assert patched.model.vision_tower.config._attn_implementation != hf.IMPLEMENTATION
    ids, pixels, token_types, padding, labels = _image_batch()
    _assert_same_step(reference, patched, input_ids=ids, pixel_values=pixels, token_type_ids=token_types,
                      attention_mask=padding, labels=labels)


def test_chameleon_loss_leaves_out_image_tokens(reference_backend):
    """Chameleon's forward sets its image tokens' logits to the minimum before the loss: they
    weigh nothing in the softmax, with or without unimm."""
    reference, patched = _pair("chameleon")
    ids = _tokens(2, 9, high=VOCAB - 8)
    loss = patched(ids, labels=ids).loss
    with torch.no_grad():  # scaling up the image tokens' rows of the head changes nothing
        patched.lm_head.weight[CHAMELEON_IMAGE_TOKENS] *= 100
    assert rel_err(patched(ids, labels=ids).loss, loss) < 1e-6
    with torch.no_grad():
        patched.lm_head.weight.copy_(reference.lm_head.weight)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids)


def test_num_items_in_batch_and_shift_labels(reference_backend):
    """Trainer's loss keywords: sum / num_items_in_batch, and pre-shifted labels."""
    reference, patched = _pair("llama")
    ids = _tokens(2, 9)
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids, shift_labels=shifted,
                      num_items_in_batch=torch.tensor(7))


def test_positional_arguments_follow_the_models_signature(reference_backend):
    """Positional arguments mean what the installed forward says (Chameleon: pixel_values second)."""
    reference, patched = _pair("chameleon")
    ids = _tokens(2, 8, high=VOCAB - 8)
    padding = torch.ones(2, 8, dtype=torch.long)
    padding[1, :3] = 0
    labels = _padded_labels(ids, padding)
    expected = reference(ids, None, padding, labels=labels)
    actual = patched(ids, None, padding, labels=labels)
    assert rel_err(actual.loss, expected.loss) < 1e-5
    reference, patched = _pair("llama")
    expected = reference(ids, padding, labels=labels)
    actual = patched(ids, padding, labels=labels)
    assert rel_err(actual.loss, expected.loss) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_backend_trains_the_same(family, backend):
    reference, patched = _pair(family)
    ids = _tokens(1, 20)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids)


def test_chameleon_swin_norm(reference_backend):
    """Chameleon-7B's layout: layer norms after attention and MLP (swin_norm)."""
    reference, patched = _pair("chameleon", swin_norm=True)
    ids = _tokens(2, 9, high=VOCAB - 8)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "gemma3", "chameleon"])
def test_logits_without_labels_unchanged(family, reference_backend):
    reference, patched = _pair(family)
    ids = _tokens(2, 10)
    with torch.no_grad():
        expected, actual = reference(ids), patched(ids)
    assert actual.loss is None
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_autocast(reference_backend):
    """Under autocast the loss sees lm_head's autocast dtype, computes in fp32 (not autocast) and
    stays close to transformers' own loss under the same autocast."""
    reference, patched = _pair("llama")
    ids = _tokens(2, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(ids, labels=ids).loss
        actual = patched(ids, labels=ids).loss
    assert actual.dtype == torch.float32
    assert rel_err(actual, expected.float()) < 2e-2
    actual.backward()
    assert all(param.grad is not None for param in patched.parameters())


def test_return_dict_false_gives_the_loss_first(reference_backend):
    _, patched = _pair("llama")
    ids = _tokens(1, 6)
    output = patched(ids, labels=ids, return_dict=False)
    assert isinstance(output, tuple) and output[0].dim() == 0


# ---- masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefix_lm_mask(family, reference_backend):
    """An AttentionMask passed as attention_mask (prefix-LM) against eager with the same 4-D mask
    (Gemma-2's window made wider than the sequence)."""
    reference, patched = _pair(family, **({"sliding_window": 64} if family == "gemma2" else {}))
    ids = _tokens(2, 12)
    mask = AttentionMask.prefix_lm(torch.tensor([5, 12]), 12)
    with _layer_masks(reference, _additive(mask.to_dense(12))):
        expected = reference(ids, labels=ids)
        expected.loss.backward()
    actual = patched(ids, attention_mask=mask, labels=ids)
    actual.loss.backward()
    assert rel_err(actual.loss, expected.loss) < 1e-5
    for want, got in zip(reference.parameters(), patched.parameters()):
        assert rel_err(got.grad, want.grad) < 1e-5


def test_four_dimensional_masks(reference_backend):
    """A 4-D mask whose rows are key intervals (bool or additive) is taken as given; one whose
    rows are not, or that carries biases, is refused."""
    reference, patched = _pair("llama")
    ids = _tokens(2, 12)
    mask = AttentionMask.prefix_lm(torch.tensor([5, 12]), 12)
    dense = mask.to_dense(12)
    with torch.no_grad():
        with _layer_masks(reference, _additive(dense)):
            expected = reference(ids).logits
        for given in (dense[:, None], _additive(dense)):
            torch.testing.assert_close(patched(ids, attention_mask=given).logits, expected, rtol=1e-5, atol=1e-5)
        holes = dense.clone()
        holes[0, 8, 2] = holes[0, 8, 5] = False  # three runs: more than two key intervals
        with pytest.raises(ValueError, match="contiguous"):
            patched(ids, attention_mask=holes[:, None])
        sinks = AttentionMask.sinks_and_window(2, 12, sinks=2, window=3).to_dense(12)  # two runs per row
        with _layer_masks(reference, _additive(sinks)):
            expected = reference(ids).logits
        torch.testing.assert_close(patched(ids, attention_mask=sinks[:, None]).logits, expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="biases"):
            patched(ids, attention_mask=_additive(dense) + 0.5 * dense[:, None])


def test_packed_documents_with_bidirectional_spans(reference_backend):
    reference, patched = _pair("llama")
    ids = _tokens(1, 14)
    doc = torch.tensor([[0] * 6 + [1] * 6 + [-1] * 2])
    span = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 0, 0, 0]])
    mask = AttentionMask.from_spans(doc, span)
    labels = ids.masked_fill(doc < 0, -100)
    with torch.no_grad():
        with _layer_masks(reference, _additive(mask.to_dense(14))):
            expected = reference(ids).logits
        actual = patched(ids, attention_mask=mask).logits
    real = doc[0] >= 0  # padding rows see nothing: unimm gives 0 there, eager a uniform average
    torch.testing.assert_close(actual[:, real], expected[:, real], rtol=1e-5, atol=1e-5)
    assert patched(ids, attention_mask=mask, labels=labels).loss.isfinite()


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_under_a_prefix_mask(family, reference_backend):
    """Sliding layers intersect an AttentionMask with the window: against a hand-built 4-D mask
    per layer type (what transformers would need for the same pattern)."""
    reference, patched = _pair(family)  # window 4
    ids = _tokens(1, 9)
    dense = AttentionMask.prefix_lm(torch.tensor([6]), 9).to_dense(9)
    position = torch.arange(9)
    windowed = dense & (position[None, None, :] > position[None, :, None] - 4)
    with torch.no_grad():
        with _layer_masks(reference, _additive(dense), _additive(windowed)):
            expected = reference(ids).logits
        actual = patched(ids, attention_mask=AttentionMask.prefix_lm(torch.tensor([6]), 9)).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_two_dimensional_padding_mask(family, side, reference_backend):
    reference, patched = _pair(family)
    ids = _tokens(2, 10)
    padding = torch.ones(2, 10, dtype=torch.long)
    if side == "right":
        padding[1, 6:] = 0
    else:
        padding[1, :4] = 0
    labels = _padded_labels(ids, padding)
    with torch.no_grad():
        expected = reference(ids, attention_mask=padding).logits
        actual = patched(ids, attention_mask=padding).logits
    real = padding.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)
    _assert_same_step(reference, patched, input_ids=ids, attention_mask=padding, labels=labels)


def test_packed_sequences_from_position_ids(reference_backend):
    """position_ids that restart mark packed documents: each sees only itself (against eager
    under the block-diagonal causal mask; transformers itself does this only in some releases
    and code paths)."""
    reference, patched = _pair("llama")
    ids = _tokens(1, 12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    documents = packed_documents(position_ids)
    dense = AttentionMask.from_spans(documents, torch.zeros_like(documents)).to_dense(12)
    with _layer_masks(reference, _additive(dense)):
        _assert_same_step(reference, patched, input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False)


def test_gemma3_image_spans_equal_transformers_mask(reference_backend, unimm_masks):
    """token_type_ids: each run of image tokens is one bidirectional span (AttentionMask.from_spans)
    inside causal text, under the padding mask; on sliding layers the window cuts it on the
    left. Element for element the mask transformers builds itself, every layer, padding rows aside."""
    reference, patched = _pair("gemma3-vision")  # window 3 < the 4 tokens of an image
    ids, pixels, token_types, padding, _ = _image_batch()
    inputs = dict(input_ids=ids, pixel_values=pixels, token_type_ids=token_types, attention_mask=padding,
                  use_cache=False)
    with torch.no_grad(), _transformers_masks(reference) as theirs:
        expected = reference(**inputs).logits
    with torch.no_grad():
        actual = patched(**inputs).logits
    layers = reference.config.text_config.num_hidden_layers
    assert len(theirs) == len(unimm_masks) == layers
    real = padding.bool()
    spans = torch.where(token_types.bool(), torch.tensor([[0, 0, 1, 1, 1, 1, 0, 0, 2, 2, 2, 2, 0, 0],
                                                          [0, 0, 0, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 0]]), 0)
    from_spans = AttentionMask.from_spans(torch.zeros_like(spans), spans).to_dense(14) & real[:, None, :]
    windows = [module.sliding_window for module in _attention_modules(reference)]
    assert windows[0] == 3 and windows[1] is None
    for mine, want, window in zip(unimm_masks, theirs, windows):
        visible = _visible(want)[..., :14]
        assert torch.equal(mine.to_dense(14)[real], visible[real])
        position = torch.arange(14)
        in_window = position[None, :] > position[:, None] - (window or 14)
        assert torch.equal(mine.to_dense(14)[real], (from_spans & in_window)[real])
    assert not torch.equal(unimm_masks[0].to_dense(14), unimm_masks[1].to_dense(14))  # the window cut images
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)


def test_bad_masks_are_refused(reference_backend):
    _, patched = _pair("llama")
    ids = _tokens(2, 6)
    with pytest.raises(ValueError, match="contiguous"):
        patched(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="3-D"):
        patched(ids, attention_mask=torch.zeros(2, 6, 6))
    with pytest.raises(ValueError, match=r"\[2, 6\]"):
        patched(ids, attention_mask=AttentionMask.causal(1, 6))
    with pytest.raises(TypeError, match="attention_mask"):
        patched(ids, attention_mask=[[1] * 6] * 2)
    with pytest.raises(ValueError, match="per layer type"):
        patched(ids, attention_mask={"full_attention": torch.zeros(2, 1, 6, 6)})
    _, patched = _pair("gemma3-vision")
    ids, _, token_types, _, _ = _image_batch()
    ids[ids == IMAGE] = 1
    with pytest.raises(ValueError, match="token_type_ids must be"):
        patched(ids, token_type_ids=token_types[:, :5])
    with pytest.raises(ValueError, match="either an AttentionMask or token_type_ids"):
        patched(ids, token_type_ids=token_types, attention_mask=AttentionMask.causal(2, 14))


# ---- generation -----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gemma2", "gemma3", "qwen3", "chameleon"])
def test_generate_with_left_padding(family, reference_backend):
    """generate(): the KV caches each transformers picks (dynamic; 4.x: Gemma's hybrid cache with
    the 4-D masks it prepares), sliding layers keeping only recent keys (window 4 < 6 + 8)."""
    reference, patched = _pair(family)
    reference.eval()
    patched.eval()
    ids = _tokens(2, 6, high=VOCAB - 8)
    padding = torch.ones(2, 6, dtype=torch.long)
    padding[0, :2] = 0
    options = dict(attention_mask=padding, max_new_tokens=8, do_sample=False, output_logits=True,
                   return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(ids, **options)
        actual = patched.generate(ids, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    for got, want in zip(actual.logits, expected.logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gemma3_generate_with_images(reference_backend):
    """generate() on Gemma-3 with images and left padding: the prompt's image spans at prefill,
    then plain decoding steps."""
    reference, patched = _pair("gemma3-vision")
    reference.eval()
    patched.eval()
    ids, pixels, token_types, padding, _ = _image_batch()
    options = dict(pixel_values=pixels, token_type_ids=token_types, attention_mask=padding, max_new_tokens=6,
                   do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(ids, **options)
        actual = patched.generate(ids, **options)
    assert torch.equal(actual.sequences, expected.sequences)
    for got, want in zip(actual.logits, expected.logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- apply ----------------------------------------------------------------------------------

def test_apply_is_idempotent_and_attention_runs_once_per_layer(reference_backend, unimm_masks):
    reference, patched = _pair("llama")
    assert hf.apply(patched) is patched
    assert patched.config._attn_implementation == "unimm"
    ids = _tokens(1, 8)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids)
    assert len(unimm_masks) == patched.config.num_hidden_layers
    copied = copy.deepcopy(patched)  # a copy runs patched on its own weights
    assert copied.forward.__self__ is copied and copied.model.forward.__self__ is copied.model
    with torch.no_grad():
        copied.lm_head.weight.mul_(2)
        assert not torch.equal(copied(ids, labels=ids).loss, patched(ids, labels=ids).loss)
    assert len(unimm_masks) == 3 * patched.config.num_hidden_layers


def test_apply_rejects_unsupported_models():
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        hf.apply(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        hf.apply(gpt2)
    torch.manual_seed(0)
    odd_heads = transformers.LlamaForCausalLM(_config("llama", head_dim=20))
    with pytest.raises(ValueError, match="head_dim"):
        hf.apply(odd_heads)
    with pytest.raises(ValueError, match="attention_dropout"):
        hf.apply(transformers.LlamaForCausalLM(_config("llama", attention_dropout=0.1)))
    bidirectional = transformers.Gemma3ForCausalLM(_config("gemma3"))
    bidirectional.config.use_bidirectional_attention = True
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        hf.apply(bidirectional)


def test_logits_to_keep_with_labels_is_refused(reference_backend):
    _, patched = _pair("llama")
    ids = _tokens(1, 6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        patched(ids, labels=ids, logits_to_keep=1)
