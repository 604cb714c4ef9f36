"""Next-token sampling from logits: classifier-free guidance, vocab block, temperature, top-k, top-p.

Public: ``sample_tokens(logits, *, temperature, top_k, top_p, vocab_range, cfg_scale, generator)``;
its exact meaning, rule by rule, is ``unimm.kernels.reference.sampling``. Randomness is one fp32
uniform per output row drawn with torch (``torch.rand(rows, generator=generator)``) and handed to
the kernel, so the kernel holds no RNG state: equal generator states give equal tokens, and a
decode step that samples can be captured in a CUDA graph (with a CUDA generator or the default).

Backends (see ``dispatch``):
  * cuda: ``csrc/sampling.cu``, one CTA of 1024 threads per output row (several when rows are
    few, below). It never writes the guided logits: every pass re-reads the vocab block of the
    cond (and uncond) row with 16-byte loads and recomputes ``z = (g - max g) * inv_t``,
    ``g = u + s (c - u)``. Passes: (1) the row
    max of g (and, for temperature 0, the argmax: done); (2) top-k by radix select on the
    order-preserving uint32 key of z: a first pass bins tokens by value into 256 bins over
    [min, max] (value bins spread a row's tokens where key bits would pile them into a few
    exponents), then up to four passes of 8-bit digits of the key inside the chosen bin, each
    skipped once the chosen bin is wholly kept; (3) top-p by the same select weighted by token
    mass; (4) the survivors' total mass when top-p did not give it; (5) the inverse-CDF draw:
    tiles of 8192 tokens in index order, a block prefix scan per tile, stopping at the tile that
    holds the target. No sort, no V-sized scratch, no host synchronisation. Token weights are
    integers (``round(p * 2**40)``), so every histogram and scan is exact and independent of
    thread order: the kernel is deterministic and agrees with the reference token for token
    except where ``exp`` rounds differently on the GPU. Histograms add weights as two 32-bit
    halves with carry (shared-memory 64-bit adds are compare-and-swap loops).
    Work split: when rows are few (``cuda_splits``: ``SMs // rows`` CTAs per row when that is 4 or
    more, each at least 8192 tokens, so batch 1-2 with CFG at 161k-262k vocab runs 20-32 CTAs per
    row instead of one; 33 rows or more on 132 SMs keep one),
    the row's chunks are split over a grid ``[splits, rows]`` and each pass becomes a launch: the
    max, each selection stage, each split's survivor weight, the draw. CTAs add their partial
    max / min keys, counts and integer weights to the row's state in a workspace with global
    atomics (all exact integers, so the totals do not depend on arrival order); the last CTA of a
    row to arrive finishes the stage exactly as the one-CTA kernel does. The draw scans the splits'
    weights and only the split holding the target draws, so the tokens equal the one-CTA kernel's.
    Launches: greedy 1; sampling 3, plus 5 per active top-k / top-p (a stage a row has resolved
    returns at once), and a memset of the state: a fixed sequence, graph-capturable.
    Bytes: every pass re-reads the block, ``n * elem`` per row (twice with guidance: 644 KB at
    161k bf16 with CFG), but only the first pass comes from HBM: the block of a few rows sits in
    L2 (50 MB), so a pass is one L2 round trip per thread plus its atomics and a launch boundary,
    not a bandwidth bound; the workspace adds ``rows * (4096 + 8 * splits)`` bytes.
  * triton: ``_sampling_triton``, the same rules and integer weights (so the same tokens), with
    the top-k and top-p thresholds found by a 16-way search on the key of ``z`` (its docstring
    has the cost model): the GPU path of installs without the extension, and the CPU tests'
    path under the interpreter.
  * reference: the CPU path, and any call neither kernel can serve.

Range: the tempered logits are ``(g - max g) / temperature``, the row maximum subtracted first,
so no finite logit and no temperature whose inverse is a finite fp32 number (temperature above
~2.9e-39) overflows. Non-finite logits are never checked (no host synchronisation, on any
device): a NaN guided logit is never returned and takes no part in top-k / top-p; a row whose
block holds only NaN returns -1; +inf logits share all the mass; a row of -inf only is sampled
uniformly (greedy: its first id).
"""

from __future__ import annotations

import math

import torch

from unimm import _ext
from unimm.kernels import dispatch
from unimm.kernels._common import cdiv, check_tensors, device_guard, is_int, is_real, multiprocessor_count
from unimm.kernels.reference import sampling as reference

try:
    import triton

    from unimm.kernels import _sampling_triton as triton_backend
