"""Decoder: parity with Hugging Face Llama / Qwen2 / Qwen3 / Gemma-2 / Gemma-3 (text and
multimodal) / Chameleon (pre-norm and swin-norm) in fp32 on eager attention, config parsing, masks,
positions, loss, KV-cache prefill / extend / decode against the full forward, greedy generation
against transformers' ``generate``, and errors that name the checkpoint file at fault.

Tiny random models; most tests force the reference backend (the Triton interpreter is slow),
one runs the default dispatch. Runs on transformers 4.52+ and 5.x: test configs use the
``rope_theta`` / ``rope_scaling`` keywords both accept.
"""

import copy
import dataclasses
import json
import random
import re
import shutil

import pytest
import torch
import torch.nn.functional as F
from packaging.version import Version

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from unimm.kernels import AttentionMask  # noqa: E402
from unimm.models import Decoder, DecoderConfig, KVCache  # noqa: E402
from unimm.models.layers import rope_inv_freq  # noqa: E402
from unimm.testing import rel_err, seeded  # noqa: E402

VOCAB = 97
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
# Gemma-3: window 4 < the sequences, layers local, local, global, local (sliding_window_pattern 3), the
# global layers' RoPE linearly scaled, the local layers' on their own base
GEMMA3 = dict(**COMMON, num_hidden_layers=4, head_dim=32, sliding_window=4, sliding_window_pattern=3,
              query_pre_attn_scalar=24, rope_theta=10000.0, rope_local_base_freq=100.0,
              rope_scaling=dict(rope_type="linear", factor=8.0))
IMAGE_CODES = 16  # Chameleon's image codes: ids 10 .. 25, code c is token 10 + c


def image_code_name(code: int) -> str:
    """Chameleon's token name of VQ code ``code``: its digits as letters A-J, between IMGIMG and Z."""
    return "IMGIMG" + "".join("ABCDEFGHIJ"[int(d)] for d in str(code)) + "Z"


VOCABULARY_MAP = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 3, "<racm3:break>": 4, "<eoss>": 5,
                  **{image_code_name(c): 10 + c for c in range(IMAGE_CODES)}}
TINY_VQ = dict(embed_dim=4, num_embeddings=IMAGE_CODES, latent_channels=4, resolution=32, base_channels=32,
               channel_multiplier=[1], num_res_blocks=1, attn_resolutions=[])
# checkpoint name -> family Decoder reports
FAMILY = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3",
          "gemma3_mm": "gemma3", "chameleon": "chameleon", "chameleon_swin": "chameleon"}
TIED = {"qwen2", "qwen3", "gemma2", "gemma3", "gemma3_mm"}
# transformers takes a per-layer-type mask dict (Gemma's sliding layers) from 4.53 on
MASK_DICTS = Version(transformers.__version__) >= Version("4.53")


def hf_configs() -> dict:
    """checkpoint name -> (transformers model class, config)."""
    siglip = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=4)
    chameleon = dict(**COMMON, num_hidden_layers=2, vocabulary_map=VOCABULARY_MAP, vq_config=TINY_VQ)
    causal = transformers.AutoModelForCausalLM
    return {
        "llama": (causal, transformers.LlamaConfig(**COMMON, num_hidden_layers=2, head_dim=16,
                                                   max_position_embeddings=64, rope_theta=10000.0,
                                                   rope_scaling=dict(LLAMA3))),
        "qwen2": (causal, transformers.Qwen2Config(**COMMON, num_hidden_layers=2, tie_word_embeddings=True)),
        "qwen3": (causal, transformers.Qwen3Config(**COMMON, num_hidden_layers=2, head_dim=16,
                                                   tie_word_embeddings=True, rope_theta=1e6)),
        "gemma2": (causal, transformers.Gemma2Config(**COMMON, num_hidden_layers=3, head_dim=32, sliding_window=4,
                                                     query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                                                     final_logit_softcapping=5.0)),
        "gemma3": (causal, transformers.Gemma3TextConfig(**GEMMA3, final_logit_softcapping=5.0)),
        "gemma3_mm": (transformers.Gemma3ForConditionalGeneration, transformers.Gemma3Config(
            text_config=transformers.Gemma3TextConfig(**GEMMA3), vision_config=siglip, mm_tokens_per_image=4,
            image_token_index=96, boi_token_index=94, eoi_token_index=95)),
        "chameleon": (transformers.ChameleonForConditionalGeneration, transformers.ChameleonConfig(**chameleon)),
        "chameleon_swin": (transformers.ChameleonForConditionalGeneration,
                           transformers.ChameleonConfig(**chameleon, swin_norm=True)),
    }


