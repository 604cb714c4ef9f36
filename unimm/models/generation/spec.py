"""``ImageSpec``: what an image made by ``UnifiedModel.generate`` looks like and how it is sampled,
with the checks of its fields and of the model that is to make it; and the argument checks the
generation entry points share."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from unimm.kernels._common import is_int, is_real
from unimm.kernels.diffusion import check_sampling_options
from unimm.models.heads import DiffusionHead, RegressionHead
from unimm.models.sequence import EMU3_FORMAT, METAMORPH_FORMAT, PLAIN_FORMAT
from unimm.models.vocab import ImageFormat

IMAGE_KINDS = ("discrete", "continuous", "regression")
# the segment defaults: DiscreteImage's (Emu3), ContinuousImage's (BOI ... EOI), MetaMorph's for regression
_DEFAULT_FORMATS = {"discrete": EMU3_FORMAT, "continuous": PLAIN_FORMAT, "regression": METAMORPH_FORMAT}


def check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_sampling(prefix: str, temperature, top_k, top_p) -> None:
    """``sample_tokens``' temperature, top_k and top_p, named with ``prefix``."""
    if not (is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{prefix}temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and not (is_int(top_k) and top_k >= 1):
        raise ValueError(f"{prefix}top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"{prefix}top_p must be in (0, 1] or None, got {top_p!r}")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What an image made by ``UnifiedModel.generate`` looks like and how it is sampled.

    Args:
        kind: ``"discrete"``: VQ codes sampled from the code block of the vocabulary;
            ``"continuous"``: tokens sampled by the model's ``DiffusionHead`` (UniFluid, MAR);
            ``"regression"``: tokens predicted by its ``RegressionHead`` (MetaMorph).
        shape: ``(h, w)``, the token grid. Required for discrete images, for size and
            end-of-line tokens, for 2D position embeddings and for random order.
        num_tokens: the token count of a continuous image without a grid (default ``h * w``).
        format: the structure tokens (``ImageFormat``). None: the segment default of the kind:
            Emu3's (BOI, size, image token, EOL after each row, EOF, EOI) for discrete images,
            BOI ... EOI for continuous ones, ``<image_start>`` ... ``<image_end>`` for regression.
        cfg_scale: classifier-free guidance scale; 1 turns guidance off (no uncond rows).
        temperature, top_k, top_p: sampling of image codes (discrete).
        diffusion_steps, diffusion_temperature, clip_denoised: ``DiffusionHead.sample``'s
            ``num_steps``, ``temperature`` and ``clip_denoised`` (continuous).
        random_order: continuous tokens in a random order, one permutation per image drawn from
            the generator (UniFluid): needs ``shape`` and a model with next-position embeddings.
            Results are still in raster order (with the order in ``ContinuousImage.order``).
        encoder: the input projector that feeds generated continuous tokens back.
        max_images: how many images one row may generate.
    """

    kind: str
    shape: tuple[int, int] | None = None
    num_tokens: int | None = None
    format: ImageFormat | None = None
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    diffusion_steps: int = 100
    diffusion_temperature: float = 1.0
    clip_denoised: float | None = None
    random_order: bool = False
    encoder: str = "image"
    max_images: int = 1

    def __post_init__(self):
        if self.kind not in IMAGE_KINDS:
            raise ValueError(f"ImageSpec.kind must be one of {IMAGE_KINDS}, got {self.kind!r}")
        if self.shape is not None:
            if not (isinstance(self.shape, Sequence) and len(self.shape) == 2
                    and all(is_int(s) and s >= 1 for s in self.shape)):
                raise ValueError(f"ImageSpec.shape must be (h, w) positive ints, got {self.shape!r}")
            object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.kind == "discrete" and self.shape is None:
            raise ValueError("ImageSpec.shape (h, w) is required for discrete images: it sets the code grid")
        if self.num_tokens is not None:
            if not (is_int(self.num_tokens) and self.num_tokens >= 1):
                raise ValueError(f"ImageSpec.num_tokens must be a positive int, got {self.num_tokens!r}")
            if self.shape is not None and self.num_tokens != self.shape[0] * self.shape[1]:
                raise ValueError(f"ImageSpec.num_tokens ({self.num_tokens}) must be h * w of shape {self.shape}")
        elif self.shape is None:
            raise ValueError("ImageSpec needs shape=(h, w) or num_tokens")
        if self.format is None:
            object.__setattr__(self, "format", _DEFAULT_FORMATS[self.kind])
        elif not isinstance(self.format, ImageFormat):
            raise TypeError(f"ImageSpec.format must be an ImageFormat or None, got {type(self.format).__name__}")
        check_sampling_options(self.cfg_scale, self.diffusion_temperature, self.clip_denoised,
                               names=("ImageSpec.cfg_scale", "ImageSpec.diffusion_temperature",
                                      "ImageSpec.clip_denoised"))
        check_sampling("ImageSpec.", self.temperature, self.top_k, self.top_p)
        if not (is_int(self.diffusion_steps) and self.diffusion_steps >= 1):
            raise ValueError(f"ImageSpec.diffusion_steps must be a positive int, got {self.diffusion_steps!r}")
        if self.random_order:
            if self.kind == "discrete":
                raise ValueError("ImageSpec.random_order applies to continuous images only")
            if self.shape is None:
                raise ValueError("ImageSpec.random_order needs shape=(h, w): an order means grid cells")
            if self.format.end_of_line is not None:
                raise ValueError("ImageSpec.random_order cannot use a format with end-of-line tokens "
                                 "(rows are not contiguous in a random order)")
        if not (is_int(self.max_images) and self.max_images >= 1):
            raise ValueError(f"ImageSpec.max_images must be a positive int, got {self.max_images!r}")

    @property
    def tokens(self) -> int:
        """Image tokens per image (codes or continuous tokens)."""
        return self.num_tokens if self.num_tokens is not None else self.shape[0] * self.shape[1]

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0

    def check_model(self, model) -> None:
        """What ``model`` (a ``UnifiedModel``) must have to make images of this spec."""
        vocab = model.vocab
        if self.kind == "discrete" and vocab.num_image_codes == 0:
            raise ValueError("discrete images need image codes; the model has num_image_codes=0")
        if self.kind != "discrete":
            head = model.continuous_head
            want = DiffusionHead if self.kind == "continuous" else RegressionHead
            if not isinstance(head, want):
                raise ValueError(f"{self.kind} images need a {want.__name__} as continuous_head, the model has "
                                 f"{type(head).__name__}")
            if self.encoder not in model.input_projectors:
                raise ValueError(f"generated tokens are fed back through input projector {self.encoder!r}, which the "
                                 f"model lacks (it has {sorted(model.input_projectors)})")
            in_dim = model.input_projectors[self.encoder].in_dim
            if in_dim != head.token_dim:
                raise ValueError(f"input projector {self.encoder!r} takes {in_dim} features but the head makes "
                                 f"{head.token_dim}")
            if self.diffusion_steps > getattr(head, "train_steps", self.diffusion_steps):
                raise ValueError(f"ImageSpec.diffusion_steps must be <= the head's train_steps {head.train_steps}, "
                                 f"got {self.diffusion_steps}")
        if self.random_order and model.next_position_embed is None:
            raise ValueError("ImageSpec.random_order needs a model with next_position_embeddings: otherwise nothing "
                             "tells it which cell comes next")
        if model.image_grid is not None and self.shape is not None:
            if self.shape[0] > model.image_grid[0] or self.shape[1] > model.image_grid[1]:
                raise ValueError(f"ImageSpec.shape {self.shape} exceeds the model's image_grid {model.image_grid}")
