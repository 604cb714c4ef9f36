"""Fused linear + cross-entropy over large (expanded) vocabularies, forward and backward.

Public: ``linear_cross_entropy(hidden, weight, targets, *, bias, ignore_index, reduction,
label_smoothing, z_loss, softcap, token_weights, vocab_range, class_weights, return_lse,
return_accuracy, shift, process_group, grad_filter_eps)``; its meaning is ``unimm.kernels.reference.cross_entropy``.
``W`` below is ``weight[lo:hi]``, V = hi - lo, e the bytes of an element of hidden.

Triton design (kernels and launches: ``_cross_entropy_triton``; the O(N) loss algebra around them:
``_cross_entropy_terms``; the vocabulary-parallel path: ``_cross_entropy_parallel``):
  1. ``_lse_kernel``: the tile product ``h @ W.T`` (+ bias, soft-cap) with an online
     log-sum-exp epilogue, as in flash-attention: per row the running max and sum of exp, the
     target logit and the (class-weighted) sum of logits (label smoothing). Columns are split over
     a second grid axis when rows are few; a few torch ops merge the splits. The row max m and the
     log-sum ``log sum exp(x - m)`` are kept apart (lse = m + log-sum rounds ~1e-4 away at
     |x| ~ 1e3 in fp32). Nothing N x V is stored; the loss, lse and the token accuracy (target
     logit == row max) are then O(N) torch ops.
  2. Gradients, V in column chunks of ``chunk_cols`` = C: ``_matmul_kernel`` recomputes the logits
     of the chunk and its epilogue turns them straight into
     ``dx = (p cp - ct [v = t] - cu c_v) (1 - (x / softcap)^2)``, p = exp((x - m) - log-sum),
     with per-row coefficients (cp, ct, cu) that carry the upstream gradients of the loss and of
     lse, token and class weights, label smoothing and z-loss (``_cross_entropy_terms.coefs``), in
     the input dtype; then ``dW[chunk] = dx.T @ h`` is one GEMM over all N rows (dW accumulated
     inside the GEMM, written once), ``dH += dx @ W[chunk]`` goes into an fp32 ``[N, D]``
     accumulator and ``dbias[chunk] = colsum(dx)``.
For a scalar loss ("mean", "sum") whose lse is not returned, the gradients are computed in the
forward pass with a unit upstream gradient and backward only scales the saved gradients; otherwise
("none", or a returned lse that may get a gradient) step 2 runs in backward on the forward's
statistics. In the forward case a second path can replace steps 1 and 2 (``_cross_entropy_rows``):
  3. Rows, R token rows at a time: the logits ``[R, V]`` are formed once (the GEMM epilogue stores
     x - the row's max over the tile, in the input dtype, and each tile's statistics), merged into
     each row's statistics, turned into dx in place, and ``dH = dx @ W``, ``dW (+)= dx.T @ h`` run
     on cuBLAS (several chunks accumulate dW in fp32 in the Triton GEMM): 6 N D V FLOPs, not 8.
``_cross_entropy_cost.plan`` picks the path from the FLOP and byte model below, among those the
workspace allows.

Cost model (FLOPs; HBM bytes, e per element, fp32 terms 4 bytes), per call:
  * statistics (forward, both paths): 2 N D V FLOPs. Each CTA re-reads its hidden block
    (BLOCK_N D e) once per column tile, so the grid runs a row block's column splits side by side
    and takes at least SMs x BLOCK_N D e / (L2 / 2) splits: the live hidden blocks then stay in L2
    and h costs N D e of HBM (with row blocks side by side instead, 132 live 1 MiB blocks at
    D = 4096 overflow L2 and h costs up to N D e V / BLOCK_V). W: V D e per wave of resident CTAs,
    ceil(row blocks x splits / SMs) waves; 16 N splits bytes of statistics.
  * gradients: 6 N D V FLOPs (dx, dW, dH: 2 N D V each), so 8 N D V in all. Bytes per chunk of C
    columns: h read by the dx and dW GEMMs (2 N D e), W[chunk] by dx and dH (2 C D e), dx written
    once and read twice (3 N C e), the fp32 dH accumulator read and written (8 N D), dW[chunk]
    written (C D e); over V / C chunks: (V / C)(2 N D e + 8 N D) + 3 V D e + 3 N V e (plus the
    GEMMs' tile re-reads that L2 grouping (GROUP_M) absorbs). A larger workspace (larger C) cuts
    the (V / C) terms; at the default 1 GiB and N = 16k, C = 32k columns in bf16.
  * rows (gradients with the loss): 6 N D V FLOPs. Bytes: the logits written, turned into dx in
    place (read and written) and read by the dH and dW GEMMs, 5 N V e, plus 2 x 16 N V / BLOCK_N of
    tile statistics; per chunk W read by the logits and dH GEMMs, and with several chunks the fp32
    dW accumulator read and written (8 V D per chunk). Against the column path it trades 2 N D V
    FLOPs for 2 N V e bytes: it wins when D is above a few hundred (ridge / e; every LLM head), and
    the plan takes it when the workspace holds a row tile of logits (and, for a 16-bit head
    accumulated over several chunks, the 4 V D bytes of fp32 dW: 1 GiB at N = 16k, V = 161k, D = 4096
    falls short, 8 GiB holds 2.6k-row chunks; N <= 3k rows fit 1 GiB whole).
  * gradient filtering (``grad_filter_eps``): the dx epilogue drops a tile's p term from its
    logits' row maxima (BLOCK_M exps per tile, no extra bytes) and flags the tiles whose dx is
    then all zero (filtered, no kept row's target in them, no label smoothing); the dH and dW GEMMs
    (Triton's ``_listed_matmul_kernel``, over per-tile lists built by a sort, no host sync) skip
    them. With a fraction f of tiles live: the row path 2 N D V + 4 f N D V FLOPs, the column path
    4 N D V + 4 f N D V, and 2 f N V e of dx reads (CCE's default filter leaves f ~ 0.1 on random
    logits).
  * vocabulary-parallel (``process_group``, P ranks): each rank the above on its V / P columns,
    plus all-reduces of 4 N fp32 (forward) and N D fp32 (dH, backward).

Dropped rows (target == ignore_index, or token weight 0) contribute exactly nothing, even when
their hidden row holds Inf or NaN: their dx is selected to 0 in the epilogue (not multiplied by a
zero coefficient), the dW GEMM loads their hidden rows as zeros (0 * Inf would be NaN), and their
dH rows are never accumulated. Their lse is still computed and returned. Vocabulary columns outside
``vocab_range`` are never read.

Memory beyond inputs and gradients: the workspace, at most ``UNIMM_CE_WORKSPACE_MB`` MiB (default
1024, read at each call): on the column path the dx chunk ``N x chunk_cols`` in the input dtype
(unless a single 128-column chunk needs more), and beside it the fp32 dH accumulator ``[N, D]``;
on the row path the logits chunk ``R x V`` in the input dtype, its tile statistics and, with
several chunks and a 16-bit head, the fp32 dW ``[V, D]``. Then per-split statistics
``4 x splits x N`` fp32 and O(N) per-row terms. No N x V tensor; ``vocab_range`` shrinks every
term to V = hi - lo columns.

No host synchronisation: tensor values are checked only where that costs no device sync, on CPU
tensors (targets in range, no negative weight under "mean"); on a GPU such values have defined
results instead (reference module docstring): NaN where they land.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from unimm.kernels import _cross_entropy_args as args
from unimm.kernels import _cross_entropy_cost as cost
from unimm.kernels import _cross_entropy_parallel as parallel
from unimm.kernels import _cross_entropy_terms as terms_
from unimm.kernels import dispatch
from unimm.kernels._common import check_tensors, unserved_dtype
from unimm.kernels.reference import cross_entropy as reference

try:
    from unimm.kernels import _cross_entropy_rows as rows_backend
    from unimm.kernels import _cross_entropy_triton as triton_backend
except ImportError:  # no triton: the Triton backend is then not live (dispatch says why)
    triton_backend = rows_backend = None

REDUCTIONS = reference.REDUCTIONS
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WORKSPACE_ENV = "UNIMM_CE_WORKSPACE_MB"
DEFAULT_WORKSPACE_MB = 1024
# The dx workspace in bytes; None: ``UNIMM_CE_WORKSPACE_MB`` at each call (tests set a number).
WORKSPACE_BYTES: int | None = None
# The gradient path: None, the cheaper by the cost model (``_cross_entropy_cost.plan``); "rows" or
# "columns" force one where it is possible (tests cover both).
GRADIENT_PATH: str | None = None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
                         token_weights: torch.Tensor | None = None, vocab_range: tuple[int, int] | None = None,
                         class_weights: torch.Tensor | None = None, return_lse: bool = False,
                         return_accuracy: bool = False, shift: bool = False, process_group=None,
                         grad_filter_eps: float | None = None):
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
        class_weights: optional float ``[V]`` per-class weights, torch's ``weight=`` and Liger's
            ``ce_weight``: the target's weight scales its cross-entropy, label smoothing spreads
            over the classes in proportion to them, "mean" divides the class-weighted part by the
            sum of the kept rows' target weights and z-loss by the kept rows' count (Liger; with
            token_weights both sums are token-weighted). Not differentiated.
        return_lse: also return fp32 ``lse [N]`` of every row (dropped rows included). It is
            differentiable (z-loss or other terms built on it train hidden, weight and bias)
            through kept rows; a dropped row's lse carries no gradient.
        return_accuracy: also return the token accuracy (Liger's ``return_token_accuracy``), from
            the same pass: a kept row is a hit when its target's logit is the row's maximum (ties
            count as hits). Reduced like the loss but unweighted: per row 1.0 / 0.0 ("none",
            dropped rows 0), the hit count ("sum"), or hits / kept rows ("mean", 0 when none).
        shift: next-token prediction (cut-cross-entropy's ``shift``): row t of each sequence
            (hidden ``[..., T, D]``, targets ``[..., T]``) is scored against target t + 1, the last
            row against nothing. Nothing is copied: the targets move, not hidden. "none", lse and
            accuracy then have shape ``[..., T - 1]``.
        process_group: a ``torch.distributed`` group over which the vocabulary is sharded
            (tensor-parallel heads): ``weight`` and ``bias`` are this rank's contiguous rows, in
            rank order; everything else (hidden, targets, token_weights, class_weights over the
            whole vocabulary, vocab_range in global columns) is the same on every rank. The loss,
            lse and accuracy are the single-process ones on every rank, each rank gets its shard's
            gradients and the whole hidden gradient (``unimm.kernels._cross_entropy_parallel``).
        grad_filter_eps: None (exact), or cut-cross-entropy's gradient filtering (its ``filter_eps``;
            its "auto" is ``finfo(dtype).eps / 32``) with eps in [0, 1): in each tile of the
            logits' gradient (the dx GEMM's output tile: rows of hidden x columns of the head from
            ``lo``) whose kept rows' softmax p are all below eps, the p term (which carries the
            loss's, z-loss's and lse's softmax gradients) is dropped; the target's and label
            smoothing's terms always stay. The loss and lse are unchanged. Not with process_group.

    Returns:
        The loss (scalar, or ``targets.shape`` for "none"), then lse if ``return_lse``, then the
        accuracy if ``return_accuracy``. Gradients flow to hidden, weight and bias in their own
        dtypes, accumulated in fp32.

    NaN and Inf in tensors are never checked: they propagate, as in PyTorch, to exactly the
    outputs that depend on them; dropped rows and columns outside ``vocab_range`` contribute
    nothing. A target outside ``vocab_range`` (not ``ignore_index``) raises on CPU tensors and
    acts as a NaN token weight on a GPU.
    """
    offset, vocab = 0, None
    if process_group is not None:
        check_tensors({"weight": weight})
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("process_group needs an initialised torch.distributed")
        offset, vocab = parallel.shard_offset(weight, process_group)
    ignore_index, reduction, label_smoothing, z_loss, softcap, (lo, hi) = args.check_args(
        hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, token_weights,
        vocab_range, vocab)
    vocab = weight.shape[0] if vocab is None else vocab
    if class_weights is not None:
        check_tensors({"class_weights": class_weights}, like=("hidden", hidden), floating=True)
        if tuple(class_weights.shape) != (vocab,):
            raise ValueError(f"class_weights must be [V] = [{vocab}], got {tuple(class_weights.shape)}")
    if not isinstance(shift, bool) or not isinstance(return_accuracy, bool):
        raise TypeError(f"shift and return_accuracy must be bools, got {shift!r} and {return_accuracy!r}")
    if grad_filter_eps is not None:
        grad_filter_eps = args.real("grad_filter_eps", grad_filter_eps, "None or a finite number in [0, 1)",
                                lambda v: 0 <= v < 1)
        if process_group is not None:
            raise ValueError("grad_filter_eps is not supported with process_group")
    out_shape = targets.shape
    targets = targets.long()  # any integer dtype; the kernels and gather want int64
    if shift:
        if hidden.dim() < 2:
            raise ValueError(f"shift needs hidden [..., T, D], got {tuple(hidden.shape)}")
        targets, token_weights = (_shift_left(t, fill, hidden.shape[:-1])
                                  for t, fill in ((targets, ignore_index), (token_weights, 0.0)))
        out_shape = (*hidden.shape[:-2], max(0, hidden.shape[-2] - 1))
    n_rows, dim = math.prod(hidden.shape[:-1]), hidden.shape[-1]
    rows = hidden.reshape(n_rows, dim)
    flat_targets = targets.reshape(-1)
    flat_weights = token_weights.reshape(-1) if token_weights is not None else None
    args.check_values(flat_targets, flat_weights, lo, hi, ignore_index, reduction)
    workspace_bytes()  # a bad UNIMM_CE_WORKSPACE_MB is reported on every backend, before any work
    backend = dispatch.select("linear_cross_entropy", hidden.device, implemented=("triton",),
                              unsupported={"triton": unserved_dtype(hidden.dtype, _KERNEL_DTYPES)})
    if process_group is not None:
        if dim == 0 and backend != "reference":  # as below
            rows, weight = F.pad(rows, (0, 1)), F.pad(weight, (0, 1))
        loss, lse, stats = parallel.linear_cross_entropy(
            rows, weight, bias, flat_targets, flat_weights, class_weights, process_group, offset, backend, lo, hi,
            ignore_index, reduction, label_smoothing, z_loss, softcap, workspace_bytes())
        kept = reference.row_terms(flat_targets, flat_weights, lo, hi, ignore_index, reduction)[0]
        accuracy = reference.reduce_hits(kept & (stats[2] >= stats[0]), kept, reduction)
    elif backend == "reference":
        # the reference's matmuls must run in its compute dtype, not an enclosing autocast's
        with torch.autocast(hidden.device.type, enabled=False):
            loss = reference.linear_cross_entropy(
                rows, weight, flat_targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
                label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, token_weights=flat_weights,
                vocab_range=(lo, hi), class_weights=class_weights, return_lse=True, return_accuracy=True,
                grad_filter_eps=grad_filter_eps, grad_filter_tile=_filter_tile(hidden.dtype),
                compute_dtype=torch.promote_types(hidden.dtype, torch.float32))
        loss, lse, accuracy = loss
    else:
        if dim == 0:
            # Every logit is 0 (+ bias): the kernels see one zero column, and autograd slices its
            # gradient back to width 0.
            rows, weight = F.pad(rows, (0, 1)), F.pad(weight, (0, 1))
        wants = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (rows, weight, bias)]
        # a returned lse may get a gradient of its own: the gradients then wait for backward
        grads_now = wants if reduction != "none" and not return_lse else [False, False, False]
        loss, lse, stats, *_ = _forward_op(rows, weight, bias, flat_targets, flat_weights,
                                           class_weights.float() if class_weights is not None else None, lo, hi,
                                           ignore_index, reduction, label_smoothing, z_loss, softcap, grad_filter_eps,
                                           grads_now)
        kept = reference.row_terms(flat_targets, flat_weights, lo, hi, ignore_index, reduction)[0]
        accuracy = reference.reduce_hits(kept & (stats[2] >= stats[0]), kept, reduction)
    outputs = [loss]
    if return_lse:
        outputs.append(lse)
    if return_accuracy:
        outputs.append(accuracy)
    if shift:  # the rows scored against nothing (each sequence's last) leave the per-row outputs
        outputs = [_drop_last(t, hidden.shape[:-1]) if t.dim() else t for t in outputs]
    outputs = [t.reshape(out_shape) if t.dim() else t for t in outputs]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _filter_tile(dtype: torch.dtype) -> tuple[int, int]:
    """The tile that gradient filtering keeps or drops whole: the Triton dx GEMM's."""
    return triton_backend.filter_tile(dtype) if triton_backend is not None else reference.GRAD_FILTER_TILE


