"""The decoder's layers: rotary embeddings, norms, attention (through ``unimm.kernels``), the gated MLP,
and the block that places their norms per family. ``ForwardContext`` carries what every layer of
one forward shares (rotary tables, masks, where k/v go in the cache); ``Decoder`` builds it."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from unimm.kernels import AttentionMask, attention, decode_attention
from unimm.models.config import ACTIVATIONS, DecoderConfig
from unimm.models.hf_checkpoint import SLIDING
from unimm.models.kv_cache import KVCache


def rope_inv_freq(config: DecoderConfig, local: bool = False) -> torch.Tensor:
    """fp32 ``[head_dim / 2]`` rotary frequencies, with linear or llama3 scaling (as transformers);
    ``local``: the sliding layers' plain frequencies of base ``rope_local_theta``."""
    dim = config.head_dim
    theta = config.rope_local_theta if local else config.rope_theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None or local:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by factor, interpolate smoothly between
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rope_table(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(cos, sin) ``[B, S, 1, D / 2]`` in ``dtype`` for int positions ``[B, S]``."""
    angles = positions[..., None].float() * inv_freq
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout of Hugging Face checkpoints; x ``[B, S, H, D]``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@dataclasses.dataclass
class ForwardContext:
    """What every layer of one forward shares: rotary tables, masks and where k/v go in the cache."""

    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) [B, S, 1, D/2] in the model dtype
    local_rope: tuple[torch.Tensor, torch.Tensor]  # the sliding layers' (Gemma-3's local base); else rope
    mask: AttentionMask
    window_mask: AttentionMask | None
    cache: KVCache | None = None
    cache_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (batch rows, cache rows); None: [:, :S]
    decode_lens: torch.Tensor | None = None  # a causal one-token step: lens + 1, for decode_attention
    row_ok: torch.Tensor | None = None  # bool [B] when lens were not checked on the host: rows in range


class RMSNorm(nn.Module):
    """RMS norm in fp32. Llama / Qwen / Chameleon scale by ``w`` after casting back to the input
    dtype; Gemma (``unit_offset``) scales by ``1 + w`` in fp32, then casts (weights stored around 0)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (normed * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class HeadLayerNorm(nn.Module):
    """Chameleon's q / k norm: a LayerNorm over each head's ``head_dim`` (eps 1e-5) with its own
    scale and shift per head, ``weight`` and ``bias`` ``[heads, head_dim]``."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.bias = nn.Parameter(torch.zeros(heads, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, heads, head_dim]
        return F.layer_norm(x, x.shape[-1:], eps=1e-5) * self.weight + self.bias


def _head_norm(config: DecoderConfig, heads: int) -> nn.Module:
    if config.qk_norm == "rms":
        return RMSNorm(config.head_dim, config.rms_norm_eps, unit_offset=config.unit_offset_norms)
    return HeadLayerNorm(heads, config.head_dim) if config.qk_norm == "layer" else nn.Identity()


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.sliding = layer_idx, config.sliding[layer_idx]
        self.local_rope = config.layer_types[layer_idx] == SLIDING
        self.head_dim, self.scale, self.softcap = config.head_dim, config.query_scale, config.attn_softcap
        hidden = config.hidden_size
        q_width, kv_width = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, q_width, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_width, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_width, hidden, bias=config.output_bias)
        self.q_norm = _head_norm(config, config.num_heads)  # Identity unless config.qk_norm
        self.k_norm = _head_norm(config, config.num_kv_heads)

    def forward(self, x: torch.Tensor, step: ForwardContext) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        cos, sin = step.local_rope if self.local_rope else step.rope
        q = _rotate(self.q_norm(self.q_proj(x).view(batch, seq_len, -1, self.head_dim)), cos, sin)
        k = _rotate(self.k_norm(self.k_proj(x).view(batch, seq_len, -1, self.head_dim)), cos, sin)
        v = self.v_proj(x).view(batch, seq_len, -1, self.head_dim)
        if step.cache is not None:
            k_cache, v_cache = step.cache.k[self.layer_idx], step.cache.v[self.layer_idx]
            if step.cache_index is None:  # empty cache: store, then attend over the fresh keys only
                k_cache[:, :seq_len] = k
                v_cache[:, :seq_len] = v
            else:  # rows [lens[b], lens[b] + S): a scatter, no host sync
                if step.row_ok is not None:  # a row whose length is out of range rewrites what its slot holds
                    keep = step.row_ok[:, None, None, None]
                    k = torch.where(keep, k, k_cache[step.cache_index])
                    v = torch.where(keep, v, v_cache[step.cache_index])
                k_cache.index_put_(step.cache_index, k)
                v_cache.index_put_(step.cache_index, v)
                k, v = k_cache, v_cache
        if step.decode_lens is not None and not self.sliding:
            out = decode_attention(q[:, 0], k, v, step.decode_lens, scale=self.scale, softcap=self.softcap)[:, None]
        else:
            out = attention(q, k, v, step.window_mask if self.sliding else step.mask, scale=self.scale,
                            softcap=self.softcap)
        return self.o_proj(out.reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))`` (SwiGLU, or GeGLU for Gemma)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.activation]
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """One block; ``config.block`` places its norms: pre-norm (Llama, Qwen, Chameleon), sandwich
    norms (Gemma: each branch's input and output) or swin norms (Chameleon's swin_norm: each
    branch's output only; Hugging Face's names kept: ``input_layernorm`` follows attention)."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.block = config.block
        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=config.unit_offset_norms)
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()  # pre-norm: the MLP's pre-norm (Hugging Face's name)
        if self.block == "sandwich":
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(self, x: torch.Tensor, step: ForwardContext) -> torch.Tensor:
        if self.block == "pre":
            x = x + self.self_attn(self.input_layernorm(x), step)
            return x + self.mlp(self.post_attention_layernorm(x))
        if self.block == "swin":
            x = x + self.input_layernorm(self.self_attn(x, step))
            return x + self.post_attention_layernorm(self.mlp(x))
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), step))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
