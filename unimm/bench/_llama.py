"""The Llama-3 backbones the model-level families (``generate``, ``train_step``) time, described
once as a transformers config so that unimm's ``Decoder`` and the transformers anchor are the same
model, weight for weight.

transformers is imported where a model is built: it is the ``bench`` extra, which the kernel
families do not need.
"""

from __future__ import annotations

import torch

LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)


def llama_config(shape: dict, vocab: int, **options):
    """A transformers ``LlamaConfig`` for ``shape`` (hidden, intermediate, layers, heads, kv_heads,
    head_dim) and ``vocab`` entries: Llama-3's RoPE (base 500k, llama3 scaling) and norm epsilon,
    tied embeddings; ``options`` are further config fields."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), **options)


def llama_for_causal_lm(config, dtype: torch.dtype, device: torch.device):
    """transformers' ``LlamaForCausalLM`` for ``config``, built in ``dtype`` on ``device`` as
    ``from_pretrained`` builds it: ``.to(dtype)`` afterwards would round RoPE's fp32 inv_freq too."""
    import transformers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
