"""Multimodal documents -> packed training tensors (docs/ARCHITECTURE.md: "Vocabulary layout", "Attention masks").

A document is a list of segments:

- ``Text(ids)``: token ids of the text block or the special tokens (BOS, EOS, a chat template).
- ``DiscreteImage(codes [H, W])``: VQ codes with Emu3's structure tokens
  ``[BOI] {size} [IMG] codes(row 0) [EOL] ... codes(row H-1) [EOL] [EOF] [EOI]`` (``[IMG]`` is
  Emu3's ``<|image token|>``; a 33x32 image is 1 + 5 + 1 + 33 * 33 + 2 = 1,098 tokens, as in
  Emu3's processor).
- ``ContinuousImage(features [L, F], role="input" | "target")``: encoder features (SigLIP) or
  VAE latents between ``[BOI]`` and ``[EOI]`` (MetaMorph: ``<image_start>`` / ``<image_end>``;
  UniFluid: BOI only). A "target" image is both predicted and fed back as input (teacher forcing).
- ``HybridImage(codes, features)``: one image as VQ codes and continuous features, either in
  sequence (UniToken: ``[BOI] {codes} [SEP] {features} [EOI]``) or fused per position (TokLIP).

``pack(documents, max_tokens, vocab=...)`` places documents into rows of ``max_tokens`` (greedy
first-fit, in the given order) and returns a :class:`Batch`.

Conventions every consumer relies on:

- Next-token prediction: the hidden state at position p predicts the token at p + 1 of the same
  document. A segment's ``loss`` says whether *its* tokens are predicted, so ``targets[p]``,
  ``heads[p]`` and ``loss_weights[p]`` all describe the token at p + 1.
- A continuous target at position p is predicted by the hidden state at p - 1 (``Batch.
  target_features.positions`` holds p - 1) and is also an input at p through the input projector.
- Consecutive bidirectional segments of a document form *one* bidirectional span, so
  ``[DiscreteImage(..., bidirectional=True), Text(question, loss=False, bidirectional=True),
  Text(answer)]`` is PaliGemma / UniFluid prefix-LM: image and question see each other, the
  answer is causal. A bidirectional segment cannot carry a loss: its tokens would see the tokens
  they predict.
- Size tokens (Emu3 writes the latent size as the text "H*W"): ``ImageFormat(size="digits")``
  spells it with dedicated special tokens ``size_0`` ... ``size_9`` and ``size_x`` (24x32 ->
  ``size_2 size_4 size_x size_3 size_2``), which works with any tokenizer and any size; pass a
  callable ``size(h, w) -> ids`` to use a tokenizer's own text ids instead (Emu3 exactly: its
  tokenizer splits numbers into single digits, so "24*32" is 5 tokens either way).
- Structure tokens (BOI, size, IMG, EOL, EOF, EOI, SEP) are trained with the full-vocabulary
  text head (``Head.TEXT``); only image codes use ``Head.IMAGE_CODE``.
- Random order (UniFluid / RAR): the tokens of a continuous target image with a ``shape`` may be
  permuted (``ContinuousImage.order``, or ``pack(random_order=p, generator=g)``); the permuted
  order *is* the sequence order. ``Batch.image_positions`` holds each token's own (row, col) and
  ``Batch.next_image_positions`` the (row, col) of the token it predicts, for the model's 2D and
  next-position embeddings.
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields

import torch

from unimm.kernels.masks import AttentionMask

IGNORE_INDEX = -100
SIZE_TOKENS = tuple(f"size_{digit}" for digit in "0123456789") + ("size_x",)
# "img" (Emu3's <|image token|>) comes last so that the other names keep the ids they had before it
DEFAULT_SPECIAL_TOKENS = ("boi", "eoi", "eol", "eof", "sep", "image_start", "image_end") + SIZE_TOKENS + ("img",)


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


# Emu3: [BOI] H*W [IMG] (codes [EOL]) x H [EOF] [EOI] (its processor's prompt for an image of H x W codes)
EMU3_FORMAT = ImageFormat(size="digits", image_token="img", end_of_line="eol", end_of_frame="eof")
PLAIN_FORMAT = ImageFormat()  # [BOI] ... [EOI]; UniToken's hybrid [BOI] codes [SEP] features [EOI]
UNIFLUID_FORMAT = ImageFormat(end=None)  # [BOI] then a fixed number of tokens
METAMORPH_FORMAT = ImageFormat(begin="image_start", end="image_end")


# ---- segments ---------------------------------------------------------------------------------

@dataclass
class Text:
    """Token ids (text block or special tokens): a list of ints or an integer tensor (floats and
    bools are refused, never rounded). ``loss``: these tokens are predicted, with ``weight``;
    ``bidirectional``: part of a bidirectional span (a prefix-LM prompt)."""

    ids: Sequence[int] | torch.Tensor
    loss: bool = True
    bidirectional: bool = False
    weight: float = 1.0


@dataclass
class DiscreteImage:
    """VQ codes ``[H, W]`` (indices in ``[0, num_image_codes)``), laid out row by row with the
    structure tokens of ``format`` (Emu3's by default)."""

    codes: torch.Tensor
    loss: bool = True
    bidirectional: bool = False
    weight: float = 1.0
    format: ImageFormat = EMU3_FORMAT


@dataclass
class ContinuousImage:
    """Continuous tokens ``[L, F]`` fed through the input projector of ``encoder``.

    ``role="target"``: the tokens are also predicted by the continuous head (and the structure
    tokens by the text head). ``shape=(h, w)`` with ``h * w == L`` (features in raster order)
    records 2D positions; ``order`` (a permutation of ``range(L)``, needs ``shape``) puts token
    ``order[t]`` at step t of the sequence (random-order training).

    The feature values are not inspected (they may live on a GPU): a NaN or Inf in them
    propagates, as in PyTorch, to the outputs that depend on its token (its hidden state, the
    positions that attend to it, a target's continuous loss) and to no other document.
    """

    features: torch.Tensor
    role: str = "input"
    bidirectional: bool = False
    shape: tuple[int, int] | None = None
    encoder: str = "image"
    weight: float = 1.0
    format: ImageFormat = PLAIN_FORMAT
    order: torch.Tensor | None = None


@dataclass
class HybridImage:
    """One image as VQ codes ``[H, W]`` and continuous features ``[L, F]``.

    ``fusion="sequence"`` (UniToken): ``[BOI] {codes} [SEP] {features} [EOI]``; ``shape`` may
    give the features' grid. ``fusion="add"`` (TokLIP's concatenation): the features (``L == H
    W``, raster order) are projected and added to the code embeddings at the same positions;
    concatenating then applying a linear layer is the same as adding two projections.
    ``loss`` trains the codes and structure tokens; features are inputs only.
    """

    codes: torch.Tensor
    features: torch.Tensor
    fusion: str = "sequence"
    loss: bool = False
    bidirectional: bool = False
    shape: tuple[int, int] | None = None
    encoder: str = "image"
    weight: float = 1.0
    format: ImageFormat = PLAIN_FORMAT


Segment = Text | DiscreteImage | ContinuousImage | HybridImage


# ---- the packed batch -------------------------------------------------------------------------

@dataclass
class Features:
    """Rows of continuous tokens and the flat positions ``b * S + s`` they belong to.

    For inputs, the position holding the token; for ``Batch.target_features``, the position
    whose hidden state predicts it (one before the token).
    """

    values: torch.Tensor  # [N, F]
    positions: torch.Tensor  # int64 [N]

    def to(self, device, non_blocking: bool = False) -> Features:
        return Features(self.values.to(device, non_blocking=non_blocking),
                        self.positions.to(device, non_blocking=non_blocking))


@dataclass
class Batch:
    """Packed documents, ``[B, S]`` with ``S = max_tokens``.

    Attributes:
        input_ids: int64; image codes as absolute ids, ``placeholder_id`` at continuous tokens,
            ``pad_id`` at padding.
        positions: int64 RoPE positions, restarting at 0 in every document (0 on padding).
        doc_ids, span_ids: int64 document (-1: padding) and bidirectional-span (0: none) ids.
        mask: ``AttentionMask.from_spans(doc_ids, span_ids)``.
        targets: int64 next-token ids, ``IGNORE_INDEX`` where no cross-entropy is taken.
        heads: int8 :class:`Head` of the prediction made at each position.
        loss_weights: float32 weight of the prediction at each position (0 where no loss).
        image_positions: int64 ``[B, S, 3]`` (row, col, image index in its document) of image
            tokens with a grid, -1 elsewhere.
        next_image_positions: int64 ``[B, S, 2]`` (row, col) of the image token that position
            predicts (the BOI predicts the first one), -1 elsewhere.
        input_features: encoder name -> features that replace the embedding at their positions
            (continuous images, including target images fed back).
        added_features: encoder name -> features added to the code embedding (hybrid "add").
        target_features: continuous targets (positions: their predictors) or None.
        vocab: the layout the ids were written for.
        placements: per input document, ``(row, start, length)``.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    doc_ids: torch.Tensor
    span_ids: torch.Tensor
    mask: AttentionMask
    targets: torch.Tensor
    heads: torch.Tensor
    loss_weights: torch.Tensor
    image_positions: torch.Tensor
    next_image_positions: torch.Tensor
    input_features: dict[str, Features]
    added_features: dict[str, Features]
    target_features: Features | None
    vocab: VocabLayout
    placements: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to(self, device, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor | Features):
                value = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, AttentionMask):
                value = AttentionMask(value.kv_start.to(device, non_blocking=non_blocking),
                                      value.kv_end.to(device, non_blocking=non_blocking), value.num_keys)
            elif isinstance(value, dict):
                value = {name: features.to(device, non_blocking=non_blocking) for name, features in value.items()}
            moved[f.name] = value
        return Batch(**moved)


# ---- building one document --------------------------------------------------------------------

class _Document:
    """Token-level arrays of one document, appended piece by piece."""

    def __init__(self, index: int):
        self.index = index
        self.segment: int | None = None  # the segment being added, for error messages
        self.ids, self.kinds, self.weights, self.bidirectional, self.grid = [], [], [], [], []
        self.length = 0
        self.num_images = 0
        self.inputs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.added: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.targets: list[tuple[torch.Tensor, torch.Tensor]] = []

    def add(self, ids: torch.Tensor, kinds, weight: float, bidirectional: bool,
            grid: torch.Tensor | None = None) -> int:
        """Appends tokens; ``kinds``: a Head or an int8 tensor; returns the first local position."""
        start, count = self.length, ids.numel()
        self.ids.append(ids)
        if not isinstance(kinds, torch.Tensor):
            kinds = torch.full((count,), int(kinds), dtype=torch.int8)
        self.kinds.append(kinds)
        self.weights.append(torch.full((count,), float(weight)))
        self.bidirectional.append(torch.full((count,), bool(bidirectional)))
        self.grid.append(grid if grid is not None else torch.full((count, 3), -1, dtype=torch.long))
        self.length += count
        return start

    def where(self) -> str:
        return f"document {self.index}" + ("" if self.segment is None else f", segment {self.segment}")

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.where()}: {message}")

    def type_error(self, message: str) -> TypeError:
        return TypeError(f"{self.where()}: {message}")


def _is_int(value) -> bool:
    """A Python / NumPy integer or a 0-dim integer tensor; never a bool, a float or a string."""
    if type(value) is int:
        return True
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _ids(values, doc: _Document, what: str, noun: str = "token id") -> torch.Tensor:
    """Token ids (or other ``noun``s) ``what``: a list of ints or an integer tensor (any shape), as
    a flat int64 CPU tensor. Floats are never truncated, bools never read as 0 / 1: a TypeError
    names the entry."""
    if isinstance(values, torch.Tensor):
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise doc.type_error(f"{what} must hold integer {noun}s, got a {values.dtype} tensor")
        return values.detach().reshape(-1).to("cpu", torch.long)
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) and not hasattr(values, "__array__"):
        raise doc.type_error(f"{what} must be a list of int {noun}s or an integer tensor, got "
                             f"{type(values).__name__}")
    if not isinstance(values, Sequence):  # a NumPy array (or similar): by its dtype
        try:
            tensor = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as err:
            raise doc.type_error(f"{what} must hold integer {noun}s: {err}") from None
        return _ids(tensor, doc, what, noun)
    plain = all(type(v) is int for v in values)  # the common case: one pass, then one conversion
    if not plain:
        bad = next((i for i, v in enumerate(values) if not _is_int(v)), None)
        if bad is not None:
            value = values[bad]
            raise doc.type_error(f"{what}[{bad}] must be an int {noun}, got {value!r} ({type(value).__name__})")
    try:
        return torch.tensor(values if plain else [int(v) for v in values], dtype=torch.long)
    except (OverflowError, RuntimeError, ValueError):  # beyond int64: certainly not a token id
        bad = next(i for i, v in enumerate(values) if not -2**63 <= int(v) < 2**63)
        raise doc.error(f"{what}[{bad}] = {int(values[bad])} is not a {noun}") from None


def _specials(vocab: VocabLayout, *names: str | None) -> torch.Tensor:
    return torch.tensor([vocab.special_id(name) for name in names if name is not None], dtype=torch.long)


def _size_ids(vocab: VocabLayout, fmt: ImageFormat, shape: tuple[int, int] | None, doc: _Document) -> torch.Tensor:
    if fmt.size is None:
        return torch.zeros(0, dtype=torch.long)
    if shape is None:
        raise doc.error("the image format writes size tokens but the image has no shape")
    h, w = shape
    if fmt.size == "digits":
        return _specials(vocab, *[f"size_{c}" for c in str(h)], "size_x", *[f"size_{c}" for c in str(w)])
    ids = _ids(fmt.size(h, w), doc, f"ImageFormat.size({h}, {w})")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab.image_codes[0]):
        raise doc.error(f"size({h}, {w}) returned ids outside the text and special blocks [0, {vocab.image_codes[0]})")
    return ids


def _grid_body(cell_ids: torch.Tensor, cell_kind: Head, cells: torch.Tensor | None, width: int | None,
               eol_id: int | None, image_index: int):
    """Image tokens in sequence order, with an EOL token after each row when ``eol_id`` is set.

    ``cells``: raster indices of the tokens in sequence order (None: no grid recorded). Returns
    (ids, kinds, grid, offsets of the cells within the body)."""
    count = cell_ids.numel()
    grid = torch.full((count, 3), -1, dtype=torch.long)
    if cells is not None:
        grid = torch.stack([cells // width, cells % width, torch.full_like(cells, image_index)], dim=1)
    kinds = torch.full((count,), int(cell_kind), dtype=torch.int8)
    if eol_id is None:
        return cell_ids, kinds, grid, torch.arange(count)
    rows = count // width
    ids = torch.cat([cell_ids.view(rows, width), torch.full((rows, 1), eol_id, dtype=torch.long)], 1)
    kinds = torch.cat([kinds.view(rows, width), torch.full((rows, 1), int(Head.TEXT), dtype=torch.int8)], 1)
    grid = torch.cat([grid.view(rows, width, 3), torch.full((rows, 1, 3), -1, dtype=torch.long)], 1)
    offsets = (torch.arange(rows)[:, None] * (width + 1) + torch.arange(width)).reshape(-1)
    return ids.reshape(-1), kinds.reshape(-1), grid.reshape(-1, 3), offsets


def _check_flags(doc: _Document, segment, loss: bool, weight: float) -> float:
    """The loss weight of the segment's tokens (0 without loss); checks the segment's flags,
    ``encoder`` and ``format`` where it has them."""
    name = type(segment).__name__
    for flag in ("loss", "bidirectional"):
        value = getattr(segment, flag, False)
        if not isinstance(value, bool):
            raise doc.type_error(f"{name}.{flag} must be True or False, got {value!r}")
    if not isinstance(getattr(segment, "format", PLAIN_FORMAT), ImageFormat):
        raise doc.type_error(f"{name}.format must be an ImageFormat, got {type(segment.format).__name__}")
    encoder = getattr(segment, "encoder", "image")
    if not (isinstance(encoder, str) and encoder):
        raise doc.type_error(f"{name}.encoder must be an input projector's name (a non-empty str), got {encoder!r}")
    if loss and segment.bidirectional:
        raise doc.error(f"a bidirectional {name} cannot carry a loss: its tokens would see the tokens they predict")
    if not loss:
        return 0.0
    if not (isinstance(weight, numbers.Real) and not isinstance(weight, bool) and 0 < weight < math.inf):
        raise doc.error(f"{name}.weight must be a positive finite number, got {weight!r}")
    return float(weight)


def _check_codes(doc: _Document, codes, vocab: VocabLayout, name: str) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise doc.error(f"{name}.codes must be an integer torch.Tensor [H, W]")
    if codes.dim() != 2 or codes.numel() == 0:
        raise doc.error(f"{name}.codes must be [H, W] with H, W >= 1, got shape {tuple(codes.shape)}")
    if vocab.num_image_codes == 0:
        raise doc.error(f"{name} needs image codes but the vocabulary has num_image_codes=0")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= vocab.num_image_codes:
        raise doc.error(f"{name}.codes must be in [0, num_image_codes={vocab.num_image_codes}), "
                        f"got values in [{low}, {high}]")
    return codes.cpu()


def _check_features(doc: _Document, features, name: str) -> None:
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise doc.error(f"{name}.features must be a floating torch.Tensor [L, F]")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise doc.error(f"{name}.features must be [L, F] with L, F >= 1, got shape {tuple(features.shape)}")


def _check_shape(doc: _Document, shape, length: int, name: str) -> tuple[int, int] | None:
    if shape is None:
        return None
    if not (isinstance(shape, Sequence) and len(shape) == 2 and all(_is_int(s) and s >= 1 for s in shape)
            and shape[0] * shape[1] == length):
        raise doc.error(f"{name}.shape must be (h, w) with h * w = {length} features, got {shape!r}")
    return int(shape[0]), int(shape[1])


def _add_text(doc: _Document, segment: Text, vocab: VocabLayout) -> None:
    weight = _check_flags(doc, segment, segment.loss, segment.weight)
    ids = _ids(segment.ids, doc, "Text.ids")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab.image_codes[0]):
        raise doc.error(f"Text ids must be in the text and special blocks [0, {vocab.image_codes[0]}), got values "
                        f"in [{int(ids.min())}, {int(ids.max())}]; image codes belong in a DiscreteImage")
    doc.add(ids, Head.TEXT, weight, segment.bidirectional)


def _open_image(doc: _Document, fmt: ImageFormat, shape, vocab: VocabLayout, weight: float,
                bidirectional: bool) -> tuple[int, int | None]:
    """Numbers a new image in ``doc`` and writes its begin, size and image tokens; returns (image
    index in the document, end-of-line id or None)."""
    image = doc.num_images
    doc.num_images += 1
    opening = [_specials(vocab, fmt.begin), _size_ids(vocab, fmt, shape, doc), _specials(vocab, fmt.image_token)]
    doc.add(torch.cat(opening), Head.TEXT, weight, bidirectional)
    return image, vocab.special_id(fmt.end_of_line) if fmt.end_of_line else None


def _add_discrete(doc: _Document, segment: DiscreteImage, vocab: VocabLayout) -> None:
    weight = _check_flags(doc, segment, segment.loss, segment.weight)
    codes = _check_codes(doc, segment.codes, vocab, "DiscreteImage")
    fmt, (h, w) = segment.format, codes.shape
    bidirectional = segment.bidirectional
    image, eol = _open_image(doc, fmt, (h, w), vocab, weight, bidirectional)
    ids, kinds, grid, _ = _grid_body(vocab.code_ids(codes.reshape(-1)), Head.IMAGE_CODE, torch.arange(h * w), w, eol,
                                     image)
    doc.add(ids, kinds, weight, bidirectional, grid)
    doc.add(_specials(vocab, fmt.end_of_frame, fmt.end), Head.TEXT, weight, bidirectional)


def _add_continuous(doc: _Document, segment: ContinuousImage, vocab: VocabLayout, placeholder_id: int,
                    random_order: float, generator: torch.Generator | None) -> None:
    if segment.role not in ("input", "target"):
        raise doc.error(f"ContinuousImage.role must be 'input' or 'target', got {segment.role!r}")
    target = segment.role == "target"
    weight = _check_flags(doc, segment, target, segment.weight)
    _check_features(doc, segment.features, "ContinuousImage")
    features, fmt = segment.features, segment.format
    length = features.shape[0]
    shape = _check_shape(doc, segment.shape, length, "ContinuousImage")
    order = segment.order
    if order is not None:
        order = _ids(order, doc, "ContinuousImage.order", "index")
        if shape is None:
            raise doc.error("ContinuousImage.order needs ContinuousImage.shape")
        if order.shape != (length,) or not torch.equal(order.sort().values, torch.arange(length)):
            raise doc.error(f"ContinuousImage.order must be a permutation of range({length})")
    elif target and random_order > 0:
        if shape is None:
            raise doc.error("random_order needs ContinuousImage.shape on target images (the permutation only "
                            "means something with 2D positions)")
        if random_order >= 1 or float(torch.rand((), generator=generator)) < random_order:
            order = torch.randperm(length, generator=generator)
    if order is not None:
        if fmt.end_of_line is not None:
            raise doc.error("a permuted image cannot have end-of-line tokens (its rows are not contiguous)")
        features = features[order.to(features.device)]
    bidirectional = segment.bidirectional
    image, eol = _open_image(doc, fmt, shape, vocab, weight, bidirectional)
    cells = None if shape is None else (order if order is not None else torch.arange(length))
    if eol is not None and shape is None:
        raise doc.error("the image format writes end-of-line tokens but the image has no shape")
    ids, kinds, grid, offsets = _grid_body(torch.full((length,), placeholder_id, dtype=torch.long), Head.CONTINUOUS,
                                           cells, shape[1] if shape else None, eol, image)
    start = doc.add(ids, kinds, weight, bidirectional, grid)
    doc.inputs.setdefault(segment.encoder, []).append((start + offsets, features))
    if target:
        doc.targets.append((start + offsets, features))
    doc.add(_specials(vocab, fmt.end_of_frame, fmt.end), Head.TEXT, weight, bidirectional)


def _add_hybrid(doc: _Document, segment: HybridImage, vocab: VocabLayout, placeholder_id: int) -> None:
    if segment.fusion not in ("sequence", "add"):
        raise doc.error(f"HybridImage.fusion must be 'sequence' or 'add', got {segment.fusion!r}")
    weight = _check_flags(doc, segment, segment.loss, segment.weight)
    codes = _check_codes(doc, segment.codes, vocab, "HybridImage")
    _check_features(doc, segment.features, "HybridImage")
    fmt, (h, w), features = segment.format, codes.shape, segment.features
    bidirectional = segment.bidirectional
    image, eol = _open_image(doc, fmt, (h, w), vocab, weight, bidirectional)
    ids, kinds, grid, offsets = _grid_body(vocab.code_ids(codes.reshape(-1)), Head.IMAGE_CODE, torch.arange(h * w),
                                           w, eol, image)
    start = doc.add(ids, kinds, weight, bidirectional, grid)
    if segment.fusion == "add":
        if features.shape[0] != h * w:
            raise doc.error(f"HybridImage with fusion='add' needs one feature per code: {h * w}, got "
                            f"{features.shape[0]}")
        doc.added.setdefault(segment.encoder, []).append((start + offsets, features))
        doc.add(_specials(vocab, fmt.end_of_frame, fmt.end), Head.TEXT, weight, bidirectional)
        return
    doc.add(_specials(vocab, fmt.end_of_frame, fmt.separator), Head.TEXT, weight, bidirectional)
    shape = _check_shape(doc, segment.shape, features.shape[0], "HybridImage")
    cells = None if shape is None else torch.arange(features.shape[0])
    ids, kinds, grid, _ = _grid_body(torch.full((features.shape[0],), placeholder_id, dtype=torch.long), Head.NONE,
                                     cells, shape[1] if shape else None, None, image)
    start = doc.add(ids, kinds, 0.0, bidirectional, grid)
    doc.inputs.setdefault(segment.encoder, []).append((start + torch.arange(features.shape[0]), features))
    doc.add(_specials(vocab, fmt.end), Head.TEXT, weight, bidirectional)


# ---- packing ----------------------------------------------------------------------------------

def _first_fit(lengths: list[int], max_tokens: int) -> tuple[list[tuple[int, int, int]], int]:
    free: list[int] = []
    placements = []
    for length in lengths:
        row = next((r for r, room in enumerate(free) if room >= length), None)
        if row is None:
            row = len(free)
            free.append(max_tokens)
        placements.append((row, max_tokens - free[row], length))
        free[row] -= length
    return placements, len(free)


def _gather_features(parts: list[tuple[torch.Tensor, torch.Tensor, int]], what: str) -> Features:
    """``parts``: (flat positions, values, document index); all values must share their width."""
    first_doc: dict[int, int] = {}
    for _, values, doc in parts:
        first_doc.setdefault(values.shape[1], doc)
    if len(first_doc) > 1:
        detail = ", ".join(f"F={width} in document {doc}" for width, doc in first_doc.items())
        raise ValueError(f"{what} have mismatched feature dims ({detail}); one projector / head takes one width")
    positions = torch.cat([p for p, _, _ in parts])
    return Features(torch.cat([v for _, v, _ in parts]), positions)


def pack(documents: Sequence[Sequence[Segment]], max_tokens: int, *, vocab: VocabLayout, num_rows: int | None = None,
         placeholder_id: int = 0, pad_id: int = 0, random_order: float = 0.0,
         generator: torch.Generator | None = None) -> Batch:
    """Packs documents (lists of segments) into a :class:`Batch` of ``[B, max_tokens]`` rows.

    Args:
        documents: each a list of ``Text`` / ``DiscreteImage`` / ``ContinuousImage`` /
            ``HybridImage`` segments; one document never spans two rows.
        max_tokens: the row length S.
        vocab: the vocabulary layout of the model (``model.vocab``): structure-token and image
            code ids come from it, and codes are checked against ``num_image_codes``.
        num_rows: the batch size B (a ValueError if the documents need more rows); by default
            as many rows as first-fit needs.
        placeholder_id, pad_id: ids written at continuous tokens and at padding.
        random_order: probability that each continuous target image with a ``shape`` (and no
            explicit ``order``) is permuted (UniFluid anneals it from 1 to 0); draws come from
            ``generator``.

    Runs on the CPU with a short Python loop per segment (it is meant for data loaders); move
    the result with ``Batch.to(device)``.

    Everything that decides the layout is checked here, on the host: token ids must be ints
    (a float or bool id is a TypeError naming the segment and the entry, never rounded) in the
    text and special blocks, codes in ``[0, num_image_codes)``, flags bools, weights positive
    and finite. Feature values are data and are passed through unread (``ContinuousImage``).
    """
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if not isinstance(vocab, VocabLayout):
        raise TypeError(f"vocab must be a VocabLayout (model.vocab), got {type(vocab).__name__}")
    if not (isinstance(random_order, int | float) and 0 <= random_order <= 1):
        raise ValueError(f"random_order must be a probability in [0, 1], got {random_order!r}")
    if isinstance(documents, torch.Tensor) or not isinstance(documents, Sequence) or not documents:
        raise ValueError("documents must be a non-empty list of documents (lists of segments)")
    for name, value in (("placeholder_id", placeholder_id), ("pad_id", pad_id)):
        if not isinstance(value, int) or not 0 <= value < vocab.size:
            raise ValueError(f"{name} must be a token id in [0, {vocab.size}), got {value!r}")

    built = []
    for index, segments in enumerate(documents):
        doc = _Document(index)
        if isinstance(segments, Segment):
            raise doc.error("each document must be a list of segments, got a bare segment")
        if isinstance(segments, (str, bytes, torch.Tensor)) or not isinstance(segments, Sequence):
            raise doc.error(f"each document must be a list of segments, got {type(segments).__name__}")
        for doc.segment, segment in enumerate(segments):
            if isinstance(segment, Text):
                _add_text(doc, segment, vocab)
            elif isinstance(segment, DiscreteImage):
                _add_discrete(doc, segment, vocab)
            elif isinstance(segment, ContinuousImage):
                _add_continuous(doc, segment, vocab, placeholder_id, random_order, generator)
            elif isinstance(segment, HybridImage):
                _add_hybrid(doc, segment, vocab, placeholder_id)
            else:
                raise doc.type_error(f"segments must be Text, DiscreteImage, ContinuousImage or HybridImage, "
                                     f"got {type(segment).__name__}")
        doc.segment = None
        if doc.length == 0:
            raise doc.error("the document has no tokens")
        if doc.length > max_tokens:
            raise doc.error(f"{doc.length} tokens do not fit in max_tokens={max_tokens}; documents are never split")
        built.append(doc)

    placements, rows_needed = _first_fit([doc.length for doc in built], max_tokens)
    if num_rows is not None and (not isinstance(num_rows, int) or num_rows < rows_needed):
        raise ValueError(f"num_rows={num_rows!r} is too small: the documents need {rows_needed} rows of "
                         f"max_tokens={max_tokens}")
    batch, seq = (num_rows or rows_needed), max_tokens
    input_ids = torch.full((batch, seq), pad_id, dtype=torch.long)
    positions = torch.zeros((batch, seq), dtype=torch.long)
    doc_ids = torch.full((batch, seq), -1, dtype=torch.long)
    span_ids = torch.zeros((batch, seq), dtype=torch.long)
    kinds = torch.zeros((batch, seq), dtype=torch.int8)
    weights = torch.zeros((batch, seq), dtype=torch.float32)
    grid = torch.full((batch, seq, 3), -1, dtype=torch.long)
    inputs, added, targets = {}, {}, []
    next_span = 1
    for doc, (row, start, length) in zip(built, placements):
        where = slice(start, start + length)
        input_ids[row, where] = torch.cat(doc.ids)
        positions[row, where] = torch.arange(length)
        doc_ids[row, where] = doc.index
        kinds[row, where] = torch.cat(doc.kinds)
        weights[row, where] = torch.cat(doc.weights)
        grid[row, where] = torch.cat(doc.grid)
        bidirectional = torch.cat(doc.bidirectional)
        run_starts = bidirectional.clone()
        run_starts[1:] &= ~bidirectional[:-1]
        spans = torch.cumsum(run_starts.long(), 0)
        span_ids[row, where] = torch.where(bidirectional, spans + (next_span - 1), 0)
        next_span += int(spans[-1])
        offset = row * seq + start
        for store, parts in ((inputs, doc.inputs), (added, doc.added)):
            for encoder, items in parts.items():
                store.setdefault(encoder, []).extend((offset + local, values, doc.index) for local, values in items)
        for local, values in doc.targets:
            keep = local > 0  # a document's first token has no predictor
            targets.append((offset + local[keep] - 1, values[keep.to(values.device)], doc.index))

    # next-token shift, within documents only
    same_doc = (doc_ids[:, 1:] == doc_ids[:, :-1]) & (doc_ids[:, 1:] >= 0)
    trained = same_doc & (weights[:, 1:] > 0) & (kinds[:, 1:] != Head.NONE)
    heads = torch.zeros_like(kinds)
    heads[:, :-1] = torch.where(trained, kinds[:, 1:], 0)
    loss_weights = torch.zeros_like(weights)
    loss_weights[:, :-1] = torch.where(trained, weights[:, 1:], 0.0)
    next_targets = torch.full_like(input_ids, IGNORE_INDEX)
    cross_entropy = trained & ((kinds[:, 1:] == Head.TEXT) | (kinds[:, 1:] == Head.IMAGE_CODE))
    next_targets[:, :-1] = torch.where(cross_entropy, input_ids[:, 1:], IGNORE_INDEX)
    next_grid = torch.full((batch, seq, 2), -1, dtype=torch.long)
    next_grid[:, :-1] = torch.where((same_doc & (grid[:, 1:, 0] >= 0))[..., None], grid[:, 1:, :2], -1)

    return Batch(
        input_ids=input_ids, positions=positions, doc_ids=doc_ids, span_ids=span_ids,
        mask=AttentionMask.from_spans(doc_ids, span_ids), targets=next_targets, heads=heads,
        loss_weights=loss_weights, image_positions=grid, next_image_positions=next_grid,
        input_features={name: _gather_features(parts, f"input features of encoder {name!r}")
                        for name, parts in inputs.items()},
        added_features={name: _gather_features(parts, f"added features of encoder {name!r}")
                        for name, parts in added.items()},
        target_features=_gather_features(targets, "continuous targets") if targets else None,
        vocab=vocab, placements=placements,
    )
