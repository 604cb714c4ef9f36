"""Decoder: parity with Hugging Face Llama / Qwen2 / Gemma-2 (eager attention, fp32), masks,
positions, loss, and KV-cache prefill / extend / decode against the full forward.

Tiny random models; most tests force the reference backend (the Triton interpreter is slow),
one runs the default dispatch.
"""

import copy
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import seeded

transformers = pytest.importorskip("transformers")

from unimm.kernels import AttentionMask  # noqa: E402
from unimm.models import Decoder, DecoderConfig, KVCache  # noqa: E402
from unimm.models.decoder import rope_inv_freq  # noqa: E402

VOCAB = 97
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def hf_configs() -> dict:
    return {
        "llama": transformers.LlamaConfig(**COMMON, num_hidden_layers=2, head_dim=16, max_position_embeddings=64,
                                          rope_parameters=dict(LLAMA3)),
        "qwen2": transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True),
        "gemma2": transformers.Gemma2Config(**COMMON, num_hidden_layers=3, head_dim=32, sliding_window=4,
                                            query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                                            final_logit_softcapping=5.0),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """family -> (Hugging Face model, checkpoint dir); Llama is saved in shards, Qwen2 / Gemma-2 tied."""
    out = {}
    torch.manual_seed(0)
    for family, config in hf_configs().items():
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager",
                                                              dtype=torch.float32).eval()
        with torch.no_grad():  # norm weights random too, so Gemma's (1 + w) matters
            for name, param in model.named_parameters():
                param.normal_(0.0, 0.3 if "norm" in name else 0.1)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(path, max_shard_size="20KB" if family == "llama" else "1GB")
        out[family] = model, path
    return out


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setenv("UNIMM_BACKEND", "reference")


pytestmark = pytest.mark.usefixtures("reference_backend")


def load(checkpoints, family, **kwargs) -> tuple:
    model, path = checkpoints[family]
    return model, Decoder.from_pretrained(path, **kwargs)


def random_ids(batch, seq_len, seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=seeded(seed))


# ---- parity with Hugging Face ---------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])
def test_logits_match_hugging_face(checkpoints, family):
    hf, decoder = load(checkpoints, family)
    path = checkpoints[family][1]
    assert (path / "model.safetensors.index.json").exists() == (family == "llama")
    tied = family != "llama"
    assert decoder.config.tie_word_embeddings == tied
    assert (decoder.lm_head.weight is decoder.embed_tokens.weight) == tied
    assert decoder.embed_tokens.weight.dtype == torch.float32
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = hf(ids).logits
        assert rel_err(decoder.logits(decoder(ids)), expected) <= 1e-4


def test_bf16_load_matches_hugging_face_in_bf16(checkpoints):
    hf, decoder = load(checkpoints, "gemma2", dtype=torch.bfloat16)
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    assert torch.equal(decoder.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = copy.deepcopy(hf).to(torch.bfloat16)(ids).logits
        assert rel_err(decoder.logits(decoder(ids)), expected) <= 2e-2


def test_positions_match_hugging_face(checkpoints):
    hf, decoder = load(checkpoints, "llama")
    ids = random_ids(2, 9)
    positions = torch.arange(9).expand(2, 9) + torch.tensor([[3], [20]])  # past the llama3 original context
    with torch.no_grad():
        assert rel_err(decoder.logits(decoder(ids, positions=positions)), hf(ids, position_ids=positions).logits) <= 1e-4
        assert torch.equal(decoder(ids, positions=torch.arange(9).expand(2, 9)), decoder(ids))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefix_lm_mask_matches_hugging_face_4d_mask(checkpoints, family):
    hf, decoder = load(checkpoints, family)
    ids, seq_len = random_ids(2, 13), 13
    mask = AttentionMask.prefix_lm(torch.tensor([6, 9]), seq_len)
    visible = mask.to_dense(seq_len)
    rows, keys = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]
    additive = lambda seen: torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)[:, None]  # noqa: E731
    hf_mask = additive(visible)
    if family == "gemma2":  # Hugging Face's sliding window: keys j > i - window, on top of the mask
        hf_mask = {"full_attention": hf_mask, "sliding_attention": additive(visible & (keys > rows - 4))}
    with torch.no_grad():
        ours = decoder.logits(decoder(ids, mask=mask))
        assert rel_err(ours, hf(ids, attention_mask=hf_mask).logits) <= 1e-4
        assert rel_err(ours, decoder.logits(decoder(ids))) > 1e-3  # the mask mattered


