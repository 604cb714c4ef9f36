"""The expanded vocabulary ``[text | special tokens | image codes]`` (docs/ARCHITECTURE.md, "Vocabulary
layout"), the structure tokens written around an image (``ImageFormat``) and the head that trains
each predicted token (``Head``): what token ids mean, for ``pack``, the model and generation."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


class Head(enum.IntEnum):
    """Which head a position's prediction is trained with (``Batch.heads``)."""

    NONE = 0  # no loss at this position
    TEXT = 1  # cross-entropy over the full vocabulary (text and special tokens)
    IMAGE_CODE = 2  # cross-entropy whose target is an image code (may use vocab_range = the codes)
    CONTINUOUS = 3  # a continuous head (diffusion or regression) on ``Batch.target_features``


@dataclass(frozen=True)
class VocabLayout:
    """The expanded vocabulary ``[text | special tokens | image codes]``; each block is ``(lo, hi)``."""

    text_size: int
    special_tokens: tuple[str, ...] = ()
    num_image_codes: int = 0

    def __post_init__(self):
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))
        if not isinstance(self.text_size, int) or self.text_size < 1:
            raise ValueError(f"text_size must be a positive int, got {self.text_size!r}")
        if not isinstance(self.num_image_codes, int) or self.num_image_codes < 0:
            raise ValueError(f"num_image_codes must be an int >= 0, got {self.num_image_codes!r}")
        names = self.special_tokens
        if not all(isinstance(name, str) and name for name in names):
            raise ValueError(f"special_tokens must be non-empty strings, got {names!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"special_tokens holds duplicates: {sorted({n for n in names if names.count(n) > 1})}")

    @property
    def text(self) -> tuple[int, int]:
        return (0, self.text_size)

    @property
    def specials(self) -> tuple[int, int]:
        return (self.text_size, self.text_size + len(self.special_tokens))

    @property
    def image_codes(self) -> tuple[int, int]:
        lo = self.specials[1]
        return (lo, lo + self.num_image_codes)

    @property
    def size(self) -> int:
        """Total number of rows in the embedding and the output head."""
        return self.image_codes[1]

    def special_id(self, name: str) -> int:
        """The token id of special token ``name``."""
        try:
            return self.text_size + self.special_tokens.index(name)
        except ValueError:
            raise ValueError(f"special token {name!r} is not in the vocabulary; it has {list(self.special_tokens)}") \
                from None

    def code_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """Token ids of image codes ``codes`` (code indices in ``[0, num_image_codes)``)."""
        return codes.long() + self.image_codes[0]


@dataclass(frozen=True)
class ImageFormat:
    """The structure tokens around an image, as special-token names (None: no such token).

    ``begin`` / ``end``: first and last token; ``size``: ``"digits"`` (dedicated ``size_*``
    tokens), a callable ``(h, w) -> token ids``, or None; ``image_token``: after the size, right
    before the first code or feature (Emu3's ``<|image token|>``); ``end_of_line``: after every row of
    the grid; ``end_of_frame``: after the last row (after the codes in a hybrid image);
    ``separator``: between the codes and the features of a sequential ``HybridImage``.
    """

    begin: str | None = "boi"
    end: str | None = "eoi"
    size: str | Callable[[int, int], Sequence[int]] | None = None
    end_of_line: str | None = None
    end_of_frame: str | None = None
    separator: str | None = "sep"
    image_token: str | None = None

    def __post_init__(self):
        if not (self.size is None or self.size == "digits" or callable(self.size)):
            raise ValueError(f"size must be None, 'digits' or a callable (h, w) -> ids, got {self.size!r}")
        for name in ("begin", "end", "end_of_line", "end_of_frame", "separator", "image_token"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"ImageFormat.{name} must be a special-token name or None, got {value!r}")
