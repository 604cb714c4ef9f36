"""Generation for ``Decoder`` and ``UnifiedModel``, one module per job:

- ``spec``: ``ImageSpec``, what a generated image looks like and how it is sampled;
- ``planning``: prompts packed one per row as in training, the default unconditional prompt, the
  token plan of a generated image;
- ``engine``: prefill into a static KV cache, then the decode loop (a CUDA graph on a GPU);
- ``api``: ``generate_ids`` and ``generate_segments``, the functions ``Decoder.generate`` and
  ``UnifiedModel.generate`` forward to, and the decoding of what the engine produced.
"""

from unimm.models.generation.api import generate_ids, generate_segments
from unimm.models.generation.planning import unconditional_prompt
from unimm.models.generation.spec import IMAGE_KINDS, ImageSpec

__all__ = ["IMAGE_KINDS", "ImageSpec", "generate_ids", "generate_segments", "unconditional_prompt"]