def test_config_from_old_style_dicts(checkpoints):
    llama = json.loads((checkpoints["llama"][1] / "config.json").read_text())
    old = {k: v for k, v in llama.items() if k != "rope_parameters"}
    old.update(rope_theta=10000.0, rope_scaling={k: v for k, v in LLAMA3.items() if k != "rope_theta"})
    assert DecoderConfig.from_hf(old) == DecoderConfig.from_hf(llama) == DecoderConfig.from_hf(hf_configs()["llama"])

    gemma = hf_configs()["gemma2"].to_dict()
    del gemma["layer_types"]
    config = DecoderConfig.from_hf(gemma)
    assert config.sliding == (True, False, True) and config.embed_scale == 8.0 and config.query_scale == 24**-0.5

    qwen = transformers.Qwen2Config(**COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1)
    assert DecoderConfig.from_hf(qwen).sliding == (False, True, True)
    assert DecoderConfig.from_hf(hf_configs()["qwen2"]).attention_bias

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for scaling in (dict(LLAMA3), dict(rope_type="linear", rope_theta=500.0, factor=4.0)):
        hf_config = transformers.LlamaConfig(**COMMON, num_hidden_layers=1, head_dim=32, rope_parameters=scaling)
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config)
        assert torch.equal(rope_inv_freq(DecoderConfig.from_hf(hf_config)), expected)


# ---- inputs, loss, dispatch -----------------------------------------------------------------

def test_inputs_embeds_equal_input_ids(checkpoints):
    _, decoder = load(checkpoints, "gemma2")
    ids = random_ids(2, 11)
    with torch.no_grad():
        assert torch.equal(decoder(inputs_embeds=decoder.embed_tokens(ids)), decoder(input_ids=ids))


def test_loss_matches_cross_entropy_on_logits(checkpoints):
    _, decoder = load(checkpoints, "gemma2")
    ids = random_ids(2, 10)
    targets = random_ids(2, 10, seed=1)
    targets[0, :3] = -100
    weights = torch.rand(2, 10, generator=seeded(2))
    hidden = decoder(ids).detach().requires_grad_()
    logits = decoder.logits(hidden).flatten(0, 1)
    flat = targets.flatten()
    loss = decoder.loss(hidden, targets)
    expected = F.cross_entropy(logits, flat)
    assert rel_err(loss, expected) <= 1e-5
    (grad,) = torch.autograd.grad(loss, hidden)
    (expected_grad,) = torch.autograd.grad(expected, hidden)
    assert rel_err(grad, expected_grad) <= 1e-4

    per_token = decoder.loss(hidden, targets, reduction="none", token_weights=weights)
    assert per_token.shape == (2, 10)
    expected = F.cross_entropy(logits, flat, reduction="none").view(2, 10) * weights
    assert rel_err(per_token, expected) <= 1e-5

    in_range = targets.clamp(40, 79)
    sliced = decoder.loss(hidden, in_range, vocab_range=(40, 80))
    assert rel_err(sliced, F.cross_entropy(logits[:, 40:80], in_range.flatten() - 40)) <= 1e-5


def test_default_dispatch_matches_reference(checkpoints, monkeypatch):
    _, decoder = load(checkpoints, "gemma2")
    ids = random_ids(1, 13)
    targets = random_ids(1, 13, seed=1)
    with torch.no_grad():
        expected = decoder(ids)
        expected_loss = decoder.loss(expected, targets)
        monkeypatch.delenv("UNIMM_BACKEND")
        hidden = decoder(ids)
        assert rel_err(hidden, expected) <= 1e-4
        assert rel_err(decoder.loss(hidden, targets), expected_loss) <= 1e-4
        cache = KVCache(decoder.config, 1, 16, device="cpu", dtype=torch.float32)
        decoder(ids[:, :12], cache=cache)
        cache.lens += 12
        assert rel_err(decoder(ids[:, 12:], cache=cache), expected[:, 12:]) <= 1e-4


# ---- KV cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_ragged_prefill_then_decode_matches_full_forward(checkpoints, family):
    _, decoder = load(checkpoints, family)
    seqs = random_ids(2, 13)
    prompt_lens = [5, 9]
    with torch.no_grad():
        full = decoder(seqs)
        cache = KVCache(decoder.config, 2, 16, device="cpu", dtype=torch.float32)
        prompt = seqs[:, :9].clone()
        prompt[0, 5:] = random_ids(1, 4, seed=3)  # padding: later decode steps must overwrite its cache rows
        hidden = decoder(prompt, cache=cache)
        for b, n in enumerate(prompt_lens):
            assert rel_err(hidden[b, :n], full[b, :n]) <= 1e-5
        cache.lens.copy_(torch.tensor(prompt_lens))
        for _ in range(4):
            lens = cache.lens.clone()
            tokens = seqs.gather(1, lens.long()[:, None])
            hidden = decoder(tokens, cache=cache)
            assert torch.equal(cache.lens, lens)  # the caller advances lens
            assert rel_err(hidden[:, 0], full[torch.arange(2), lens.long()]) <= 1e-5
            cache.lens += 1


