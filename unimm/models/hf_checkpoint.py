"""Hugging Face checkpoints for ``Decoder``: ``config.json`` to ``DecoderConfig`` fields, and
safetensors (single or sharded) to a state dict under the decoder's parameter names.

Served ``model_type``s: ``llama``, ``qwen2``, ``qwen3``, ``gemma2``, ``gemma3_text``,
``chameleon``, and ``gemma3`` (``Gemma3ForConditionalGeneration``: its ``text_config`` and its
language model's weights; the vision tower and projector are skipped, as is Chameleon's
VQ-VAE). Keys a ``config.json`` omits take transformers' class defaults.

A file that cannot be read raises a ValueError naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

# Hugging Face's layer-type names, used as is by DecoderConfig.layer_types
FULL, SLIDING = "full_attention", "sliding_attention"
ROPE_KEYS = {"linear": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}

# model_type -> Decoder family
FAMILY_OF = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "gemma3_text": "gemma3",
             "chameleon": "chameleon"}
_GEMMA3_TEXT = dict(  # Gemma3TextConfig's defaults: Hub configs of the multimodal models omit most keys
    vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
    rms_norm_eps=1e-6, max_position_embeddings=131_072, query_pre_attn_scalar=256, sliding_window=4096,
    sliding_window_pattern=6, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, final_logit_softcapping=None,
    attn_logit_softcapping=None)
# Hugging Face's class defaults, for keys a config.json may omit (an explicit null is kept)
_HF_DEFAULTS = {
    "llama": dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=2048),
    "qwen2": dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  max_window_layers=28),
    "qwen3": dict(hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  max_window_layers=28, head_dim=128),
    "gemma2": dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, rms_norm_eps=1e-6,
                   max_position_embeddings=8192, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": _GEMMA3_TEXT,
    "chameleon": dict(vocab_size=65536, hidden_act="silu", tie_word_embeddings=False, rms_norm_eps=1e-5,
                      max_position_embeddings=4096, swin_norm=False),
}
GEMMA3_IMAGE_TOKEN = 262_144  # Gemma3Config.image_token_index's default

# checkpoint key prefixes, longest first: a causal LM's "model.", a multimodal wrapper's language model
_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
_SKIPPED = ("vision_tower.", "multi_modal_projector.", "vqmodel.")  # encoders a multimodal checkpoint holds too


def decoder_fields(hf: dict) -> dict:
    """``DecoderConfig`` keyword arguments for a Hugging Face config dict (``config.json``'s
    content or ``PretrainedConfig.to_dict()``). Reads both the transformers 5 ``rope_parameters``
    and the older ``rope_theta`` / ``rope_scaling`` / ``rope_local_base_freq`` layouts."""
    model_type = hf.get("model_type")
    image_token_id = tie = None
    wrapped = model_type == "gemma3"
    if wrapped:  # Gemma3ForConditionalGeneration: the language model's config
        text = hf.get("text_config") or {}
        if not isinstance(text, dict):
            raise ValueError(f"gemma3 text_config must be a dict, got {type(text).__name__}")
        image_token_id = hf.get("image_token_index", GEMMA3_IMAGE_TOKEN)
        tie = hf.get("tie_word_embeddings")
        hf, model_type = {**text, "model_type": "gemma3_text"}, "gemma3_text"
    if model_type not in FAMILY_OF:
        raise ValueError(f"unsupported model_type {model_type!r}; Decoder serves {sorted(FAMILY_OF)} and gemma3")
    family = FAMILY_OF[model_type]
    cfg = {**_HF_DEFAULTS[model_type], **hf}
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if cfg.get(key) is None:
            raise ValueError(f"hf_config lacks {key!r}")
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention (an encoder) is not supported")
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    gemma, qwen = family in ("gemma2", "gemma3"), family in ("qwen2", "qwen3")
    window = cfg.get("sliding_window") if not qwen or cfg.get("use_sliding_window") else None
    bias = bool(cfg.get("attention_bias", family == "qwen2"))
    theta, scaling, local_theta = _rope_from_hf(cfg)
    if family == "chameleon":
        image_token_id, image_code_ids = chameleon_image_vocabulary(cfg.get("vocabulary_map") or {})
    else:
        image_code_ids = ()
    return dict(
        family=family, vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"], num_layers=layers, num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta, rms_norm_eps=cfg["rms_norm_eps"],
        tie_word_embeddings=bool(cfg["tie_word_embeddings"] if tie is None else tie),
        attention_bias=bias, output_bias=bias and family != "qwen2", mlp_bias=bool(cfg.get("mlp_bias", False)),
        activation=(cfg.get("hidden_activation") if gemma else None) or cfg["hidden_act"],
        embed_scale=cfg["hidden_size"] ** 0.5 if gemma else None,
        # as transformers: Gemma-3 never applies attn_logit_softcapping, its multimodal wrapper
        # not final_logit_softcapping either (both null in Google's configs)
        attn_softcap=cfg.get("attn_logit_softcapping") if family == "gemma2" else None,
        final_softcap=cfg.get("final_logit_softcapping") if gemma and not wrapped else None,
        sliding_window=window, layer_types=tuple(cfg.get("layer_types") or _layer_types(family, cfg, window)),
        query_scale=cfg["query_pre_attn_scalar"] ** -0.5 if gemma else None,
        swin_norm=bool(cfg.get("swin_norm")) if family == "chameleon" else False,
        image_token_id=image_token_id, image_code_ids=image_code_ids,
        max_position_embeddings=cfg["max_position_embeddings"], initializer_range=cfg.get("initializer_range", 0.02),
    )


def _layer_types(family: str, cfg: dict, window: int | None) -> list[str]:
    """Layer types of configs written before transformers had ``layer_types``."""
    layers = cfg["num_hidden_layers"]
    if family == "gemma2":  # alternating, local first
        return [SLIDING if i % 2 == 0 else FULL for i in range(layers)]
    if family == "gemma3":  # 5 local : 1 global
        pattern = cfg.get("sliding_window_pattern") or 6
        return [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
    first = cfg.get("max_window_layers", layers) if window is not None else layers
    return [SLIDING if i >= first else FULL for i in range(layers)]


def _rope_from_hf(cfg: dict) -> tuple[float, dict | None, float | None]:
    """(theta, scaling, local theta): full layers' base and scaling; sliding layers' own base
    (Gemma-3's ``rope_local_base_freq``, plain RoPE) or None when they share the full layers'."""
    params = dict(cfg.get("rope_parameters") or {})
    local_theta = cfg.get("rope_local_base_freq")
    if FULL in params or SLIDING in params:  # per layer type (transformers 5 Gemma-3)
        local = dict(params.get(SLIDING) or {})
        if local.get("rope_type", "default") != "default":
            raise ValueError(f"sliding layers' rope_type must be 'default', got {local['rope_type']!r}")
        local_theta = local.get("rope_theta", local_theta)
        params = dict(params.get(FULL) or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(f"rope_parameters per layer type must be keyed {FULL!r} / {SLIDING!r}, got {sorted(params)}")
    params.update(cfg.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0)
    kind = params.pop("rope_type", params.pop("type", "default"))
    if kind not in ("default", *ROPE_KEYS):
        raise ValueError(f"rope_type {kind!r} is not supported (default, {', '.join(ROPE_KEYS)})")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    local_theta = None if local_theta is None else float(local_theta)
    if kind == "default":
        return theta, None, local_theta
    if kind == "llama3":
        params.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
    return theta, {"rope_type": kind, **{key: params[key] for key in ROPE_KEYS[kind] if key in params}}, local_theta


def chameleon_image_vocabulary(vocabulary_map: dict) -> tuple[int | None, tuple[int, ...]]:
    """(``<image>`` placeholder id, vocabulary id of each VQ code) from Chameleon's
    ``vocabulary_map``, as transformers' ``ChameleonImageVocabularyMapping``: image tokens are
    named ``IMGIMG`` + the code's decimal digits written as letters ``A``-``J`` + one final
    character (code 10 is ``IMGIMGBAZ``); ``ids[c]`` is the token of code ``c``."""
    if not isinstance(vocabulary_map, dict):
        raise ValueError(f"vocabulary_map must be a dict of token name to id, got {type(vocabulary_map).__name__}")
    digits = str.maketrans("ABCDEFGHIJ", "0123456789")
    codes = {}
    for name, token in vocabulary_map.items():
        if isinstance(name, str) and name.startswith("IMGIMG"):
            code = name[len("IMGIMG"):-1].translate(digits)
            if not code.isdigit() or not isinstance(token, int):
                raise ValueError(f"vocabulary_map entry {name!r}: {token!r} is not an image code token")
            codes[int(code)] = token
    if sorted(codes) != list(range(len(codes))):
        raise ValueError(f"vocabulary_map's image codes must be 0..{len(codes) - 1}, got {len(codes)} codes up to "
                         f"{max(codes)}")
    return vocabulary_map.get("<image>"), tuple(codes[c] for c in range(len(codes)))


# ---- files ------------------------------------------------------------------------------------

def read_json(file: str, what: str) -> dict:
    """A JSON object from ``file``; ValueError naming the file when it is not one."""
    try:
        with open(file, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): a corrupt {what}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{file} must hold a JSON object (a {what}), got a JSON {type(content).__name__}")
    return content


def read_config(path: str) -> dict:
    """``path/config.json`` as a dict."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: path must be a Hugging Face checkpoint directory")
    return read_json(config_file, "Hugging Face config")


