"""Put unimm's kernels into models from other libraries.

``unimm.integrations.transformers.apply(model)``: a Hugging Face Llama / Qwen2 / Gemma-2 causal
LM trains through ``linear_cross_entropy`` and ``attention`` (interval masks). Each integration
lives in its own module and imports its library only when used, so ``import unimm`` never needs
them.
"""
