"""One document's tokens: how ``pack`` lays out each segment (``unimm.models.sequence`` describes the
layouts and conventions), and the host-side checks of everything that decides the layout.

A :class:`Document` collects token-level arrays segment by segment; ``add_text``,
``add_discrete``, ``add_continuous`` and ``add_hybrid`` append one segment each, raising errors
that name the document and the segment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from unimm.kernels._common import is_int, is_real
from unimm.models.vocab import Head, ImageFormat, VocabLayout


class Document:
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


def _int_like(value) -> bool:
    """An int (``is_int``) or a 0-dim integer tensor; never a bool, a float or a string."""
    if isinstance(value, torch.Tensor):
        return value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)
    return is_int(value)


def _ids(values, doc: Document, what: str, noun: str = "token id") -> torch.Tensor:
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
        bad = next((i for i, v in enumerate(values) if not _int_like(v)), None)
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


def _size_ids(vocab: VocabLayout, fmt: ImageFormat, shape: tuple[int, int] | None, doc: Document) -> torch.Tensor:
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


def _check_flags(doc: Document, segment, loss: bool, weight: float) -> float:
    """The loss weight of the segment's tokens (0 without loss); checks the segment's flags,
    ``encoder`` and ``format`` where it has them."""
    name = type(segment).__name__
    for flag in ("loss", "bidirectional"):
        value = getattr(segment, flag, False)
        if not isinstance(value, bool):
            raise doc.type_error(f"{name}.{flag} must be True or False, got {value!r}")
    if hasattr(segment, "format") and not isinstance(segment.format, ImageFormat):
        raise doc.type_error(f"{name}.format must be an ImageFormat, got {type(segment.format).__name__}")
    encoder = getattr(segment, "encoder", "image")
    if not (isinstance(encoder, str) and encoder):
        raise doc.type_error(f"{name}.encoder must be an input projector's name (a non-empty str), got {encoder!r}")
    if loss and segment.bidirectional:
        raise doc.error(f"a bidirectional {name} cannot carry a loss: its tokens would see the tokens they predict")
    if not loss:
        return 0.0
    if not (is_real(weight) and 0 < weight < math.inf):
        raise doc.error(f"{name}.weight must be a positive finite number, got {weight!r}")
    return float(weight)


def _check_codes(doc: Document, codes, vocab: VocabLayout, name: str) -> torch.Tensor:
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


def _check_features(doc: Document, features, name: str) -> None:
    if not isinstance(features, torch.Tensor) or not features.is_floating_point():
        raise doc.error(f"{name}.features must be a floating torch.Tensor [L, F]")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise doc.error(f"{name}.features must be [L, F] with L, F >= 1, got shape {tuple(features.shape)}")


def _check_shape(doc: Document, shape, length: int, name: str) -> tuple[int, int] | None:
    if shape is None:
        return None
    if not (isinstance(shape, Sequence) and len(shape) == 2 and all(_int_like(s) and s >= 1 for s in shape)
            and shape[0] * shape[1] == length):
        raise doc.error(f"{name}.shape must be (h, w) with h * w = {length} features, got {shape!r}")
    return int(shape[0]), int(shape[1])


def add_text(doc: Document, segment, vocab: VocabLayout) -> None:
    """Appends a ``Text`` segment: its ids, as given."""
    weight = _check_flags(doc, segment, segment.loss, segment.weight)
    ids = _ids(segment.ids, doc, "Text.ids")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab.image_codes[0]):
        raise doc.error(f"Text ids must be in the text and special blocks [0, {vocab.image_codes[0]}), got values "
                        f"in [{int(ids.min())}, {int(ids.max())}]; image codes belong in a DiscreteImage")
    doc.add(ids, Head.TEXT, weight, segment.bidirectional)


def _open_image(doc: Document, fmt: ImageFormat, shape, vocab: VocabLayout, weight: float,
                bidirectional: bool) -> tuple[int, int | None]:
    """Numbers a new image in ``doc`` and writes its begin, size and image tokens; returns (image
    index in the document, end-of-line id or None)."""
    image = doc.num_images
    doc.num_images += 1
    opening = [_specials(vocab, fmt.begin), _size_ids(vocab, fmt, shape, doc), _specials(vocab, fmt.image_token)]
    doc.add(torch.cat(opening), Head.TEXT, weight, bidirectional)
    return image, vocab.special_id(fmt.end_of_line) if fmt.end_of_line else None


def add_discrete(doc: Document, segment, vocab: VocabLayout) -> None:
    """Appends a ``DiscreteImage``: opening tokens, its code rows (each followed by EOL when the
    format has one), closing tokens."""
    weight = _check_flags(doc, segment, segment.loss, segment.weight)
    codes = _check_codes(doc, segment.codes, vocab, "DiscreteImage")
    fmt, (h, w) = segment.format, codes.shape
    bidirectional = segment.bidirectional
    image, eol = _open_image(doc, fmt, (h, w), vocab, weight, bidirectional)
    ids, kinds, grid, _ = _grid_body(vocab.code_ids(codes.reshape(-1)), Head.IMAGE_CODE, torch.arange(h * w), w, eol,
                                     image)
    doc.add(ids, kinds, weight, bidirectional, grid)
    doc.add(_specials(vocab, fmt.end_of_frame, fmt.end), Head.TEXT, weight, bidirectional)


def add_continuous(doc: Document, segment, vocab: VocabLayout, placeholder_id: int,
                   random_order: float, generator: torch.Generator | None) -> None:
    """Appends a ``ContinuousImage``: opening tokens, its tokens (permuted by ``order`` or a random order
    for a target), closing tokens; its features become inputs (and targets for role "target")."""
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


def add_hybrid(doc: Document, segment, vocab: VocabLayout, placeholder_id: int) -> None:
    """Appends a ``HybridImage``: its codes, then (fusion "sequence") its features, or (fusion "add") its
    features added to the codes' embeddings."""
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