def decoder_name(key: str) -> str | None:
    """The decoder's name for checkpoint tensor ``key``; None for tensors it does not hold (the
    vision tower, projector, VQ-VAE, cached rotary frequencies)."""
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    return None if key.startswith(_SKIPPED) or key.endswith("rotary_emb.inv_freq") else key


def weight_files(path: str) -> list[str]:
    """The safetensors files of checkpoint ``path``: the shards ``model.safetensors.index.json``
    names, or ``model.safetensors``."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_file):
        index = read_json(index_file, "safetensors index")
        if "weight_map" not in index:
            raise ValueError(f"{index_file} has no 'weight_map' (tensor name -> shard file); keys: {sorted(index)}")
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(shard, str) and shard for shard in weight_map.values()):
            raise ValueError(f"{index_file}: 'weight_map' must be a non-empty object of tensor name -> shard file "
                             f"name, got {str(weight_map)[:200]}")
        files = [os.path.join(path, shard) for shard in sorted(set(weight_map.values()))]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{file} not found: {index_file} names it in its weight_map")
        return files
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def read_state(path: str, dtype: torch.dtype | None, device: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the decoder's names (``decoder_name``), read one at a time onto
    ``device`` and cast to ``dtype`` there, so at most one tensor exists twice."""
    state = {}
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device=device) as f:
                for key in f.keys():
                    name = decoder_name(key)
                    if name is not None:
                        tensor = f.get_tensor(key)
                        state[name] = tensor if dtype is None else tensor.to(dtype)
        except SafetensorError as err:
            raise ValueError(f"{file} is not a readable safetensors file: {err}") from None
    return state
