"""The demo's procedural data set: one coloured shape at a position on a plain background.

Every image is ``image_size`` x ``image_size`` RGB (uint8, channels last) holding one shape
(circle, square or triangle) in one palette colour, in one of five places (a quadrant or the
center), with a random size and offset inside its place, on a dark or light background. Its
caption names the three attributes: ``"a red circle at the top left"``, ``"a blue square in the
center"``; the background is left out, so text-to-image is free to pick either.

Everything follows from a seed: ``make_shapes(n, seed, split="train")`` and ``split="test"`` draw
from independent streams, so the held-out set is new images of the *same* attribute
combinations (all 90 appear in training). No combination is held out: a model this small,
trained for minutes, is not expected to compose unseen colour / shape / position triples, so
held-out combinations would measure something the demo does not claim.

``judge(image)`` reads an image back (a generated one, noisy and blurred) into its attributes,
by rules: the background is the median of the border pixels; the shape is the largest connected
region of pixels far from it; its colour is the nearest palette colour to the region's median,
its position the quadrant (or center) of its bounding box's centre, and its shape the template
(disc, square, upward triangle) of the region's area and centroid that overlaps it best
(intersection over union).

``WordTokenizer`` is the word-level text vocabulary of captions and prompts.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

# RGB corners of the colour cube, pulled in from the extremes: every pair is >= 130 apart
# (of 255 * sqrt(3)), and every colour >= 185 from either background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 210),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"dark": (24, 24, 28), "light": (232, 232, 226)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
# How a caption says where the shape is.
_POSITION_PHRASES = {position: ("in the center" if position == "center" else f"at the {position}")
                     for position in POSITIONS}

CAPTION_PROMPT = "describe the image"  # captioning: image, then this prompt, then the caption
DRAW_PROMPT = "draw"  # text-to-image: this word, then the caption (alone: the unconditional prompt)

# judge(): templates are drawn at this many sub-pixels per pixel side, for fractional coverage
_TEMPLATE_SUPERSAMPLE = 4
# area of each shape over its box's area (side 2 * half): what sizes a template to a region's area
_AREA_OVER_BOX = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class ShapesConfig:
    """What the procedural images may hold.

    Attributes:
        image_size: side in pixels (a multiple of 8, at least 16).
        colours, shapes, positions: the names used, from ``COLOURS``, ``SHAPES``, ``POSITIONS``.
        size_range: the shape's side as fractions of ``image_size`` (uniform); at most 0.42 so
            a shape fits its quadrant with a margin.
        colour_jitter: each channel of the shape and background colours moves by up to this much.
        margin: pixels kept free between a shape and the image border / the image's midlines.
        center_jitter: how far (pixels) a centered shape may sit off the image centre.
    """

    image_size: int = 32
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    positions: tuple[str, ...] = POSITIONS
    size_range: tuple[float, float] = (0.3, 0.42)
    colour_jitter: int = 12
    margin: float = 1.0
    center_jitter: float = 1.5

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size < 16 or self.image_size % 8:
            raise ValueError(f"image_size must be an int multiple of 8, >= 16, got {self.image_size!r}")
        for name, chosen, known in (("colours", self.colours, tuple(COLOURS)), ("shapes", self.shapes, SHAPES),
                                    ("positions", self.positions, POSITIONS)):
            unknown = [value for value in chosen if value not in known]
            if not chosen or unknown or len(set(chosen)) != len(chosen):
                raise ValueError(f"{name} must be distinct names from {known}, got {chosen!r}")
        low, high = self.size_range
        if not 0.1 <= low <= high <= 0.42:
            raise ValueError(f"size_range must be (low, high) with 0.1 <= low <= high <= 0.42, got {self.size_range!r}")
        if not 0 <= self.colour_jitter <= 30:
            raise ValueError(f"colour_jitter must be in [0, 30], got {self.colour_jitter!r}")


@dataclass
class ShapeSet:
    """``n`` images and their attributes, as indices into the config's name tuples."""

    config: ShapesConfig
    images: np.ndarray  # uint8 [n, H, W, 3]
    colour: np.ndarray  # int64 [n], index into config.colours
    shape: np.ndarray  # int64 [n], index into config.shapes
    position: np.ndarray  # int64 [n], index into config.positions
    background: np.ndarray  # int64 [n], index into BACKGROUNDS
    captions: list[str] = field(init=False)

    def __post_init__(self):
        self.captions = [caption(*self.labels(i)) for i in range(len(self))]

    def __len__(self) -> int:
        return self.images.shape[0]

    def labels(self, i: int) -> tuple[str, str, str]:
        """(colour, shape, position) names of image ``i``."""
        return (self.config.colours[self.colour[i]], self.config.shapes[self.shape[i]],
                self.config.positions[self.position[i]])


def caption(colour: str, shape: str, position: str) -> str:
    """``"a red circle at the top left"``, ``"a blue square in the center"``."""
    return f"a {colour} {shape} {_POSITION_PHRASES[position]}"