def hf_logits(hf, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Hugging Face's logits, before Chameleon's masking of the image codes (``lm_head`` of the
    final hidden states; the other families' ``.logits``)."""
    if isinstance(hf, transformers.ChameleonForConditionalGeneration):
        return hf.lm_head(hf.model(ids, **kwargs).last_hidden_state)
    return hf(ids, **kwargs).logits


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """name -> (Hugging Face model, checkpoint dir); Llama is saved in shards."""
    out = {}
    torch.manual_seed(0)
    for name, (model_class, config) in hf_configs().items():
        config._attn_implementation = "eager"
        model = model_class.from_config(config) if model_class is transformers.AutoModelForCausalLM \
            else model_class(config)
        model = model.float().eval()
        with torch.no_grad():  # norm weights random too, so Gemma's (1 + w) matters
            for param_name, param in model.named_parameters():
                param.normal_(0.0, 0.3 if "norm" in param_name else 0.1)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, max_shard_size="20KB" if name == "llama" else "1GB")
        out[name] = model, path
    return out


pytestmark = pytest.mark.usefixtures("reference_backend")


def load(checkpoints, name, **kwargs) -> tuple:
    model, path = checkpoints[name]
    return model, Decoder.from_pretrained(path, **kwargs)


def random_ids(batch, seq_len, seed=0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=seeded(seed))


# ---- parity with Hugging Face ---------------------------------------------------------------

@pytest.mark.parametrize("name", list(FAMILY))
def test_logits_match_hugging_face(checkpoints, name):
    hf, decoder = load(checkpoints, name)
    path = checkpoints[name][1]
    assert (path / "model.safetensors.index.json").exists() == (name == "llama")
    assert decoder.config.family == FAMILY[name]
    tied = name in TIED
    assert decoder.config.tie_word_embeddings == tied
    assert (decoder.lm_head.weight is decoder.embed_tokens.weight) == tied
    assert decoder.embed_tokens.weight.dtype == torch.float32
    ids = random_ids(2, 13)
    with torch.no_grad():
        assert rel_err(decoder.logits(decoder(ids)), hf_logits(hf, ids)) <= 1e-4


def test_family_structure(checkpoints):
    """What each family's config turns on: q/k norms, norm placement, local RoPE, soft-caps."""
    configs = {name: load(checkpoints, name)[1].config for name in FAMILY}
    assert {name: c.qk_norm for name, c in configs.items()} == dict(
        llama=None, qwen2=None, qwen3="rms", gemma2=None, gemma3="rms", gemma3_mm="rms", chameleon="layer",
        chameleon_swin="layer")
    assert {name: c.block for name, c in configs.items()} == dict(
        llama="pre", qwen2="pre", qwen3="pre", gemma2="sandwich", gemma3="sandwich", gemma3_mm="sandwich",
        chameleon="pre", chameleon_swin="swin")
    gemma3 = configs["gemma3"]
    assert gemma3.sliding == (True, True, False, True) and gemma3.rope_local_theta == 100.0
    assert gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0} and gemma3.query_scale == 24**-0.5
    # transformers' Gemma-3 applies no attention soft-cap; its multimodal wrapper no final one either
    assert (gemma3.attn_softcap, gemma3.final_softcap) == (None, 5.0)
    assert configs["gemma3_mm"].final_softcap is None and configs["gemma3_mm"].image_token_id == 96
    assert not configs["qwen3"].attention_bias and configs["qwen3"].rope_theta == 1e6
    assert configs["chameleon"].rms_norm_eps == 1e-5


