"""unimm: Triton and CUDA kernels for unified multimodal autoregressive models."""

__version__ = "0.1.0"  # the single source: pyproject.toml reads it from here