def parse_caption(text: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, position) named in ``text``, None for each one it does not name exactly once."""
    words = text.split()

    def single(found):
        return found[0] if len(found) == 1 else None

    colour = single([word for word in words if word in COLOURS])
    shape = single([word for word in words if word in SHAPES])
    vertical = single([word for word in words if word in ("top", "bottom")])
    horizontal = single([word for word in words if word in ("left", "right")])
    if "center" in words:
        position = "center" if vertical is None and horizontal is None else None
    else:
        position = f"{vertical} {horizontal}" if vertical and horizontal else None
    return colour, shape, position


def _outlines(x: np.ndarray, y: np.ndarray, half: np.ndarray) -> dict[str, np.ndarray]:
    """Shape name -> whether points (``x``, ``y``, relative to the box centre) lie inside that
    shape drawn in a box of side ``2 * half``: the disc, the box, the upward triangle."""
    inside_box = (np.abs(x) <= half) & (np.abs(y) <= half)
    return {
        "circle": x**2 + y**2 <= half**2,
        "square": inside_box,
        "triangle": inside_box & (np.abs(x) <= (y + half) / 2),  # apex at the box's top, base at its bottom
    }


def _split_stream(seed: int, split: str) -> np.random.Generator:
    splits = ("train", "test")
    if split not in splits:
        raise ValueError(f"split must be one of {splits}, got {split!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return np.random.default_rng([int(seed), splits.index(split)])


def make_shapes(n: int, seed: int = 0, *, split: str = "train", config: ShapesConfig | None = None) -> ShapeSet:
    """``n`` images with uniformly drawn attributes, fully determined by (``seed``, ``split``);
    the train and test streams of one seed are independent."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    config = config or ShapesConfig()
    rng = _split_stream(seed, split)
    size = config.image_size
    colour = rng.integers(len(config.colours), size=n)
    shape = rng.integers(len(config.shapes), size=n)
    position = rng.integers(len(config.positions), size=n)
    background = rng.integers(len(BACKGROUNDS), size=n)

    side = rng.uniform(*config.size_range, size=n) * size
    half = side / 2
    # centre of the shape's box: inside its quadrant, `margin` from the border and the midlines
    low = config.margin + half
    high = size / 2 - config.margin - half
    along = low[:, None] + rng.uniform(size=(n, 2)) * (high - low)[:, None]  # from the near border, x and y
    center = size / 2 + rng.uniform(-config.center_jitter, config.center_jitter, size=(n, 2))
    names = np.array(config.positions)[position]
    cx = np.select([np.char.endswith(names, "left"), np.char.endswith(names, "right")],
                   [along[:, 0], size - along[:, 0]], center[:, 0])
    cy = np.select([np.char.startswith(names, "top"), np.char.startswith(names, "bottom")],
                   [along[:, 1], size - along[:, 1]], center[:, 1])

    grid = np.arange(size) + 0.5  # pixel centres
    outlines = _outlines(grid[None, None, :] - cx[:, None, None], grid[None, :, None] - cy[:, None, None],
                         half[:, None, None])
    names = np.array(config.shapes)[shape]
    mask = np.zeros((n, size, size), dtype=bool)
    for name, shape_mask in outlines.items():
        mask |= shape_mask & (names == name)[:, None, None]

    palette = np.array([COLOURS[name] for name in config.colours], dtype=np.int64)
    backdrop = np.array(list(BACKGROUNDS.values()), dtype=np.int64)
    jitter_range = (-config.colour_jitter, config.colour_jitter + 1)
    fg = palette[colour] + rng.integers(*jitter_range, size=(n, 3))
    bg = backdrop[background] + rng.integers(*jitter_range, size=(n, 3))
    images = np.where(mask[..., None], fg[:, None, None, :], bg[:, None, None, :])
    return ShapeSet(config=config, images=np.clip(images, 0, 255).astype(np.uint8),
                    colour=colour, shape=shape, position=position, background=background)


# ---------------------------------------------------------------------------------------------
# Reading an image back
# ---------------------------------------------------------------------------------------------

class Judgement(NamedTuple):
    """What ``judge`` reads from an image; every field is None when it finds no shape."""

    colour: str | None
    shape: str | None
    position: str | None


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of ``mask`` (a breadth-first flood fill; images are tiny)."""
    height, width = mask.shape
    label = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for start in zip(*np.nonzero(mask)):
        if label[start]:
            continue
        current += 1
        label[start] = current
        queue, count = deque([start]), 0
        while queue:
            row, col = queue.popleft()
            count += 1
            for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if 0 <= r < height and 0 <= c < width and mask[r, c] and not label[r, c]:
                    label[r, c] = current
                    queue.append((r, c))
        if count > best_size:
            best, best_size = current, count
    return label == best if best else np.zeros_like(mask)


def _template_overlap(region: np.ndarray, shape: str, cx: float, cy: float) -> float:
    """Intersection over union of ``region`` with ``shape`` of the same area and centroid
    (``cx``, ``cy`` in pixels), the template's coverage of each pixel counted fractionally."""
    half = math.sqrt(region.sum() / _AREA_OVER_BOX[shape]) / 2
    if shape == "triangle":
        cy -= half / 3  # the triangle's centroid is a third of a half-side below its box's centre
    steps = _TEMPLATE_SUPERSAMPLE
    height, width = region.shape
    ys = (np.arange(height * steps) + 0.5) / steps - cy
    xs = (np.arange(width * steps) + 0.5) / steps - cx
    inside = _outlines(xs[None, :], ys[:, None], half)[shape]
    coverage = inside.reshape(height, steps, width, steps).mean(axis=(1, 3))
    return float(np.minimum(region, coverage).sum() / np.maximum(region, coverage).sum())


