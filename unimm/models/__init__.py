"""unimm's thin model layer: modules built on ``unimm.kernels``."""

from unimm.models.config import DecoderConfig
from unimm.models.decoder import Decoder
from unimm.models.generation import ImageSpec
from unimm.models.heads import DiffusionHead, FeatureProjector, RegressionHead
from unimm.models.kv_cache import KVCache
from unimm.models.quantizer import QuantizerOutput, VectorQuantizer
from unimm.models.sequence import (
    Batch,
    ContinuousImage,
    DiscreteImage,
    Features,
    HybridImage,
    Text,
    document_length,
    pack,
)
from unimm.models.unified import UnifiedModel
from unimm.models.vocab import Head, ImageFormat, VocabLayout

__all__ = ["Batch", "ContinuousImage", "Decoder", "DecoderConfig", "DiffusionHead", "DiscreteImage",
           "FeatureProjector", "Features", "Head", "HybridImage", "ImageFormat", "ImageSpec", "KVCache",
           "QuantizerOutput", "RegressionHead", "Text", "UnifiedModel", "VectorQuantizer", "VocabLayout",
           "document_length", "pack"]