def _shift_left(t: torch.Tensor | None, fill, seq_shape) -> torch.Tensor | None:
    """``t[..., 1:]`` followed by ``fill``, along the sequence axis of ``seq_shape``."""
    if t is None:
        return None
    t = t.reshape(seq_shape)
    shifted = torch.full_like(t, fill)
    shifted[..., :-1] = t[..., 1:]
    return shifted


def _drop_last(per_row: torch.Tensor, seq_shape) -> torch.Tensor:
    """A per-row output without each sequence's last row."""
    return per_row.reshape(seq_shape)[..., :-1]


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


# ---------------------------------------------------------------------------------------------
# Ops (opaque to torch.compile) and autograd
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("unimm::linear_cross_entropy", mutates_args=())
def _forward_op(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                token_weights: torch.Tensor | None, class_weights: torch.Tensor | None, lo: int, hi: int,
                ignore_index: int, reduction: str,
                label_smoothing: float, z_loss: float, softcap: float | None, grad_filter_eps: float | None,
                grads_now: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                torch.Tensor]:
    """(loss, lse, stats, dh, dw, db); stats is ``triton_backend.statistics``' ``[4, N]``. With
    ``grads_now`` (only for a scalar loss whose lse gets no gradient) the gradients of a unit
    upstream gradient are computed in the same pass and backward scales them; gradients not
    computed come back empty."""
    terms = terms_.row_terms(targets, token_weights, class_weights, lo, hi, ignore_index, reduction)
    column, head_cw = terms[1], terms[4]
    class_sum = head_cw.sum() if head_cw is not None else None
    head, head_bias = weight[lo:hi], bias[lo:hi] if bias is not None else None
    grads = (None, None, None)
    path = _plan(hidden, hi - lo, grads_now)
    unit = torch.ones((), device=hidden.device)  # the upstream gradient of gradients computed now
    if path.path == "rows":
        def row_coefs(chunk_stats, rows):
            return terms_.coefs(chunk_stats, terms_.rows_of(terms, rows), unit, None, label_smoothing, z_loss,
                                hi - lo, class_sum)

        stats, *grads = rows_backend.gradients_with_statistics(
            hidden, head, head_bias, column, row_coefs, softcap, tuple(grads_now), path.size, head_cw,
            grad_filter_eps)
    else:
        stats = triton_backend.statistics(hidden, head, head_bias, column, softcap, head_cw)
    loss, lse = terms_.loss(stats, terms, label_smoothing, z_loss, hi - lo, class_sum, reduction)
    if path.path == "columns" and any(grads_now):
        coefs = terms_.coefs(stats, terms, unit, None, label_smoothing, z_loss, hi - lo, class_sum)
        grads = triton_backend.gradients(hidden, head, head_bias, column, stats, coefs, softcap, tuple(grads_now),
                                         workspace_bytes(), head_cw, grad_filter_eps)
    return (loss, lse, stats, *(g if g is not None else hidden.new_empty(0) for g in grads))