def test_chameleon_image_vocabulary(checkpoints):
    """image_code_ids[c] is the token of VQ code c, as transformers' vocabulary mapping has it;
    Hugging Face's logits are ours with the image codes set to the dtype's minimum."""
    hf, decoder = load(checkpoints, "chameleon")
    config, mapping = decoder.config, hf.model.vocabulary_mapping
    assert config.image_token_id == mapping.image_token_id == 3
    assert dict(enumerate(config.image_code_ids)) == mapping.img2bpe
    assert sorted(config.image_code_ids) == mapping.image_tokens
    assert config.image_code_range == (10, 10 + IMAGE_CODES)
    ids = random_ids(2, 9)
    with torch.no_grad():
        ours = decoder.logits(decoder(ids))
        ours[..., list(config.image_code_ids)] = torch.finfo(ours.dtype).min
        expected = hf(ids).logits
        assert torch.equal(expected[..., 10:26], ours[..., 10:26])
        assert rel_err(ours[..., 26:], expected[..., 26:]) <= 1e-4

    from transformers.models.chameleon.modeling_chameleon import ChameleonImageVocabularyMapping
    names = [image_code_name(c) for c in range(120)]  # three-digit codes, scattered ids
    ids = random.Random(0).sample(range(200), len(names))
    shuffled = {"<image>": 250, **dict(zip(names, ids))}
    config = DecoderConfig.from_hf({**hf_configs()["chameleon"][1].to_dict(), "vocab_size": 256,
                                    "vocabulary_map": shuffled})
    assert dict(enumerate(config.image_code_ids)) == ChameleonImageVocabularyMapping(shuffled).img2bpe
    assert config.image_code_range is None and config.image_token_id == 250
    with pytest.raises(ValueError, match="image codes must be 0..1"):
        DecoderConfig.from_hf({**hf_configs()["chameleon"][1].to_dict(), "vocabulary_map": {
            image_code_name(0): 10, image_code_name(5): 11}})


def test_multimodal_gemma3_loads_either_checkpoint_naming(checkpoints, tmp_path):
    """Gemma-3's multimodal checkpoints name the language model ``language_model.model.*`` (the
    Hub's) or ``model.language_model.*`` (transformers 4.52+): both load the same weights."""
    _, decoder = load(checkpoints, "gemma3_mm")
    path = checkpoints["gemma3_mm"][1]
    state = load_file(path / "model.safetensors")
    hub = any(key.startswith("language_model.model.") for key in state)
    swaps = [("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
             ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]

    def renamed(key: str) -> str:
        for old, new in swaps:
            old, new = (old, new) if hub else (new, old)
            if key.startswith(old):
                return new + key[len(old):]
        return key
    save_file({renamed(key): t for key, t in state.items()}, tmp_path / "model.safetensors")
    shutil.copy(path / "config.json", tmp_path / "config.json")
    other = Decoder.from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(decoder.state_dict().values(), other.state_dict().values()))


def test_bf16_load_matches_hugging_face_in_bf16(checkpoints):
    hf, decoder = load(checkpoints, "gemma2", dtype=torch.bfloat16)
    assert {p.dtype for p in decoder.parameters()} == {torch.bfloat16}
    assert torch.equal(decoder.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))
    ids = random_ids(2, 13)
    with torch.no_grad():
        expected = copy.deepcopy(hf).to(torch.bfloat16)(ids).logits
        assert rel_err(decoder.logits(decoder(ids)), expected) <= 2e-2


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_positions_match_hugging_face(checkpoints, name):
    hf, decoder = load(checkpoints, name)
    ids = random_ids(2, 9)
    positions = torch.arange(9).expand(2, 9) + torch.tensor([[3], [20]])  # past the llama3 original context
    with torch.no_grad():
        expected = hf(ids, position_ids=positions).logits
        assert rel_err(decoder.logits(decoder(ids, positions=positions)), expected) <= 1e-4
        assert torch.equal(decoder(ids, positions=torch.arange(9).expand(2, 9)), decoder(ids))


@pytest.mark.parametrize("name", ["llama", "gemma2", "gemma3", "chameleon_swin"])
def test_prefix_lm_mask_matches_hugging_face_4d_mask(checkpoints, name):
    hf, decoder = load(checkpoints, name)
    ids, seq_len = random_ids(2, 13), 13
    mask = AttentionMask.prefix_lm(torch.tensor([6, 9]), seq_len)
    visible = mask.to_dense(seq_len)
    rows, keys = torch.arange(seq_len)[:, None], torch.arange(seq_len)[None, :]

    def additive(seen: torch.Tensor) -> torch.Tensor:
        return torch.zeros(seen.shape).masked_fill(~seen, torch.finfo(torch.float32).min)[:, None]
    hf_mask = additive(visible)
    if name.startswith("gemma") and MASK_DICTS:  # Hugging Face's sliding window: keys j > i - window
        hf_mask = {"full_attention": hf_mask, "sliding_attention": additive(visible & (keys > rows - 4))}
    with torch.no_grad():
        ours = decoder.logits(decoder(ids, mask=mask))
        assert rel_err(ours, hf_logits(hf, ids, attention_mask=hf_mask)) <= 1e-4
        assert rel_err(ours, decoder.logits(decoder(ids))) > 1e-3  # the mask mattered


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gemma3"])
def test_greedy_generate_matches_hugging_face(checkpoints, name):
    """Cached greedy decoding (``Decoder.generate``) gives transformers' greedy ``generate``."""
    hf, decoder = load(checkpoints, name)
    ids = random_ids(2, 6, seed=4)
    stop = 7
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                               eos_token_id=stop, pad_token_id=0)
    assert torch.equal(decoder.generate(ids, 8, stop_tokens=stop, pad_id=0), expected)


