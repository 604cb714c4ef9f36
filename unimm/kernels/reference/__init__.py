"""Plain-PyTorch meaning of every unimm kernel, one module per family.

Tests compare kernels against these; dispatch uses them as the CPU fallback.
"""

from unimm.kernels.reference import attention, cross_entropy, decode, sampling, vq

__all__ = ["attention", "cross_entropy", "decode", "sampling", "vq"]