def _plan(hidden: torch.Tensor, vocab: int, grads_now: list[bool]) -> cost.Plan:
    """``_cross_entropy_cost.plan`` for this call (``GRADIENT_PATH`` forces a path where it is possible)."""
    n, d = hidden.shape
    sms, l2_bytes = 132, 50 << 20
    if hidden.device.type == "cuda":
        props = torch.cuda.get_device_properties(hidden.device)
        sms, l2_bytes = props.multi_processor_count, getattr(props, "L2_cache_size", l2_bytes)
    args = (n, d, vocab, hidden.element_size(), workspace_bytes())
    kwargs = dict(grads_now=any(grads_now), want_dw=grads_now[1], tile=triton_backend.filter_tile(hidden.dtype),
                  sms=sms, l2_bytes=l2_bytes)
    if GRADIENT_PATH == "columns":
        kwargs["grads_now"] = False
    best = cost.plan(*args, **kwargs)
    if GRADIENT_PATH == "rows" and any(grads_now) and best.path != "rows":
        rows = cost.row_chunk(n, d, vocab, hidden.element_size(), workspace_bytes(), kwargs["tile"], grads_now[1])
        best = cost.Plan("rows", rows, ()) if rows else best
    return best


@_forward_op.register_fake
def _(hidden, weight, bias, targets, token_weights, class_weights, lo, hi, ignore_index, reduction, label_smoothing,
      z_loss, softcap, grad_filter_eps, grads_now):
    n, d = hidden.shape
    f32 = dict(dtype=torch.float32)
    loss = hidden.new_empty((n,) if reduction == "none" else (), **f32)
    shapes = ((n, d), (hi - lo, d), (hi - lo,))
    dtypes = (hidden.dtype, torch.float32, torch.float32)
    grads = [hidden.new_empty(shape if now else (0,), dtype=dtype)
             for shape, dtype, now in zip(shapes, dtypes, grads_now)]
    return (loss, hidden.new_empty((n,), **f32), hidden.new_empty((4, n), **f32), *grads)


