"""Small pieces every Triton kernel family shares."""

from __future__ import annotations

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