def judge(image: np.ndarray, *, colours: tuple[str, ...] = tuple(COLOURS), threshold: float = 80.0,
          min_pixels: int = 6) -> Judgement:
    """(colour, shape, position) of the one shape in ``image`` (uint8 or float 0..255, [H, W, 3]).

    Foreground: pixels farther than ``threshold`` (RGB distance, 0..255 scale) from the
    background, which is the per-channel median of the border pixels; only the largest connected
    region counts, so specks of noise elsewhere do not. That region is then cut again half-way
    between the background and its median colour (when that is above ``threshold``), so a
    blurred edge falls where the sharp one was. Fewer than ``min_pixels`` foreground
    pixels: no shape (all fields None). ``colours``: the palette names to choose from.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"image must be [H, W, 3] with H, W >= 8, got shape {image.shape}")
    unknown = [name for name in colours if name not in COLOURS]
    if not colours or unknown:
        raise ValueError(f"colours must be names from {tuple(COLOURS)}, got {colours!r}")
    pixels = image.astype(np.float64)
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    region = _largest_component(distance > threshold)
    if region.sum() < min_pixels:
        return Judgement(None, None, None)
    # Again at half-way between the background and the shape's colour, so that a blurred edge
    # splits where a sharp one would have been.
    median = np.median(pixels[region], axis=0)
    region = _largest_component(distance > max(threshold, np.linalg.norm(median - background) / 2))
    area = int(region.sum())
    if area < min_pixels:
        return Judgement(None, None, None)

    palette = np.array([COLOURS[name] for name in colours], dtype=np.float64)
    median = np.median(pixels[region], axis=0)
    colour = colours[int(np.linalg.norm(palette - median, axis=-1).argmin())]

    rows, cols = np.nonzero(region)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    height, width = image.shape[:2]
    dx = (left + right) / 2 - width / 2
    dy = (top + bottom) / 2 - height / 2
    if max(abs(dx), abs(dy)) * 32 / min(height, width) < 3.5:  # center shapes sit within 1.5 px (at 32)
        position = "center"
    else:
        position = f"{'top' if dy < 0 else 'bottom'} {'left' if dx < 0 else 'right'}"

    shape = max(SHAPES, key=lambda name: _template_overlap(region, name, cols.mean() + 0.5, rows.mean() + 0.5))
    return Judgement(colour, shape, position)


def attribute_accuracy(predicted: list[tuple], expected: list[tuple]) -> dict[str, float]:
    """Fractions of (colour, shape, position) triples right per attribute, and all three at once."""
    if len(predicted) != len(expected) or not expected:
        raise ValueError(f"predicted and expected must be equally long and non-empty, got {len(predicted)} "
                         f"and {len(expected)}")
    right = np.array([[p == e for p, e in zip(pred, want)] for pred, want in zip(predicted, expected)])
    return dict(colour=float(right[:, 0].mean()), shape=float(right[:, 1].mean()),
                position=float(right[:, 2].mean()), all=float(right.all(axis=1).mean()))


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

class WordTokenizer:
    """Word-level ids for captions and prompts: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, then every
    word a caption or prompt can use, in a fixed order (so ids do not depend on a config)."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self):
        words = ["a", "at", "the", "in"] + CAPTION_PROMPT.split() + DRAW_PROMPT.split()
        words += list(COLOURS) + list(SHAPES) + ["top", "bottom", "left", "right", "center"]
        self.vocab = list(self.SPECIALS) + list(dict.fromkeys(words))
        self.ids = {word: i for i, word in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = (self.ids[token] for token in self.SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of the whitespace-separated words of ``text``; unknown words raise ValueError."""
        unknown = [word for word in text.split() if word not in self.ids]
        if unknown:
            raise ValueError(f"text has words outside the vocabulary: {unknown}")
        return [self.bos_id] * bos + [self.ids[word] for word in text.split()] + [self.eos_id] * eos

    def decode(self, ids) -> str:
        """Words of ``ids`` up to the first ``<eos>``, skipping ``<pad>`` / ``<bos>``; ids outside the
        vocabulary (e.g. image codes) are skipped too."""
        words = []
        for token in (int(i) for i in ids):
            if token == self.eos_id:
                break
            if token in (self.pad_id, self.bos_id) or not 0 <= token < len(self.vocab):
                continue
            words.append(self.vocab[token])
        return " ".join(words)