@torch.library.custom_op("unimm::linear_cross_entropy_backward", mutates_args=())
def _backward_op(grad_loss: torch.Tensor, grad_lse: torch.Tensor | None, hidden: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, targets: torch.Tensor, token_weights: torch.Tensor | None,
                 class_weights: torch.Tensor | None, stats: torch.Tensor, lo: int, hi: int, ignore_index: int,
                 reduction: str, label_smoothing: float, z_loss: float, softcap: float | None,
                 grad_filter_eps: float | None, wants: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dh, dw, db) when the gradients were not computed with the loss (reduction "none", or a
    returned lse): the chunks run with each row's upstream gradients of its loss and its lse, on
    the forward's statistics."""
    terms = terms_.row_terms(targets, token_weights, class_weights, lo, hi, ignore_index, reduction)
    column, head_cw = terms[1], terms[4]
    class_sum = head_cw.sum() if head_cw is not None else None
    coefs = terms_.coefs(stats, terms, grad_loss, grad_lse, label_smoothing, z_loss, hi - lo, class_sum)
    grads = triton_backend.gradients(hidden, weight[lo:hi], bias[lo:hi] if bias is not None else None, column,
                                     stats, coefs, softcap, tuple(wants), workspace_bytes(), head_cw, grad_filter_eps)
    return tuple(g if g is not None else hidden.new_empty(0) for g in grads)