def test_extend_with_chunk_mask_matches_full_forward(checkpoints):
    """Ragged prefill, then a 4-token chunk whose first 2 tokens are bidirectional (a prefix-LM
    mask in chunk coordinates), then decode: each row equals one full forward with the same mask."""
    _, decoder = load(checkpoints, "gemma2")
    seqs = random_ids(2, 12)
    prompt_lens, chunk, steps = torch.tensor([5, 3]), 4, 3
    with torch.no_grad():
        cache = KVCache(decoder.config, 2, 12, device="cpu", dtype=torch.float32)
        decoder(seqs[:, :5], cache=cache)
        cache.lens.copy_(prompt_lens)
        index = prompt_lens[:, None] + torch.arange(chunk)
        chunk_hidden = decoder(seqs.gather(1, index), mask=AttentionMask.prefix_lm(torch.tensor([2, 2]), chunk),
                               cache=cache)
        cache.lens += chunk
        decoded = []
        for _ in range(steps):
            decoded.append(decoder(seqs.gather(1, cache.lens.long()[:, None]), cache=cache))
            cache.lens += 1
        decoded = torch.cat(decoded, dim=1)
        for b, p in enumerate(prompt_lens.tolist()):
            n = p + chunk + steps
            end = torch.arange(1, n + 1)
            end[p:p + 2] = p + 2
            full = decoder(seqs[b:b + 1, :n], mask=AttentionMask.from_intervals(torch.zeros_like(end)[None], end[None]))
            assert rel_err(chunk_hidden[b], full[0, p:p + chunk]) <= 1e-5
            assert rel_err(decoded[b], full[0, p + chunk:]) <= 1e-5


def test_cache_errors(checkpoints):
    _, decoder = load(checkpoints, "llama")
    cache = KVCache(decoder.config, 2, 8, device="cpu", dtype=torch.float32)
    cache.lens.fill_(3)
    with pytest.raises(ValueError, match="cache overflow"):
        decoder(random_ids(2, 6), cache=cache)
    with pytest.raises(ValueError, match="cache must hold"):
        decoder(random_ids(3, 2), cache=cache)
    with pytest.raises(ValueError, match="cache must be"):
        decoder(random_ids(2, 2), cache=KVCache(decoder.config, 2, 8, device="cpu", dtype=torch.float64))
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        decoder(random_ids(2, 2), cache={})
    with pytest.raises(ValueError, match="max_len"):
        KVCache(decoder.config, 2, 0, device="cpu", dtype=torch.float32)


# ---- argument errors --------------------------------------------------------------------------

def test_bad_inputs_raise(checkpoints, tmp_path):
    _, decoder = load(checkpoints, "llama")
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="exactly one"):
        decoder()
    with pytest.raises(ValueError, match="exactly one"):
        decoder(ids, inputs_embeds=decoder.embed_tokens(ids))
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 97\)"):
        decoder(ids + VOCAB)
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        decoder(ids.float())
    with pytest.raises(TypeError, match="inputs_embeds must be"):
        decoder(inputs_embeds=decoder.embed_tokens(ids).double())
    with pytest.raises(ValueError, match="mask must be"):
        decoder(ids, mask=AttentionMask.causal(2, 4))
    with pytest.raises(TypeError, match="mask must be an AttentionMask"):
        decoder(ids, mask=torch.ones(2, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="positions must be"):
        decoder(ids, positions=torch.arange(5))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        Decoder.from_config({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        Decoder.from_config({**hf_configs()["llama"].to_dict(), "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(FileNotFoundError, match="config.json"):
        Decoder.from_pretrained(tmp_path)
    shutil.copytree(checkpoints["llama"][1], tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        Decoder.from_pretrained(tmp_path / "bad")


def test_from_config_builds_a_random_model():
    decoder = Decoder.from_config(hf_configs()["gemma2"])
    assert decoder.lm_head.weight is decoder.embed_tokens.weight
    assert len(decoder.layers) == 3 and decoder.layers[0].self_attn.sliding and not decoder.layers[1].self_attn.sliding
    with torch.no_grad():
        assert decoder(random_ids(1, 4)).shape == (1, 4, 64)
