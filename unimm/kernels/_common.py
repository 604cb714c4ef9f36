"""Small pieces every kernel family shares: argument predicates and checks, the CUDA device guard,
constants, and the Triton launch helpers. Models import the predicates from here too, so a rule
such as "an int is never a bool" is written once. Nothing here needs triton; the shared
``@triton.jit`` helpers are in ``unimm.kernels._triton``."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import weakref
from collections import OrderedDict
from collections.abc import Collection, Mapping

import torch

LOG2E = 1.4426950408889634  # log2(e): Triton kernels work in base 2 (exp2), scaling by this


def is_int(value) -> bool:
    """A Python or NumPy integer, never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A Python or NumPy real number (ints included), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_finite_real(name: str, value) -> None:
    """A real number (not a bool) that is finite: TypeError / ValueError naming ``name``."""
    if not is_real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_tensors(tensors: Mapping[str, object], *, like: tuple[str, torch.Tensor] | None = None,
                  floating: bool = False, dtypes: Collection[torch.dtype] | None = None,
                  kind: str = "a floating tensor", same_dtype: bool = False, dims: int | None = None,
                  layout: str = "") -> None:
    """The argument checks every kernel family makes, on each named tensor in order; the errors name
    the argument. Each must be a torch.Tensor (TypeError), floating with ``floating`` and of one of
    ``dtypes`` when given (TypeError "must be ``kind``"). With ``like = (name, tensor)``: on that
    tensor's device (ValueError), and of its dtype with ``same_dtype`` (TypeError). With ``dims``:
    that many dimensions (ValueError, quoting ``layout``). Shapes and values are the caller's."""
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if (floating and not value.is_floating_point()) or (dtypes is not None and value.dtype not in dtypes):
            raise TypeError(f"{name} must be {kind}, got {value.dtype}")
        if like is not None:
            like_name, like_tensor = like
            if same_dtype and value.dtype != like_tensor.dtype:
                raise TypeError(f"{name} must have {like_name}'s dtype {like_tensor.dtype}, got {value.dtype}")
            if value.device != like_tensor.device:
                raise ValueError(f"{name} is on {value.device} but {like_name} is on {like_tensor.device}")
        if dims is not None and value.dim() != dims:
            raise ValueError(f"{name} must be {dims}-D {layout}, got shape {tuple(value.shape)}")


def unserved_dtype(dtype: torch.dtype, served: Collection[torch.dtype]) -> str | None:
    """For ``dispatch.select``'s ``unsupported``: None when the kernels serve ``dtype``, else why not."""
    return None if dtype in served else f"dtype {dtype} is served by the reference only"


def check_head_dim(head_dim: int, name: str = "head_dim") -> None:
    """The head dims the attention kernels (prefill and decode) serve: a multiple of 8 in [16, 256]."""
    if head_dim < 16 or head_dim > 256 or head_dim % 8:
        raise ValueError(f"{name} must be a multiple of 8 in [16, 256], got {head_dim}")


def padded_head_dim(head_dim: int) -> int:
    """The power of two the attention kernels pad ``head_dim`` to (their ``BLOCK_D``): its columns
    past ``head_dim`` load as zeros and are never stored. Cost: the padded width's FLOPs on tensor
    cores (e.g. D = 80 or 96 run as 128: 1.6x / 1.33x the dot FLOPs), HBM bytes of the real width."""
    return 1 << (head_dim - 1).bit_length()


def device_guard(device: torch.device):
    """The context a launch on ``device`` runs in: that CUDA device current, or nothing on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capture_cuda_graph(step, device: torch.device, *, warmups: int = 1, reset=None):
    """Records one call of ``step()`` in a CUDA graph and returns ``(graph, what that call returned)``;
    ``graph.replay()`` then rewrites those tensors in place. ``step`` first runs ``warmups`` times on a
    side stream, so Triton compiles and autotunes outside the capture (a capture cannot launch a
    compiler), with ``reset()`` after each warm-up run to undo its side effects (a KV cache's lengths,
    say). The capture itself records and runs nothing."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            step()
            if reset is not None:
                reset()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def lru_per_owner(store: weakref.WeakKeyDictionary, owner, key, limit: int, make):
    """``store[owner][key]``, built by ``make()`` when missing: each owner (a module whose weights a
    captured CUDA graph reads) keeps its ``limit`` most recently used entries, and they go with it."""
    entries = store.setdefault(owner, OrderedDict())
    entry = entries.pop(key, None)
    if entry is None:
        while len(entries) >= limit:
            entries.popitem(last=False)
        entry = make()
    entries[key] = entry
    return entry


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
