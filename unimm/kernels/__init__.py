"""unimm's public kernels: drop-in functions over torch tensors.

Each call checks its arguments, then runs on the backend ``unimm.kernels.dispatch`` chooses
(CUDA, Triton, or the plain-PyTorch reference in ``unimm.kernels.reference``).
"""

from unimm.kernels.attention import attention
from unimm.kernels.cross_entropy import linear_cross_entropy
from unimm.kernels.decode import decode_attention
from unimm.kernels.dispatch import BackendUnavailable
from unimm.kernels.masks import AttentionMask
from unimm.kernels.sampling import sample_tokens
from unimm.kernels.vq import vq_lookup, vq_quantize

__all__ = ["AttentionMask", "BackendUnavailable", "attention", "decode_attention", "linear_cross_entropy",
           "sample_tokens", "vq_lookup", "vq_quantize"]