def test_config_from_old_style_dicts(checkpoints):
    llama = json.loads((checkpoints["llama"][1] / "config.json").read_text())
    old = {k: v for k, v in llama.items() if k != "rope_parameters"}
    old.update(rope_theta=10000.0, rope_scaling=dict(LLAMA3))
    new = {k: v for k, v in llama.items() if k not in ("rope_theta", "rope_scaling")}
    new.update(rope_parameters=dict(LLAMA3, rope_theta=10000.0))
    assert DecoderConfig.from_hf(old) == DecoderConfig.from_hf(new) == DecoderConfig.from_hf(llama) \
        == DecoderConfig.from_hf(hf_configs()["llama"][1])

    gemma = hf_configs()["gemma2"][1].to_dict()
    gemma.pop("layer_types", None)  # absent before transformers 4.53
    config = DecoderConfig.from_hf(gemma)
    assert config.sliding == (True, False, True) and config.embed_scale == 8.0 and config.query_scale == 24**-0.5

    qwen = transformers.Qwen2Config(**COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=5,
                                    max_window_layers=1)
    assert DecoderConfig.from_hf(qwen).sliding == (False, True, True)
    assert DecoderConfig.from_hf(hf_configs()["qwen2"][1]).attention_bias

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for scaling in (dict(LLAMA3), dict(rope_type="linear", factor=4.0)):
        hf_config = transformers.LlamaConfig(**COMMON, num_hidden_layers=1, head_dim=32, rope_theta=500.0,
                                             rope_scaling=scaling)
        expected, _ = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config, None)  # (config, device)
        assert torch.equal(rope_inv_freq(DecoderConfig.from_hf(hf_config)), expected)


def test_gemma3_config_layouts(checkpoints):
    """Gemma-3 read from transformers 5's per-layer-type ``rope_parameters`` + ``layer_types``,
    from the older ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` +
    ``sliding_window_pattern``, and from the Hub's sparse multimodal config.json (class defaults)."""
    saved = json.loads((checkpoints["gemma3"][1] / "config.json").read_text())
    old = {k: v for k, v in saved.items() if k not in ("rope_parameters", "layer_types")}
    old.update({key: GEMMA3[key] for key in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                             "sliding_window_pattern")})
    new = {k: v for k, v in saved.items() if k not in ("rope_theta", "rope_local_base_freq", "rope_scaling",
                                                       "sliding_window_pattern")}
    new.update(rope_parameters={"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=10000.0),
                                "sliding_attention": dict(rope_type="default", rope_theta=100.0)},
               layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])
    assert DecoderConfig.from_hf(old) == DecoderConfig.from_hf(new) == DecoderConfig.from_hf(saved)
    assert torch.equal(rope_inv_freq(DecoderConfig.from_hf(new), local=True),
                       1.0 / 100.0 ** (torch.arange(0, 32, 2).float() / 32))

    # google/gemma-3-4b-it's config.json names a handful of keys and leaves the rest to the defaults
    hub = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
           "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                           "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                           "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_hidden_layers": 27,
                             "num_attention_heads": 16, "intermediate_size": 4304, "image_size": 896,
                             "patch_size": 14, "vision_use_head": False}}
    config = DecoderConfig.from_hf(hub)
    assert config == DecoderConfig.from_hf(transformers.Gemma3Config(**{k: v for k, v in hub.items()
                                                                        if k != "model_type"}))
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (8, 4, 256, 262208)
    assert (config.rope_theta, config.rope_local_theta, config.query_scale) == (1e6, 1e4, 256**-0.5)
    assert config.sliding == tuple((i + 1) % 6 != 0 for i in range(34))  # 5 local : 1 global
    assert config.image_token_id == 262144 and config.tie_word_embeddings


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

