"""Put unimm's kernels into models from other libraries.

``unimm.integrations.transformers.apply(model)``: a Hugging Face Llama / Qwen2 / Qwen3 / Gemma-2 /
Gemma-3 (text, or with its vision tower) / Chameleon model trains through
``linear_cross_entropy`` and ``attention`` (interval masks); transformers 4.52.1 to 5.24.0
tested. Each integration lives in its own module and imports its library only when used, so
``import unimm`` never needs them.
"""
