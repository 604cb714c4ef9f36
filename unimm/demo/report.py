"""What ``unimm demo`` leaves behind: a PNG grid of images with their prompts, a PNG of the loss
curves, ``metrics.json``, and a summary table for the terminal.

Drawn with Pillow alone (no plotting library): the curves are a few hundred line segments, and
the grid is nearest-neighbour upscaled pixels with text under each image.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

# Line colours for curves, in order (Tableau 10: distinct, readable on white)
LINE_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"]


def progress(iterable=None, *, desc: str, total: int | None = None, disable: bool = False, **kwargs):
    """The demo's progress bar (tqdm on stderr): one style for every long loop."""
    return tqdm(iterable, desc=desc, total=total, disable=disable, dynamic_ncols=True, leave=True, **kwargs)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> float:
    return draw.textlength(text, font=font)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (at word boundaries; explicit
    newlines kept)."""
    lines = []
    for paragraph in text.split("\n"):
        words, line = paragraph.split(), ""
        for word in words:
            candidate = f"{line} {word}".strip()
            if line and _text_width(draw, candidate, font) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def image_grid(images, labels: list[str], path: str | pathlib.Path, *, columns: int = 8, scale: int = 4,
               label_lines: int = 3, font_size: int = 11) -> pathlib.Path:
    """Saves ``images`` (uint8 ``[N, H, W, 3]``) as one PNG, ``columns`` per row, each upscaled
    ``scale`` times (nearest neighbour) with its label (wrapped, at most ``label_lines`` lines)
    underneath. Returns the path."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(labels) != images.shape[0] or not labels:
        raise ValueError(f"labels must give one text per image ({images.shape[0]}), got {len(labels)}")
    if columns < 1 or scale < 1 or label_lines < 1:
        raise ValueError(f"columns, scale and label_lines must be >= 1, got {columns}, {scale}, {label_lines}")
    font = _font(font_size)
    n, height, width = images.shape[:3]
    cell_w, cell_h = width * scale, height * scale
    pad, line_h = 6, font_size + 3
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    box_w, box_h = cell_w + 2 * pad, cell_h + 2 * pad + label_lines * line_h
    canvas = Image.new("RGB", (columns * box_w, rows * box_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * box_w + pad, (i // columns) * box_h + pad
        canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        lines = _wrap(draw, label, font, cell_w)
        if len(lines) > label_lines:
            lines = lines[:label_lines]
            while lines[-1] and _text_width(draw, lines[-1] + "...", font) > cell_w:
                lines[-1] = lines[-1][:-1]
            lines[-1] += "..."
        for j, line in enumerate(lines):
            draw.text((x, y + cell_h + 2 + j * line_h), line, fill="black", font=font)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _format_tick(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-2:
        return f"{value:.0e}"
    return f"{value:g}"


def smooth(values: list[float], window: int) -> list[float]:
    """Centred moving average over ``window`` points (fewer at the ends): no lag, unlike an EMA."""
    half = max(window, 1) // 2
    sums = np.concatenate([[0.0], np.cumsum(values)])
    out = []
    for i in range(len(values)):
        low, high = max(0, i - half), min(len(values), i + half + 1)
        out.append(float((sums[high] - sums[low]) / (high - low)))
    return out


def loss_curves(curves: dict[str, tuple[list[float], list[float]]], path: str | pathlib.Path, *,
                title: str = "training loss", log_scale: bool | None = None, smoothing: float = 0.04,
                size: tuple[int, int] = (900, 520)) -> pathlib.Path:
    """Saves a line plot of ``curves`` (name -> (steps, values)) as a PNG: the raw values faint,
    their centred moving average over ``smoothing`` (a fraction in [0, 1)) of the points solid,
    a legend, axes with round ticks.
    ``log_scale``: y on a log10 axis; None picks it when every value is positive and they span
    more than a factor of 10. Non-finite values are skipped. Returns the path."""
    if not curves:
        raise ValueError("curves must hold at least one (steps, values) series")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    series = {}
    for name, (steps, values) in curves.items():
        if len(steps) != len(values):
            raise ValueError(f"curve {name!r}: steps and values differ in length ({len(steps)} vs {len(values)})")
        kept = [(float(s), float(v)) for s, v in zip(steps, values) if math.isfinite(v)]
        if kept:
            series[name] = kept
    all_values = [v for points in series.values() for _, v in points]
    if log_scale is None:
        log_scale = bool(all_values) and min(all_values) > 0 and max(all_values) / min(all_values) > 10
    if log_scale and any(v <= 0 for v in all_values):
        raise ValueError("log_scale needs every value > 0")

    def y_of(value):
        return math.log10(value) if log_scale else value

    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    font, title_font = _font(12), _font(15)
    draw.text((width / 2, 10), title, fill="black", font=title_font, anchor="ma")
    steps = [s for points in series.values() for s, _ in points] or [0.0, 1.0]
    x_low, x_high = min(steps), max(steps)
    if x_high == x_low:
        x_high = x_low + 1
    ys = [y_of(v) for v in all_values] or [0.0, 1.0]
    y_low, y_high = min(ys), max(ys)
    if y_high == y_low:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    margin = 0.05 * (y_high - y_low)
    y_low, y_high = y_low - margin, y_high + margin

    def px(step, y):
        return (left + (step - x_low) / (x_high - x_low) * (width - left - right),
                height - bottom - (y - y_low) / (y_high - y_low) * (height - top - bottom))

    # axes, grid and ticks
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for tick in _nice_ticks(x_low, x_high, count=8):
        x, _ = px(tick, y_low)
        draw.line([x, top, x, height - bottom], fill="#e6e6e6")
        draw.text((x, height - bottom + 6), _format_tick(tick), fill="black", font=font, anchor="ma")
    if log_scale:
        y_ticks = [math.log10(m * 10.0**e) for e in range(math.floor(y_low), math.ceil(y_high) + 1) for m in (1, 2, 5)]
        y_ticks = [t for t in y_ticks if y_low <= t <= y_high]
        if len(y_ticks) < 2:
            y_ticks = _nice_ticks(y_low, y_high)
        labels = [_format_tick(10**t) for t in y_ticks]
    else:
        y_ticks = _nice_ticks(y_low, y_high)
        labels = [_format_tick(t) for t in y_ticks]
    for tick, label in zip(y_ticks, labels):
        _, y = px(x_low, tick)
        draw.line([left, y, width - right, y], fill="#e6e6e6")
        draw.text((left - 6, y), label, fill="black", font=font, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.text(((left + width - right) / 2, height - 18), "step", fill="black", font=font, anchor="ma")
    draw.text((8, top - 16), "loss (log scale)" if log_scale else "loss", fill="black", font=font)

    # lines
    for i, (name, points) in enumerate(series.items()):
        colour = LINE_COLOURS[i % len(LINE_COLOURS)]
        xs = [s for s, _ in points]
        raw = [y_of(v) for _, v in points]
        faint = tuple(int(255 - 0.3 * (255 - int(colour[k:k + 2], 16))) for k in (1, 3, 5))
        if len(points) > 1:
            draw.line([px(s, y) for s, y in zip(xs, raw)], fill=faint, width=1)
            window = int(smoothing * len(raw)) | 1
            draw.line([px(s, y) for s, y in zip(xs, smooth(raw, window))], fill=colour, width=2)
        else:
            x, y = px(xs[0], raw[0])
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)

    # legend, top right
    names = list(series)
    if names:
        legend_w = max(_text_width(draw, name, font) for name in names) + 36
        x0, y0 = width - right - legend_w - 8, top + 8
        draw.rectangle([x0, y0, x0 + legend_w, y0 + 18 * len(names) + 6], fill="white", outline="#999999")
        for i, name in enumerate(names):
            y = y0 + 12 + 18 * i
            draw.line([x0 + 6, y, x0 + 24, y], fill=LINE_COLOURS[i % len(LINE_COLOURS)], width=3)
            draw.text((x0 + 30, y), name, fill="black", font=font, anchor="lm")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _jsonable(value):
    """numpy / torch scalars and arrays to plain Python; non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "tolist"):  # numpy and torch, scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def write_metrics(path: str | pathlib.Path, metrics: dict) -> pathlib.Path:
    """Writes ``metrics`` as indented JSON (numpy / torch values made plain, NaN as null)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    return path


def summary_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A markdown table of ``rows`` (dicts) with padded columns, in the order given or first seen;
    floats with 4 significant digits, missing values and None as "-"."""
    if not rows:
        raise ValueError("rows must hold at least one dict")
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))

    def show(value):
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [[show(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    lines = ["| " + " | ".join(column.ljust(w) for column, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in cells]
    return "\n".join(lines)
