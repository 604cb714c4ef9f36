"""The argument checks of ``unimm.kernels.cross_entropy.linear_cross_entropy``: every argument's
type, shape and range without reading tensor data, and the value checks that read it where that
costs no device sync."""

from __future__ import annotations

import math

import torch

from unimm.kernels._common import check_tensors, is_int, is_real
from unimm.kernels.reference import cross_entropy as reference

# Devices whose tensor values the argument checks read (free there: no device to wait for).
HOST_CHECKED_DEVICES = ("cpu",)
_INT64 = (-2**63, 2**63 - 1)


def real(name: str, value, expected: str, ok) -> float:
    """``value`` as a float when it is a real number (not a bool) and ``ok(value)`` holds, else an
    error naming ``name`` and ``expected``."""
    if not is_real(value):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def integer(name: str, value) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def check_args(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                token_weights, vocab_range, global_vocab):
    """Checks every argument without reading tensor data; returns the scalar options as plain
    Python values: (ignore_index, reduction, label_smoothing, z_loss, softcap, (lo, hi)).
    ``vocab_range`` is checked against ``global_vocab`` (all shards' rows; None: weight's)."""
    check_tensors({"hidden": hidden})
    optional = {name: t for name, t in (("bias", bias), ("token_weights", token_weights)) if t is not None}
    check_tensors({"weight": weight, "targets": targets, **optional}, like=("hidden", hidden))
    check_tensors({"hidden": hidden, "weight": weight}, floating=True)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have the dtype of hidden ({hidden.dtype}), got {weight.dtype}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"hidden must be [..., D] and weight [V, D] with the same D, got hidden {tuple(hidden.shape)} "
                         f"and weight {tuple(weight.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    n_rows = math.prod(hidden.shape[:-1])
    if targets.shape != hidden.shape[:-1] and tuple(targets.shape) != (n_rows,):
        raise ValueError(f"targets must have shape {tuple(hidden.shape[:-1])} (hidden's rows), "
                         f"got {tuple(targets.shape)}")
    vocab = weight.shape[0]
    if vocab == 0:
        raise ValueError(f"weight must have at least one row (V >= 1), got {tuple(weight.shape)}")
    if bias is not None:
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must be [V] = [{vocab}], got {tuple(bias.shape)}")
    if token_weights is not None:
        if not token_weights.is_floating_point():
            raise TypeError(f"token_weights must be a floating tensor, got {token_weights.dtype}")
        if token_weights.shape != targets.shape and tuple(token_weights.shape) != (targets.numel(),):
            raise ValueError(f"token_weights must have one weight per target ({tuple(targets.shape)}), "
                             f"got {tuple(token_weights.shape)}")
    ignore_index = integer("ignore_index", ignore_index)
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(reduction, str) or reduction not in reference.REDUCTIONS:
        raise ValueError(f"reduction must be one of {reference.REDUCTIONS}, got {reduction!r}")
    label_smoothing = real("label_smoothing", label_smoothing, "a finite number in [0, 1]", lambda v: 0 <= v <= 1)
    z_loss = real("z_loss", z_loss, "a finite number >= 0", lambda v: v >= 0)
    if softcap is not None:
        softcap = real("softcap", softcap, "a finite number > 0 (or None)", lambda v: v > 0)
    global_vocab = vocab if global_vocab is None else global_vocab
    if vocab_range is None:
        lo, hi = 0, global_vocab
    else:
        if isinstance(vocab_range, (str, bytes, torch.Tensor)) or not hasattr(vocab_range, "__iter__"):
            raise TypeError(f"vocab_range must be a pair (lo, hi) of integers, got {type(vocab_range).__name__} "
                            f"{vocab_range!r}")
        pair = tuple(vocab_range)
        if len(pair) != 2:
            raise ValueError(f"vocab_range must be a pair (lo, hi) of integers, got {len(pair)} values {vocab_range!r}")
        lo, hi = (integer("vocab_range", end) for end in pair)
        if not 0 <= lo < hi <= global_vocab:
            raise ValueError(f"vocab_range must be (lo, hi) with 0 <= lo < hi <= V = {global_vocab}, got {vocab_range}")
    return ignore_index, reduction, label_smoothing, z_loss, softcap, (lo, hi)


def check_values(targets, token_weights, lo, hi, ignore_index, reduction):
    """The checks that read tensor values: only on ``HOST_CHECKED_DEVICES`` (the CPU), where
    reading costs no device sync. Elsewhere the values get their defined results (the reference
    module docstring)."""
    if targets.device.type not in HOST_CHECKED_DEVICES or not targets.numel():
        return
    kept = targets != ignore_index
    outside = kept & ((targets < lo) | (targets >= hi))
    if outside.any():
        raise ValueError(f"targets must lie in vocab_range [{lo}, {hi}) or equal ignore_index ({ignore_index}), "
                         f"found {targets[outside][0].item()}")
    if token_weights is not None and reduction == "mean":
        negative = kept & (token_weights < 0)
        if negative.any():
            raise ValueError(f"token_weights must be >= 0 for reduction='mean' (it divides by their sum), found "
                             f"{token_weights[negative][0].item()}")
