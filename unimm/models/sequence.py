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
first-fit, in the given order) and returns a :class:`Batch`; ``document_length(document,
vocab=...)`` is the number of tokens it writes for one document. The vocabulary layout and
``ImageFormat`` live in ``unimm.models.vocab``, the token layout of each segment in
``unimm.models.document``.

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

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

import torch

from unimm.kernels.masks import AttentionMask, span_ids_of_runs
from unimm.models import document
from unimm.models.vocab import Head, ImageFormat, VocabLayout

IGNORE_INDEX = -100
SIZE_TOKENS = tuple(f"size_{digit}" for digit in "0123456789") + ("size_x",)
# "img" (Emu3's <|image token|>) comes last so that the other names keep the ids they had before it
DEFAULT_SPECIAL_TOKENS = ("boi", "eoi", "eol", "eof", "sep", "image_start", "image_end") + SIZE_TOKENS + ("img",)


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
                value = value.to(device, non_blocking=non_blocking)
            elif isinstance(value, dict):
                value = {name: features.to(device, non_blocking=non_blocking) for name, features in value.items()}
            moved[f.name] = value
        return Batch(**moved)


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


def _document(index: int, segments, vocab: VocabLayout, placeholder_id: int, random_order: float,
              generator: torch.Generator | None) -> document.Document:
    """Document ``index`` (a list of segments) laid out as ``pack`` writes it."""
    doc = document.Document(index)
    if isinstance(segments, Segment):
        raise doc.error("each document must be a list of segments, got a bare segment")
    if isinstance(segments, (str, bytes, torch.Tensor)) or not isinstance(segments, Sequence):
        raise doc.error(f"each document must be a list of segments, got {type(segments).__name__}")
    for doc.segment, segment in enumerate(segments):
        if isinstance(segment, Text):
            document.add_text(doc, segment, vocab)
        elif isinstance(segment, DiscreteImage):
            document.add_discrete(doc, segment, vocab)
        elif isinstance(segment, ContinuousImage):
            document.add_continuous(doc, segment, vocab, placeholder_id, random_order, generator)
        elif isinstance(segment, HybridImage):
            document.add_hybrid(doc, segment, vocab, placeholder_id)
        else:
            raise doc.type_error(f"segments must be Text, DiscreteImage, ContinuousImage or HybridImage, "
                                 f"got {type(segment).__name__}")
    doc.segment = None
    if doc.length == 0:
        raise doc.error("the document has no tokens")
    return doc


def document_length(segments: Sequence[Segment], *, vocab: VocabLayout) -> int:
    """The number of tokens ``pack`` writes for one document (a list of segments): the row length
    it needs alone. Counted by laying the document out exactly as ``pack`` does, so the two never
    disagree; the same errors as ``pack`` for a document it refuses (continuous targets are
    counted unpermuted: a permutation changes no count)."""
    return _document(0, segments, vocab, 0, 0.0, None).length


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
        doc = _document(index, segments, vocab, placeholder_id, random_order, generator)
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
        spans = span_ids_of_runs(torch.cat(doc.bidirectional))  # numbered from 1 within the document
        span_ids[row, where] = torch.where(spans > 0, spans + (next_span - 1), 0)
        next_span += int(spans.max())
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
