"""Small pieces every Triton kernel family shares."""

from __future__ import annotations

import functools

import torch


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision. fp32 follows ``torch.get_float32_matmul_precision()`` as torch's
    own matmuls do: "highest" (torch's default) -> 3xTF32 (about fp32 accuracy), else plain TF32.
    Ignored for 16-bit operands."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # CPU (interpreter): a few programs, so tests exercise split reductions
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_columns(row_blocks: int, columns: int, tile: int, device: torch.device) -> tuple[int, int]:
    """(splits, columns_per_split) for a kernel that gives each program a block of rows and a
    range of columns: enough programs for ~4 per SM, each range a whole number of tiles and
    non-empty (the last may be partial)."""
    tiles = cdiv(columns, tile)
    wanted = max(1, cdiv(4 * multiprocessor_count(device), row_blocks))
    tiles_per_split = cdiv(tiles, min(tiles, wanted, 65535))
    return cdiv(tiles, tiles_per_split), tiles_per_split * tile
