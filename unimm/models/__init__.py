"""unimm's thin model layer: modules built on ``unimm.kernels``."""

from unimm.models.heads import DiffusionHead
from unimm.models.quantizer import QuantizerOutput, VectorQuantizer

__all__ = ["DiffusionHead", "QuantizerOutput", "VectorQuantizer"]
