"""``DecoderConfig``: everything a ``Decoder`` needs, read from a Hugging Face config by ``from_hf``.

The supported families (Llama, Qwen2 / Qwen3, Gemma-2 / Gemma-3, Chameleon) differ only in the
data held here; ``unimm.models.decoder`` lists what each one sets.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F

from unimm.models import hf_checkpoint
from unimm.models.hf_checkpoint import FULL, ROPE_KEYS, SLIDING

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "chameleon")
ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclasses.dataclass
class DecoderConfig:
    """Everything the decoder needs; ``from_hf`` reads it from a Hugging Face config."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...}; None: plain RoPE
    rope_local_theta: float | None = None  # sliding layers' own (plain) RoPE base; None: as full layers
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v
    output_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False
    activation: str = "silu"
    embed_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # FULL / SLIDING per layer; empty: all full
    query_scale: float | None = None  # score scale; None: head_dim ** -0.5
    swin_norm: bool = False  # Chameleon: norm the attention and MLP outputs instead of their inputs
    image_token_id: int | None = None  # the prompt's image placeholder (Chameleon's <image>, Gemma-3's)
    image_code_ids: tuple[int, ...] = dataclasses.field(default=(), repr=False)  # [c]: vocabulary id of VQ code c
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        self.layer_types = tuple(self.layer_types) or (FULL,) * self.num_layers
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {FULL, SLIDING}:
            raise ValueError(f"layer_types must be {self.num_layers} entries of {FULL!r} / {SLIDING!r}, "
                             f"got {self.layer_types}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be an int >= 1 or None, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type")
            if kind not in ROPE_KEYS or any(key not in self.rope_scaling for key in ROPE_KEYS[kind]):
                raise ValueError(f"rope_scaling must be None or a 'linear' / 'llama3' dict with keys "
                                 f"{ROPE_KEYS}, got {self.rope_scaling}")
        if self.swin_norm and self.family != "chameleon":
            raise ValueError(f"swin_norm is Chameleon's; family is {self.family!r}")
        self.image_code_ids = tuple(self.image_code_ids)
        ids = [*self.image_code_ids, *([] if self.image_token_id is None else [self.image_token_id])]
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids) or \
                len(set(self.image_code_ids)) != len(self.image_code_ids):
            raise ValueError(f"image_token_id and image_code_ids must be distinct ids in [0, {self.vocab_size})")
        if self.query_scale is None:
            self.query_scale = self.head_dim**-0.5

    @property
    def sliding(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window?"""
        return tuple(kind == SLIDING and self.sliding_window is not None for kind in self.layer_types)

    @property
    def unit_offset_norms(self) -> bool:
        """Gemma's RMSNorms scale by ``1 + w`` in fp32 (weights stored around 0)."""
        return self.family in ("gemma2", "gemma3")

    @property
    def qk_norm(self) -> str | None:
        """The norm over each q and k head before RoPE: "rms" (Qwen3, Gemma-3), "layer"
        (Chameleon's per-head LayerNorm) or None."""
        return {"qwen3": "rms", "gemma3": "rms", "chameleon": "layer"}.get(self.family)

    @property
    def block(self) -> str:
        """Where a layer's norms sit: "pre" (``x + f(norm(x))``), "sandwich" (Gemma:
        ``x + norm(f(norm(x)))``) or "swin" (Chameleon's swin_norm: ``x + norm(f(x))``)."""
        return "sandwich" if self.unit_offset_norms else "swin" if self.swin_norm else "pre"

    @property
    def image_code_range(self) -> tuple[int, int] | None:
        """``(lo, hi)`` when the image codes are the consecutive ids ``lo + c`` (as in Chameleon's
        vocabulary): the ``vocab_range`` of ``generate`` / ``loss`` for image tokens; else None."""
        ids = self.image_code_ids
        if not ids or ids != tuple(range(ids[0], ids[0] + len(ids))):
            return None
        return ids[0], ids[0] + len(ids)

    @classmethod
    def from_hf(cls, hf_config) -> DecoderConfig:
        """From a ``config.json`` dict or a transformers ``PretrainedConfig`` (duck-typed:
        anything with ``to_dict()``); ``unimm.models.hf_checkpoint.decoder_fields`` reads it."""
        if isinstance(hf_config, dict):
            cfg = dict(hf_config)
        elif callable(getattr(hf_config, "to_dict", None)):
            cfg = hf_config.to_dict()
        else:
            raise TypeError(f"hf_config must be a dict or a PretrainedConfig, got {type(hf_config).__name__}")
        return cls(**hf_checkpoint.decoder_fields(cfg))
