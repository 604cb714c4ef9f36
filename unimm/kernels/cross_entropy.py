"""Fused linear + cross-entropy over large (expanded) vocabularies, forward and backward.

Public: ``linear_cross_entropy(hidden, weight, targets, *, bias, ignore_index, reduction,
label_smoothing, z_loss, softcap, token_weights, vocab_range, return_lse)``; its meaning is
``unimm.kernels.reference.cross_entropy``. ``W`` below is ``weight[lo:hi]``, V = hi - lo.

Triton design:
  1. ``_lse_kernel``: the tile product ``h @ W.T`` (+ bias, soft-cap) with an online
     log-sum-exp epilogue, as in flash-attention: per row the running max and sum of exp, the
     target logit and the sum of logits (label smoothing). Columns are split over a second grid
     axis when rows are few; a few torch ops merge the splits. Nothing N x V is stored. The loss
     is then a few O(N) torch ops.
  2. Gradients, V in column chunks of ``chunk_cols``: ``_matmul_kernel`` recomputes the logits of
     the chunk and its epilogue turns them straight into
     ``dx = c (p (1 + 2 z lse) - (1 - eps) [v = t] - eps / V) (1 - (x / softcap)^2)`` (c: upstream
     gradient times token weight) in the input dtype; then ``dW[chunk] = dx.T @ h`` is one GEMM
     over all N rows (dW accumulated inside the GEMM, written once), ``dH += dx @ W[chunk]`` goes
     into an fp32 ``[N, D]`` accumulator (re-read per chunk: N D bytes against
     4 N D chunk_cols flops) and ``dbias[chunk] = colsum(dx)``.
For a scalar loss ("mean", "sum") with gradients required, step 2 runs in the forward pass with a
unit upstream gradient and backward only scales the saved gradients; for "none" it runs in
backward with each row's upstream gradient. 8 N D V flops either way. The kernels and their
launches are ``unimm.kernels._cross_entropy_triton``; this module checks the arguments, dispatches,
and holds the custom ops with their autograd.

Dropped rows (target == ignore_index, or token weight 0) contribute exactly nothing, even when
their hidden row holds Inf or NaN: their dx is selected to 0 in the epilogue (not multiplied by a
zero coefficient), the dW GEMM loads their hidden rows as zeros (0 * Inf would be NaN), and their
dH rows are never accumulated. Their lse is still computed and returned. Vocabulary columns outside
``vocab_range`` are never read.

Memory beyond inputs and gradients: the dx workspace ``N x chunk_cols`` in the input dtype,
at most ``UNIMM_CE_WORKSPACE_MB`` MiB (default 1024, read at each call) unless a single 128-column
chunk needs more; the fp32 dH accumulator ``[N, D]``; per-split statistics ``4 x splits x N`` fp32
and O(N) per-row terms. No N x V tensor; ``vocab_range`` shrinks every term to V = hi - lo columns.

No host synchronisation: tensor values are checked only where that costs no device sync, on CPU
tensors (targets in range, no negative weight under "mean"); on a GPU such values have defined
results instead (reference module docstring): NaN where they land.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from unimm.kernels import dispatch
from unimm.kernels._common import check_tensors, is_int, is_real, unserved_dtype
from unimm.kernels.reference import cross_entropy as reference

try:
    from unimm.kernels import _cross_entropy_triton as triton_backend
except ImportError:  # no triton: the Triton backend is then not live (dispatch says why)
    triton_backend = None

REDUCTIONS = reference.REDUCTIONS
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WORKSPACE_ENV = "UNIMM_CE_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = 1024
# The dx workspace in bytes; None: ``UNIMM_CE_WORKSPACE_MB`` at each call (tests set a number).
WORKSPACE_BYTES: int | None = None
# Devices whose tensor values the argument checks read (free there: no device to wait for).
HOST_CHECKED_DEVICES = ("cpu",)
_INT64 = (-2**63, 2**63 - 1)


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         token_weights: torch.Tensor | None = None, vocab_range: tuple[int, int] | None = None,
                         return_lse: bool = False):
    """Cross-entropy of ``hidden @ weight.T`` (+ bias) against ``targets``, never forming N x V.

    Args:
        hidden: ``[N, D]`` or ``[..., D]`` (flattened) float16, bfloat16 or float32. D = 0 is
            allowed: every logit is then 0 (+ bias), so the loss of a row is log(V) without bias.
        weight: ``[V, D]`` output head (a slice or a tied embedding is fine), dtype of hidden.
        targets: integer ``[N]`` (or ``hidden.shape[:-1]``), any integer dtype, in ``[lo, hi)`` or
            ``ignore_index``.
        bias: optional ``[V]``, dtype of weight.
        ignore_index: an integer (int64 range); rows with that target are dropped.
        reduction: "mean" (over kept tokens, weighted; 0 when none is kept), "sum" or "none".
        label_smoothing: eps in [0, 1]; z_loss: coefficient of lse^2 (PaLM), finite, >= 0.
        softcap: Gemma-2 final-logit soft-capping ``c tanh(x / c)``, c finite and > 0, or None.
        token_weights: optional float ``[N]`` per-token loss weights. A row of weight 0 is
            dropped exactly like an ignored one. "mean" is ``sum(w l) / sum(w)`` and needs weights
            >= 0 (a negative one raises on CPU tensors; on a GPU it makes the loss and gradients
            NaN, as checking would cost a device sync); "sum" and "none" take any weights as given.
        vocab_range: ``(lo, hi)`` integers: the softmax runs over these columns only (e.g. image
            codes).
        return_lse: also return fp32 ``lse [N]`` of every row (dropped rows included).

    Returns:
        The loss (scalar, or ``targets.shape`` for "none"), and lse if ``return_lse``. Gradients
        flow to hidden, weight and bias in their own dtypes, accumulated in fp32.

    NaN and Inf in tensors are never checked: they propagate, as in PyTorch, to exactly the
    outputs that depend on them; dropped rows and columns outside ``vocab_range`` contribute
    nothing. A target outside ``vocab_range`` (not ``ignore_index``) raises on CPU tensors and
    acts as a NaN token weight on a GPU.
    """
    ignore_index, reduction, label_smoothing, z_loss, softcap, (lo, hi) = _check_args(
        hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, token_weights,
        vocab_range)
    n_rows, dim = math.prod(hidden.shape[:-1]), hidden.shape[-1]
    rows = hidden.reshape(n_rows, dim)
    flat_targets = targets.reshape(-1).long()  # any integer dtype; the kernels and gather want int64
    flat_weights = token_weights.reshape(-1) if token_weights is not None else None
    _check_values(flat_targets, flat_weights, lo, hi, ignore_index, reduction)
    workspace_bytes()  # a bad UNIMM_CE_WORKSPACE_MB is reported on every backend, before any work
    backend = dispatch.select("linear_cross_entropy", hidden.device, implemented=("triton",),
                              unsupported={"triton": unserved_dtype(hidden.dtype, _KERNEL_DTYPES)})
    if backend == "reference":
        # the reference's matmuls must run in its compute dtype, not an enclosing autocast's
        with torch.autocast(hidden.device.type, enabled=False):
            loss, lse = reference.linear_cross_entropy(
                rows, weight, flat_targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, token_weights=flat_weights,
                vocab_range=(lo, hi), return_lse=True, compute_dtype=torch.promote_types(hidden.dtype, torch.float32))
    else:
        if dim == 0:
            # Every logit is 0 (+ bias): the kernels see one zero column, and autograd slices its
            # gradient back to width 0.
            rows, weight = F.pad(rows, (0, 1)), F.pad(weight, (0, 1))
        wants = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (rows, weight, bias)]
        grads_now = wants if reduction != "none" else [False, False, False]
        loss, lse, *_ = _forward_op(rows, weight, bias, flat_targets, flat_weights, lo, hi, ignore_index, reduction,
                                    label_smoothing, z_loss, softcap, grads_now)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    if return_lse:
        return loss, lse.reshape(targets.shape)
    return loss


def workspace_bytes() -> int:
    """The dx workspace limit: ``WORKSPACE_BYTES`` if set, else ``UNIMM_CE_WORKSPACE_MB`` MiB."""
    if WORKSPACE_BYTES is not None:
        return WORKSPACE_BYTES
    raw = os.environ.get(WORKSPACE_ENV, "").strip()
    if not raw:
        return DEFAULT_WORKSPACE_MB << 20
    try:
        megabytes = int(raw)
    except ValueError:
        megabytes = 0
    if megabytes <= 0:
        raise ValueError(f"{WORKSPACE_ENV} must be a positive whole number of MiB (default {DEFAULT_WORKSPACE_MB}), "
                         f"got {raw!r}")
    return megabytes << 20


def _real(name: str, value, expected: str, ok) -> float:
    """``value`` as a float when it is a real number (not a bool) and ``ok(value)`` holds, else an
    error naming ``name`` and ``expected``."""
    if not is_real(value):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and ok(value)):
        raise ValueError(f"{name} must be {expected}, got {value}")
    return value


def _integer(name: str, value) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    return int(value)


def _check_args(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
                token_weights, vocab_range):
    """Checks every argument without reading tensor data; returns the scalar options as plain
    Python values: (ignore_index, reduction, label_smoothing, z_loss, softcap, (lo, hi))."""
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
    ignore_index = _integer("ignore_index", ignore_index)
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    label_smoothing = _real("label_smoothing", label_smoothing, "a finite number in [0, 1]", lambda v: 0 <= v <= 1)
    z_loss = _real("z_loss", z_loss, "a finite number >= 0", lambda v: v >= 0)
    if softcap is not None:
        softcap = _real("softcap", softcap, "a finite number > 0 (or None)", lambda v: v > 0)
    if vocab_range is None:
        lo, hi = 0, vocab
    else:
        if isinstance(vocab_range, (str, bytes, torch.Tensor)) or not hasattr(vocab_range, "__iter__"):
            raise TypeError(f"vocab_range must be a pair (lo, hi) of integers, got {type(vocab_range).__name__} "
                            f"{vocab_range!r}")
        pair = tuple(vocab_range)
        if len(pair) != 2:
            raise ValueError(f"vocab_range must be a pair (lo, hi) of integers, got {len(pair)} values {vocab_range!r}")
        lo, hi = (_integer("vocab_range", end) for end in pair)
        if not 0 <= lo < hi <= vocab:
            raise ValueError(f"vocab_range must be (lo, hi) with 0 <= lo < hi <= V = {vocab}, got {vocab_range}")
    return ignore_index, reduction, label_smoothing, z_loss, softcap, (lo, hi)


def _check_values(targets, token_weights, lo, hi, ignore_index, reduction):
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


# ---------------------------------------------------------------------------------------------
# Ops (opaque to torch.compile) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("unimm::linear_cross_entropy", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                token_weights: torch.Tensor | None, lo: int, hi: int, ignore_index: int, reduction: str,
                label_smoothing: float, z_loss: float, softcap: float | None,
                grads_now: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, lse, dh, dw, db). With ``grads_now`` (only for a scalar loss) the gradients of a unit
    upstream gradient are computed in the same pass, no recompute, and backward scales them;
    gradients not computed come back empty."""
    kept, column, weights, total_weight = _row_terms(targets, token_weights, lo, hi, ignore_index, reduction)
    row_scale = (1.0 / total_weight).reshape(1).expand(hidden.shape[0]) if any(grads_now) else None
    (lse, target_logit, logit_sum), grads = triton_backend.run_chunks(
        hidden, weight[lo:hi], bias[lo:hi] if bias is not None else None, column, weights, row_scale,
        label_smoothing, z_loss, softcap, tuple(grads_now), workspace_bytes())
    ce = (1.0 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - logit_sum / (hi - lo))
    # selected, not multiplied: a dropped row's lse may be Inf or NaN
    loss = torch.where(kept, weights * (ce + z_loss * lse.square()), 0.0)
    if reduction == "mean":
        loss = loss.sum() / total_weight
    elif reduction == "sum":
        loss = loss.sum()
    return (loss, lse, *(g if g is not None else hidden.new_empty(0) for g in grads))


