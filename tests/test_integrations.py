"""unimm.integrations.transformers.apply: a patched Hugging Face model computes what the original
does (loss, every gradient, logits, generation), through unimm's attention and fused loss.

Tiny random Llama / Qwen2 / Gemma-2 models in fp32 on the CPU; the reference is the same model,
unpatched, on transformers' eager attention. Most tests force UNIMM_BACKEND=reference for speed;
one runs every live backend (Triton through its interpreter here).
"""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from unimm.integrations import transformers as hf  # noqa: E402
from unimm.kernels import AttentionMask  # noqa: E402

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)


def _config(family: str, **overrides):
    if family == "llama":
        config = transformers.LlamaConfig(**{**COMMON, **overrides})
    elif family == "qwen2":
        config = transformers.Qwen2Config(**{**COMMON, "head_dim": 32, "num_attention_heads": 2, **overrides})
    else:  # Gemma-2: sliding layers (window 4 < the sequences), both soft-caps
        config = transformers.Gemma2Config(**{**COMMON, "sliding_window": 4, "attn_logit_softcapping": 2.0,
                                              "final_logit_softcapping": 3.0, **overrides})
    config._attn_implementation = "eager"
    return config


def _pair(family: str, seed: int = 0, **overrides):
    """(reference model, patched deep copy with the same weights), in train mode."""
    torch.manual_seed(seed)
    model_class = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                   "gemma2": transformers.Gemma2ForCausalLM}[family]
    reference = model_class(_config(family, **overrides))
    with torch.no_grad():  # Gemma-2 initialises its norms at 0 (scale 1 + w): make them matter
        for name, param in reference.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    return reference, hf.apply(copy.deepcopy(reference))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _assert_same_step(reference, patched, **inputs):
    """One forward + backward of each: same loss, same gradient for every parameter."""
    expected = reference(**inputs)
    actual = patched(**inputs)
    expected.loss.backward()
    actual.loss.backward()
    assert actual.logits is None
    assert _rel(actual.loss, expected.loss) < 1e-5
    for (name, want), got in zip(reference.named_parameters(), patched.parameters()):
        assert got.grad is not None, name
        assert _rel(got.grad, want.grad) < 1e-5, name


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("UNIMM_BACKEND", "reference")


def _tokens(batch: int, seq_len: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# ---- loss, gradients, logits ----------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_loss_and_gradients_match(family, reference_backend):
    reference, patched = _pair(family)
    ids = _tokens(2, 11)
    labels = ids.clone()
    labels[0, 2:6] = -100
    labels[1, -1] = -100
    _assert_same_step(reference, patched, input_ids=ids, labels=labels)


def test_num_items_in_batch_and_shift_labels(reference_backend):
    """Trainer's loss keywords: sum / num_items_in_batch, and pre-shifted labels."""
    reference, patched = _pair("llama")
    ids = _tokens(2, 9)
    shifted = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids, shift_labels=shifted,
                      num_items_in_batch=torch.tensor(7))


def test_every_backend_trains_the_same(backend):
    reference, patched = _pair("llama")
    ids = _tokens(1, 20)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
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
    assert _rel(actual, expected.float()) < 2e-2
    actual.backward()
    assert all(param.grad is not None for param in patched.parameters())


def test_return_dict_false_gives_the_loss_first(reference_backend):
    _, patched = _pair("llama")
    ids = _tokens(1, 6)
    output = patched(ids, labels=ids, return_dict=False)
    assert isinstance(output, tuple) and output[0].dim() == 0


# ---- masks ----------------------------------------------------------------------------------

def _additive(mask: AttentionMask, num_keys: int) -> torch.Tensor:
    """The 4-D additive float mask transformers' eager attention takes for the same pattern."""
    visible = mask.to_dense(num_keys)[:, None]
    return torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefix_lm_mask(family, reference_backend):
    """An AttentionMask passed as attention_mask (prefix-LM) against eager with the same 4-D mask
    (Gemma-2's window made wider than the sequence: transformers ignores it for 4-D masks)."""
    reference, patched = _pair(family, **({"sliding_window": 64} if family == "gemma2" else {}))
    ids = _tokens(2, 12)
    mask = AttentionMask.prefix_lm(torch.tensor([5, 12]), 12)
    expected = reference(ids, attention_mask=_additive(mask, 12), labels=ids)
    actual = patched(ids, attention_mask=mask, labels=ids)
    expected.loss.backward()
    actual.loss.backward()
    assert _rel(actual.loss, expected.loss) < 1e-5
    for want, got in zip(reference.parameters(), patched.parameters()):
        assert _rel(got.grad, want.grad) < 1e-5