@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2", "gemma3", "chameleon", "chameleon_swin"])
def test_ragged_prefill_then_decode_matches_full_forward(checkpoints, name):
    _, decoder = load(checkpoints, name)
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
        Decoder.from_config({**hf_configs()["llama"][1].to_dict(), "rope_scaling": None,
                             "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="sliding layers' rope_type must be 'default'"):
        Decoder.from_config({**hf_configs()["gemma3"][1].to_dict(), "rope_parameters": {
            "full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "linear", "factor": 2.0}}})
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Decoder.from_config({**hf_configs()["gemma3"][1].to_dict(), "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="swin_norm is Chameleon's"):
        DecoderConfig(**{**dataclasses.asdict(decoder.config), "swin_norm": True})
    with pytest.raises(ValueError, match=r"image_token_id and image_code_ids must be distinct ids in \[0, 97\)"):
        DecoderConfig(**{**dataclasses.asdict(decoder.config), "image_code_ids": (5, 97)})


# ---- checkpoint files ---------------------------------------------------------------------------

def broken_copy(checkpoints, tmp_path, name="llama"):
    """A copy of checkpoint ``name`` to break one file of."""
    shutil.copytree(checkpoints[name][1], tmp_path / "ckpt")
    return tmp_path / "ckpt"


def raises_naming(file, what: str):
    """pytest.raises(ValueError) whose message names ``file`` and says ``what``."""
    return pytest.raises(ValueError, match=re.escape(str(file)) + ".*" + what)


def test_corrupt_config_json_names_the_file(checkpoints, tmp_path):
    path = broken_copy(checkpoints, tmp_path)
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config)[:-20])  # cut short
    with raises_naming(config_file, "is not valid JSON"):
        Decoder.from_pretrained(path)
    config_file.write_bytes(b"\xff\xfe{")
    with raises_naming(config_file, "is not valid JSON"):
        Decoder.from_pretrained(path)
    config_file.write_text("[1, 2]")
    with raises_naming(config_file, "must hold a JSON object"):
        Decoder.from_pretrained(path)
    config_file.write_text(json.dumps({**config, "model_type": "gpt2"}))
    with raises_naming(config_file, "unsupported model_type 'gpt2'"):
        Decoder.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Decoder.from_pretrained(tmp_path)


def test_bad_safetensors_header_names_the_file(checkpoints, tmp_path):
    path = broken_copy(checkpoints, tmp_path, "qwen3")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes((2**40).to_bytes(8, "little") + data[8:])  # header length past the file's end
    with raises_naming(weights, "is not a readable safetensors file"):
        Decoder.from_pretrained(path)
    header_len = int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:8] + b"{not json" + data[17:8 + header_len] + data[8 + header_len:])
    with raises_naming(weights, "is not a readable safetensors file"):
        Decoder.from_pretrained(path)
    weights.write_bytes(data[:len(data) // 2])  # truncated: the header names bytes the file lacks
    with raises_naming(weights, "is not a readable safetensors file"):
        Decoder.from_pretrained(path)
    weights.write_bytes(b"")
    with raises_naming(weights, "is not a readable safetensors file"):
        Decoder.from_pretrained(path)


def test_bad_safetensors_index_names_the_file(checkpoints, tmp_path):
    path = broken_copy(checkpoints, tmp_path)
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({"metadata": index["metadata"]}))
    with raises_naming(index_file, "has no 'weight_map'"):
        Decoder.from_pretrained(path)
    index_file.write_text(json.dumps({**index, "weight_map": ["model-00001.safetensors"]}))
    with raises_naming(index_file, "'weight_map' must be a non-empty object"):
        Decoder.from_pretrained(path)
    index_file.write_text("{")
    with raises_naming(index_file, "is not valid JSON"):
        Decoder.from_pretrained(path)
    shard = sorted(set(index["weight_map"].values()))[-1]
    index_file.write_text(json.dumps(index))
    (path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(path / shard)) + ".*names it"):
        Decoder.from_pretrained(path)


def test_checkpoint_that_does_not_fit_its_config(checkpoints, tmp_path):
    path = broken_copy(checkpoints, tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        Decoder.from_pretrained(path)
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ValueError, match=r"does not match its config.json: layers.0.mlp.gate_proj.weight \[96, 64\] "
                                         r"\(config: \[80, 64\]\)"):
        Decoder.from_pretrained(path)


def test_from_config_builds_a_random_model():
    decoder = Decoder.from_config(hf_configs()["gemma2"][1])
    assert decoder.lm_head.weight is decoder.embed_tokens.weight
    assert len(decoder.layers) == 3 and decoder.layers[0].self_attn.sliding and not decoder.layers[1].self_attn.sliding
    swin = Decoder.from_config(hf_configs()["chameleon_swin"][1])
    assert swin.layers[0].self_attn.q_norm.weight.shape == (4, 16) and swin.layers[0].block == "swin"
    with torch.no_grad():
        assert decoder(random_ids(1, 4)).shape == (1, 4, 64)
        assert swin(random_ids(1, 4)).shape == (1, 4, 64)
