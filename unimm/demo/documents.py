"""The demo's documents (``unimm.demo.train``), as ``unimm.models.sequence`` segments: the three
training tasks (captioning, text-to-image over codes, text-to-image over continuous tokens) and
the prompts generation starts from, with the image formats and special tokens they use.
"""

from __future__ import annotations

import torch

from unimm.demo import data
from unimm.models import ContinuousImage, DiscreteImage, ImageFormat, Text

CODE_FORMAT = ImageFormat(begin="boi", end="eoi")  # discrete images: [boi] codes [eoi]
FEATURE_FORMAT = ImageFormat(begin="image_start", end="image_end")  # continuous images
SPECIAL_TOKENS = ("boi", "eoi", "image_start", "image_end")
ENCODER = "image"


class Documents:
    """Builds the training documents and the generation prompts (lists of ``sequence`` segments)
    from word ids, VQ codes on a ``code_grid`` and continuous tokens on a ``feature_grid``."""

    def __init__(self, words: data.WordTokenizer, code_grid: int, feature_grid: int):
        self.words = words
        self.code_grid = code_grid
        self.feature_grid = feature_grid
        self.bos = [words.bos_id]

    def draw_prompt(self, caption: str | None) -> list[int]:
        """``[BOS] draw <caption>``; None: the unconditional prompt ``[BOS] draw``."""
        text = data.DRAW_PROMPT if caption is None else f"{data.DRAW_PROMPT} {caption}"
        return self.bos + self.words.encode(text)

    def caption_prefix(self, features: torch.Tensor) -> list:
        """The bidirectional prefix of a captioning document: image and question."""
        return [Text(self.bos, loss=False, bidirectional=True),
                ContinuousImage(features, role="input", bidirectional=True, shape=(self.feature_grid,) * 2,
                                encoder=ENCODER, format=FEATURE_FORMAT),
                Text(self.words.encode(data.CAPTION_PROMPT), loss=False, bidirectional=True)]

    def caption(self, features: torch.Tensor, caption: str) -> list:
        return self.caption_prefix(features) + [Text(self.words.encode(caption, eos=True))]

    def codes(self, codes: torch.Tensor, caption: str | None) -> list:
        return [Text(self.draw_prompt(caption), loss=False), DiscreteImage(codes, format=CODE_FORMAT)]

    def features(self, features: torch.Tensor, caption: str | None) -> list:
        return [Text(self.draw_prompt(caption), loss=False),
                ContinuousImage(features, role="target", shape=(self.feature_grid,) * 2, encoder=ENCODER,
                                format=FEATURE_FORMAT)]

    def draw_prompts(self, captions: list[str]) -> tuple[list, list]:
        """Text-to-image prompts and their unconditional twins (what caption dropout trains)."""
        return ([[Text(self.draw_prompt(caption))] for caption in captions],
                [[Text(self.draw_prompt(None))] for _ in captions])
