"""unimm's thin model layer: modules built on ``unimm.kernels``."""

from unimm.models.decoder import Decoder, DecoderConfig, KVCache
from unimm.models.generate import ImageSpec
from unimm.models.heads import DiffusionHead, FeatureProjector, RegressionHead
from unimm.models.quantizer import QuantizerOutput, VectorQuantizer
from unimm.models.sequence import (
    Batch, ContinuousImage, DiscreteImage, Features, Head, HybridImage, ImageFormat, Text, VocabLayout, pack,
)
from unimm.models.unified import UnifiedModel

__all__ = ["Batch", "ContinuousImage", "Decoder", "DecoderConfig", "DiffusionHead", "DiscreteImage",
           "FeatureProjector", "Features", "Head", "HybridImage", "ImageFormat", "ImageSpec", "KVCache", "pack",
           "QuantizerOutput", "RegressionHead", "Text", "UnifiedModel", "VectorQuantizer", "VocabLayout"]