def test_packed_documents_with_bidirectional_spans(reference_backend):
    reference, patched = _pair("llama")
    ids = _tokens(1, 14)
    doc = torch.tensor([[0] * 6 + [1] * 6 + [-1] * 2])
    span = torch.tensor([[0, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 0, 0, 0]])
    mask = AttentionMask.from_spans(doc, span)
    labels = ids.masked_fill(doc < 0, -100)
    with torch.no_grad():
        expected = reference(ids, attention_mask=_additive(mask, 14)).logits
        actual = patched(ids, attention_mask=mask).logits
    real = doc[0] >= 0  # padding rows see nothing: unimm gives 0 there, eager a uniform average
    torch.testing.assert_close(actual[:, real], expected[:, real], rtol=1e-5, atol=1e-5)
    assert patched(ids, attention_mask=mask, labels=labels).loss.isfinite()


def test_gemma2_sliding_window_under_a_prefix_mask(reference_backend):
    """Sliding layers intersect an AttentionMask with the window: against a hand-built 4-D mask
    per layer type (what transformers would need for the same pattern)."""
    reference, patched = _pair("gemma2")  # window 4
    ids = _tokens(1, 9)
    mask = AttentionMask.prefix_lm(torch.tensor([6]), 9)
    dense = mask.to_dense(9)
    position = torch.arange(9)
    windowed = dense & (position[None, None, :] > position[None, :, None] - 4)
    full = torch.zeros(1, 1, 9, 9).masked_fill(~dense[:, None], torch.finfo(torch.float32).min)
    sliding = torch.zeros(1, 1, 9, 9).masked_fill(~windowed[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        expected = reference(ids, attention_mask={"full_attention": full, "sliding_attention": sliding}).logits
        actual = patched(ids, attention_mask=mask).logits
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_two_dimensional_padding_mask(side, reference_backend):
    reference, patched = _pair("qwen2")
    ids = _tokens(2, 10)
    padding = torch.ones(2, 10, dtype=torch.long)
    if side == "right":
        padding[1, 6:] = 0
    else:
        padding[1, :4] = 0
    # padded positions neither are targets nor predict them (their rows differ: unimm gives them 0)
    labels = ids.masked_fill(padding == 0, -100)
    labels[:, 1:].masked_fill_(padding[:, :-1] == 0, -100)
    with torch.no_grad():
        expected = reference(ids, attention_mask=padding).logits
        actual = patched(ids, attention_mask=padding).logits
    real = padding.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-5, atol=1e-5)
    _assert_same_step(reference, patched, input_ids=ids, attention_mask=padding, labels=labels)


def test_packed_sequences_from_position_ids(reference_backend):
    """position_ids that restart mark packed documents, as transformers detects them."""
    reference, patched = _pair("llama")
    ids = _tokens(1, 12)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]])
    _assert_same_step(reference, patched, input_ids=ids, position_ids=position_ids, labels=ids, use_cache=False)


def test_generate_with_sliding_window_cache_and_left_padding(reference_backend):
    """generate(): dynamic KV caches, Gemma-2's sliding layers keeping only recent keys."""
    reference, patched = _pair("gemma2")
    reference.eval()
    patched.eval()
    ids = _tokens(2, 6)
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


# ---- apply ----------------------------------------------------------------------------------

def test_apply_is_idempotent_and_attention_runs_once_per_layer(reference_backend, monkeypatch):
    reference, patched = _pair("llama")
    assert hf.apply(patched) is patched
    assert patched.config._attn_implementation == "unimm"
    calls = []
    original = hf.attention
    monkeypatch.setattr(hf, "attention", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    ids = _tokens(1, 8)
    _assert_same_step(reference, patched, input_ids=ids, labels=ids)
    assert len(calls) == patched.config.num_hidden_layers


def test_apply_rejects_unsupported_models():
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        hf.apply(torch.nn.Linear(2, 2))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        hf.apply(gpt2)
    torch.manual_seed(0)
    odd_heads = transformers.LlamaForCausalLM(_config("llama", head_dim=24))
    with pytest.raises(ValueError, match="head_dim"):
        hf.apply(odd_heads)
    with pytest.raises(ValueError, match="attention_dropout"):
        hf.apply(transformers.LlamaForCausalLM(_config("llama", attention_dropout=0.1)))


def test_bad_masks_are_refused(reference_backend):
    _, patched = _pair("llama")
    ids = _tokens(2, 6)
    with pytest.raises(ValueError, match="contiguous"):
        patched(ids, attention_mask=torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6]))
    with pytest.raises(ValueError, match="4-D"):
        patched(ids, attention_mask=torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match=r"\[2, 6\]"):
        patched(ids, attention_mask=AttentionMask.causal(1, 6))
    with pytest.raises(TypeError, match="attention_mask"):
        patched(ids, attention_mask=[[1] * 6] * 2)


def test_logits_to_keep_with_labels_is_refused(reference_backend):
    _, patched = _pair("llama")
    ids = _tokens(1, 6)
    with pytest.raises(ValueError, match="logits_to_keep"):
        patched(ids, labels=ids, logits_to_keep=1)