except ImportError:  # no triton: the Triton backend is then not live (dispatch says why)
    triton = triton_backend = None

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_TILE = 8192  # tokens one pass of a 1024-thread CTA reads with one 8-token chunk per thread
_CUDA_MAX_SPLITS = 1024  # csrc/sampling.cu: the draw scans the splits' weights with one thread each
_CUDA_MIN_SPLITS = 4


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def sample_tokens(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, vocab_range: tuple[int, int] | None = None,
                  cfg_scale: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of ``logits``.

    Args:
        logits: ``[R, V]`` float32, float16 or bfloat16 (any row stride).
        temperature: 0 is greedy (argmax, lowest id on ties; top_k / top_p are then ignored and no
            random number is drawn); otherwise the logits less their row maximum are scaled by
            ``float32(1 / temperature)``, which must be finite (temperature >= ~2.9e-39).
        top_k: keep the ``top_k`` highest logits (ties with the k-th all kept); None or
            ``>= hi - lo`` keeps all.
        top_p: nucleus: keep the smallest set of most likely tokens (of the top-k survivors)
            holding probability ``>= top_p``, at least one token; None or 1 keeps all.
        vocab_range: ``(lo, hi)``: sample from columns ``[lo, hi)`` only (e.g. the image codes of an
            expanded vocabulary); returned ids are absolute, in ``[lo, hi)``.
        cfg_scale: classifier-free guidance scale ``s``: rows are ``[cond; uncond]`` halves
            (R even) and the guided logits are ``uncond + s * (cond - uncond)`` (in fp32).
        generator: torch generator for the uniforms, on the device of ``logits``.

    Returns:
        int64 ``[R]``, or ``[R // 2]`` with ``cfg_scale``. Logits are not checked (no device
        synchronisation): a token whose guided logit is NaN is never returned, and a row with no
        other token in the block returns -1. Rules: ``unimm.kernels.reference.sampling``.

    Raises:
        TypeError: ``logits`` not a float32 / float16 / bfloat16 tensor, an option of the wrong type.
        ValueError: ``logits`` not 2-D, an option out of range (temperature NaN, negative or too
            small for a finite fp32 inverse, ...), odd R with ``cfg_scale``, a generator on another
            device.
    """
    lo, hi = _check_args(logits, temperature, top_k, top_p, vocab_range, cfg_scale, generator)
    rows_out = logits.shape[0] // 2 if cfg_scale is not None else logits.shape[0]
    if rows_out == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    uniforms = None
    if temperature != 0:
        uniforms = torch.rand(rows_out, generator=generator, device=logits.device)
    return torch.ops.unimm.sample_tokens(
        logits, uniforms, float(temperature), hi - lo if top_k is None else min(int(top_k), hi - lo),
        1.0 if top_p is None else float(top_p), lo, hi, None if cfg_scale is None else float(cfg_scale))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _check_args(logits, temperature, top_k, top_p, vocab_range, cfg_scale, generator) -> tuple[int, int]:
    check_tensors({"logits": logits}, dtypes=_DTYPES, kind="float32, float16 or bfloat16", dims=2,
                  layout="[rows, vocab]")
    vocab = logits.shape[1]
    if vocab == 0:
        raise ValueError("logits has an empty vocab dimension")
    if not is_real(temperature):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    if temperature > 0 and not math.isfinite(reference.inverse_temperature(temperature)):
        raise ValueError(f"temperature {temperature} is too small: 1 / temperature overflows float32 "
                         "(use 0 for greedy)")
    if top_k is not None:
        if not is_int(top_k):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if not is_real(top_p):
            raise TypeError(f"top_p must be a real number or None, got {type(top_p).__name__}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if vocab_range is None:
        lo, hi = 0, vocab
    else:
        if not (isinstance(vocab_range, (tuple, list)) and len(vocab_range) == 2 and all(map(is_int, vocab_range))):
            raise TypeError(f"vocab_range must be a pair of ints (lo, hi), got {vocab_range!r}")
        lo, hi = int(vocab_range[0]), int(vocab_range[1])
        if not 0 <= lo < hi <= vocab:
            raise ValueError(f"vocab_range must be (lo, hi) with 0 <= lo < hi <= V = {vocab}, got {tuple(vocab_range)}")
    if hi - lo > reference.MAX_BLOCK:
        raise ValueError(f"the vocab block holds {hi - lo} tokens; at most {reference.MAX_BLOCK} are supported")
    if cfg_scale is not None:
        if not is_real(cfg_scale):
            raise TypeError(f"cfg_scale must be a real number or None, got {type(cfg_scale).__name__}")
        if not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
        if logits.shape[0] % 2:
            raise ValueError(f"cfg_scale needs [cond; uncond] rows, so an even row count; logits has {logits.shape[0]}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != logits.device.type or (
                logits.device.type == "cuda" and generator.device.index not in (None, logits.device.index)):
            raise ValueError(f"generator is on {generator.device} but logits are on {logits.device}")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# Op (opaque to torch.compile and CUDA graphs)
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("unimm::sample_tokens", mutates_args=())
def _sample_tokens_op(logits: torch.Tensor, uniforms: torch.Tensor | None, temperature: float, top_k: int,
                      top_p: float, lo: int, hi: int, cfg_scale: float | None) -> torch.Tensor:
    cuda_missing = None if _ext.has("sample_tokens") else "unimm._C has no sample_tokens"
    backend = dispatch.select("sample_tokens", logits.device, implemented=("cuda", "triton"),
                              unsupported={"cuda": cuda_missing})
    if backend == "cuda":
        return _sample_cuda(logits, uniforms, temperature, top_k, top_p, lo, hi, cfg_scale)
    if backend == "triton":
        return _sample_triton(logits, uniforms, temperature, top_k, top_p, lo, hi, cfg_scale)
    return reference.sample_tokens(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                                   vocab_range=(lo, hi), cfg_scale=cfg_scale)


@_sample_tokens_op.register_fake
def _(logits, uniforms, temperature, top_k, top_p, lo, hi, cfg_scale):
    rows_out = logits.shape[0] // 2 if cfg_scale is not None else logits.shape[0]
    return logits.new_empty(rows_out, dtype=torch.int64)


def cuda_splits(rows_out: int, n: int, device: torch.device) -> int:
    """CTAs per row of the CUDA kernel for ``rows_out`` rows of an ``n``-token block: as many as
    one wave of one CTA per SM gives each row (``SMs // rows_out``), each at least one 8192-token
    tile (one 8-token chunk per thread per pass), at most 1024; 1 (the one-CTA kernel) below 4,
    where a pass's launch and cross-CTA finish would cost about what splitting its loads saves.
    Shapes and the SM count only: no host synchronisation."""
    splits = min(cdiv(n, _CUDA_TILE), multiprocessor_count(device) // max(1, rows_out), _CUDA_MAX_SPLITS)
    return splits if splits >= _CUDA_MIN_SPLITS else 1


def _sample_cuda(logits, uniforms, temperature, top_k, top_p, lo, hi, cfg_scale) -> torch.Tensor:
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows_out = logits.shape[0] // 2 if cfg_scale is not None else logits.shape[0]
    tokens = torch.empty(rows_out, dtype=torch.int64, device=logits.device)
    greedy = temperature == 0
    C = _ext.lib()
    splits = cuda_splits(rows_out, hi - lo, logits.device)
    workspace = None
    if splits > 1:  # per row: the state between launches, then one survivor weight per split
        workspace = torch.empty(rows_out * (C.SAMPLING_ROW_STATE_BYTES + 8 * splits), dtype=torch.uint8,
                                device=logits.device)
    C.sample_tokens(
        logits=logits.data_ptr(), row_stride=logits.stride(0), rows_out=rows_out, lo=lo, n=hi - lo,
        cfg=cfg_scale is not None, cfg_scale=0.0 if cfg_scale is None else cfg_scale, greedy=greedy,
        inv_temperature=1.0 if greedy else reference.inverse_temperature(temperature), top_k=top_k, top_p=top_p,
        uniforms=0 if greedy else uniforms.data_ptr(), tokens=tokens.data_ptr(),
        dtype=_ext.DTYPE_CODES[logits.dtype], device=logits.device.index, stream=_ext.stream_handle(logits.device),
        splits=splits, workspace=0 if workspace is None else workspace.data_ptr())
    return tokens


def _triton_config(rows_out: int, n: int, interpret: bool) -> dict:
    """Rows per program and vocab tile. A GPU program takes one row (its 16-way search holds a
    ``[BLOCK_V, 16]`` compare); the interpreter takes many rows and small tiles, so that a CPU test
    of thousands of rows is a few numpy calls per pass."""
    if interpret:  # ~64k tokens a tile: few programs, each op one numpy call of at most ~1M elements
        block_v = min(128, triton.next_power_of_2(n))
        return dict(BLOCK_R=min(triton.next_power_of_2(rows_out), 65536 // block_v), BLOCK_V=block_v, num_warps=1)
    return dict(BLOCK_R=1, BLOCK_V=256, num_warps=8)


def _fp32_parts(value: float) -> tuple[float, float, float]:
    """Three fp32 numbers whose fp64 sum is ``value`` exactly (a float argument reaches a Triton
    kernel as fp32, and rule 7 multiplies by ``top_p`` in float64)."""
    hi = reference.to_float32(value)
    mid = reference.to_float32(value - hi)
    return hi, mid, reference.to_float32(value - hi - mid)


def _sample_triton(logits, uniforms, temperature, top_k, top_p, lo, hi, cfg_scale) -> torch.Tensor:
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows_out = logits.shape[0] // 2 if cfg_scale is not None else logits.shape[0]
    n = hi - lo
    tokens = torch.empty(rows_out, dtype=torch.int64, device=logits.device)
    greedy = temperature == 0
    config = _triton_config(rows_out, n, dispatch.TRITON_INTERPRET)
    launch = {key: config.pop(key) for key in ("num_warps",)}
    if not dispatch.TRITON_INTERPRET:
        launch["enable_fp_fusion"] = False  # u + s * (c - u) rounds twice, as in the reference
    with device_guard(logits.device):
        triton_backend._sample_tokens_kernel[(triton.cdiv(rows_out, config["BLOCK_R"]),)](
            logits, tokens if greedy else uniforms, tokens, rows_out, n, lo, logits.stride(0),
            0.0 if cfg_scale is None else cfg_scale, 1.0 if greedy else reference.inverse_temperature(temperature),
            top_k, *_fp32_parts(top_p), CFG=cfg_scale is not None, GREEDY=greedy, TOP_K=not greedy and top_k < n,
            TOP_P=not greedy and top_p < 1, **config, **launch)
    return tokens