@_backward_op.register_fake
def _(grad_loss, grad_lse, hidden, weight, bias, targets, token_weights, class_weights, stats, lo, hi, ignore_index,
      reduction, label_smoothing, z_loss, softcap, grad_filter_eps, wants):
    shapes = (tuple(hidden.shape), (hi - lo, hidden.shape[1]), (hi - lo,))
    dtypes = (hidden.dtype, torch.float32, torch.float32)
    return tuple(hidden.new_empty(shape if want else (0,), dtype=dtype)
                 for shape, dtype, want in zip(shapes, dtypes, wants))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, token_weights, class_weights, lo, hi, ignore_index, reduction, label_smoothing,
     z_loss, softcap, grad_filter_eps, grads_now) = inputs
    ctx.mark_non_differentiable(*output[2:])
    ctx.grads_now = any(grads_now)
    ctx.vocab = (lo, hi, weight.shape[0])
    ctx.options = (ignore_index, reduction, label_smoothing, z_loss, softcap, grad_filter_eps)
    ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
    if ctx.grads_now:
        ctx.save_for_backward(*output[3:])
    else:
        ctx.save_for_backward(hidden, weight, bias, targets, token_weights, class_weights, output[2])


def _backward(ctx, grad_loss, grad_lse, *unused):
    lo, hi, vocab = ctx.vocab
    wants = [bool(w) for w in ctx.needs_input_grad[:3]]
    if ctx.grads_now:
        # Out of place: the saved gradients stay valid for a second backward (retain_graph), and
        # torch.compile can trace it. lse was not returned, so it has no gradient.
        grads = [g * grad_loss.to(g.dtype) if want else None for g, want in zip(ctx.saved_tensors, wants)]
    else:
        # The kernels' gradients are not differentiable again: the op sees detached tensors.
        saved = [t.detach() if t is not None else None for t in ctx.saved_tensors]
        grads = _backward_op(grad_loss.detach(), grad_lse.detach() if grad_lse is not None else None, *saved, lo, hi,
                             *ctx.options, wants)
        grads = [g if want else None for g, want in zip(grads, wants)]
    dh, dw, db = grads
    hidden_dtype, weight_dtype, bias_dtype = ctx.dtypes
    dh = dh.to(hidden_dtype) if dh is not None else None
    dw = terms_.full_rows(dw, lo, vocab).to(weight_dtype) if dw is not None else None
    db = terms_.full_rows(db, lo, vocab).to(bias_dtype) if db is not None else None
    return dh, dw, db, *[None] * 12


_forward_op.register_autograd(_backward, setup_context=_setup_context)