@_forward_op.register_fake
def _(hidden, weight, bias, targets, token_weights, lo, hi, ignore_index, reduction, label_smoothing, z_loss,
      softcap, grads_now):
    n, d = hidden.shape
    f32 = dict(dtype=torch.float32)
    loss = hidden.new_empty((n,) if reduction == "none" else (), **f32)
    shapes = ((n, d), (hi - lo, d), (hi - lo,))
    dtypes = (hidden.dtype, torch.float32, torch.float32)
    grads = [hidden.new_empty(shape if now else (0,), dtype=dtype)
             for shape, dtype, now in zip(shapes, dtypes, grads_now)]
    return (loss, hidden.new_empty((n,), **f32), *grads)


@torch.library.custom_op("unimm::linear_cross_entropy_backward", mutates_args=())
def _backward_op(grad_loss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, token_weights: torch.Tensor | None, lo: int, hi: int, ignore_index: int,
                 reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
                 wants: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dw, db) when the gradients were not computed with the loss (reduction "none"): the
    chunks run again with each row's upstream gradient."""
    _, column, weights, total_weight = _row_terms(targets, token_weights, lo, hi, ignore_index, reduction)
    row_scale = grad_loss.float().reshape(-1)
    if reduction != "none":
        row_scale = (row_scale / total_weight).expand(hidden.shape[0])
    _, grads = triton_backend.run_chunks(hidden, weight[lo:hi], bias[lo:hi] if bias is not None else None, column,
                                         weights, row_scale, label_smoothing, z_loss, softcap, tuple(wants),
                                         workspace_bytes())
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_backward_op.register_fake
def _(grad_loss, hidden, weight, bias, targets, token_weights, lo, hi, ignore_index, reduction, label_smoothing,
      z_loss, softcap, wants):
    shapes = (tuple(hidden.shape), (hi - lo, hidden.shape[1]), (hi - lo,))
    dtypes = (hidden.dtype, torch.float32, torch.float32)
    return tuple(hidden.new_empty(shape if want else (0,), dtype=dtype)
                 for shape, dtype, want in zip(shapes, dtypes, wants))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, token_weights, lo, hi, ignore_index, reduction, label_smoothing, z_loss,
     softcap, grads_now) = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.grads_now = any(grads_now)
    ctx.vocab = (lo, hi, weight.shape[0])
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    if ctx.grads_now:
        ctx.save_for_backward(*output[2:])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, token_weights)


def _backward(ctx, grad_loss, *unused):
    lo, hi, vocab = ctx.vocab
    wants = [bool(w) for w in ctx.needs_input_grad[:3]]
    if ctx.grads_now:
        # Out of place: the saved gradients stay valid for a second backward (retain_graph), and
        # torch.compile can trace it.
        grads = [g * grad_loss.to(g.dtype) if want else None for g, want in zip(ctx.saved_tensors, wants)]
    else:
        # The kernels' gradients are not differentiable again: the op sees detached tensors.
        hidden, weight, bias, targets, token_weights = (t.detach() if t is not None else None
                                                        for t in ctx.saved_tensors)
        grads = _backward_op(grad_loss.detach(), hidden, weight, bias, targets, token_weights, lo, hi, *ctx.options,
                             wants)
        grads = [g if want else None for g, want in zip(grads, wants)]
    dh, dw, db = grads
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    dh = dh.to(hidden_dtype) if dh is not None else None
    dw = _full_rows(dw, lo, vocab).to(weight_dtype) if dw is not None else None
    db = _full_rows(db, lo, vocab).to(bias_dtype) if db is not None else None
    return dh, dw, db, None, None, None, None, None, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _row_terms(targets, token_weights, lo, hi, ignore_index, reduction):
    """``reference.row_terms`` (which rows are kept, their weights, the normaliser of the
    reduction) with the kernels' column: the target's column in the head, -1 for a dropped row
    (int32)."""
    kept, column, weights, total = reference.row_terms(targets, token_weights, lo, hi, ignore_index, reduction)
    return kept, torch.where(kept, column, -1).to(torch.int32), weights, total


def _full_rows(block: torch.Tensor, lo: int, vocab: int) -> torch.Tensor:
    """The gradient of a whole ``[V, ...]`` parameter from that of its rows ``[lo, lo + len)``."""
    if block.shape[0] == vocab:
        return block
    full = block.new_zeros((vocab, *block.shape[1:]))
    full[lo:lo + block.shape[0]] = block
    return full
