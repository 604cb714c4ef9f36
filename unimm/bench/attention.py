"""Attention with interval masks: unimm.kernels.attention against SDPA and FlexAttention.

Every layout is one ``AttentionMask`` (docs/ARCHITECTURE.md, "Attention masks"): per query row one range
of visible keys ``[kv_start, kv_end)``. For each layout and head shape, in this process on the
same bf16 inputs (q, k, v in unimm's layout [B, S, H, D], all requiring grad):
  * unimm: ``attention(q, k, v, mask)`` with the layout's AttentionMask.
  * sdpa[flash], sdpa[cudnn] (pure causal only): ``F.scaled_dot_product_attention`` with
    ``is_causal=True`` on [B, H, S, D] views (transposes, no copies), restricted to one backend
    with ``sdpa_kernel``.
  * sdpa[dense mask] (every other layout): SDPA's own dispatch with the boolean mask
    ``mask.to_dense(Skv)`` broadcast over heads, [B, 1, S, Skv].
  * flex_attention: ``torch.compile(flex_attention)`` with a block mask from
    ``create_block_mask`` over a mask_mod that reads the same kv_start / kv_end tensors
    (``kv_start[b, q] <= kv < kv_end[b, q]``); compiled afresh for every case, its first call
    (compilation included) reported as ``compile_s``. Not importable, or failing: n/a with the reason.
  * flash-attn-4 (FlashAttention-4, CuTe DSL), where its plain interface expresses the layout:
    ``flash_attn_func(causal=True)`` on pure causal, ``flash_attn_varlen_func(causal=True)`` with
    the documents as ``cu_seqlens`` on packed causal documents; n/a elsewhere (bidirectional spans
    need its mask_mod with block sparsity) and when not installed.

Forward and backward are timed separately. Forward: one call with inputs that require grad, as
in training (the graph is built, then dropped). Backward: ``torch.autograd.grad(out, (q, k, v),
dout, retain_graph=True)`` on the graph of one forward, so only the backward is on the clock
(should an implementation refuse a retained graph, backward is (forward + backward) - forward,
which the row's ``backward.method`` says). Mask build times: unimm's AttentionMask builder call,
``create_block_mask`` for FlexAttention, ``mask.to_dense`` for SDPA's dense mask. What unimm
derives from a mask lazily and caches on it (the backward's tile bounds) is not in its build
time: the first, untimed call pays it, and later calls (layers) reuse it.

TFLOP/s count visible query-key pairs only, the same count for every implementation: pairs =
sum over rows of (kv_end - kv_start), forward 4*D*Hq*pairs, backward 2.5x that.

Correctness, once per layout and shape before any timing: every implementation's output and
dq / dk / dv against an fp32 reference on the same inputs (explicit softmax attention with the
dense mask, fp32 matmuls without TF32, one head and a block of query rows at a time), as
relative-norm errors; rows that see no keys must give exactly 0 in out and dq.

Targets (issue): on H100, >= 0.85x SDPA's flash/cuDNN (the faster of the two) on pure causal,
>= 1.3x FlexAttention on the mixed layouts (every layout but pure causal), forward and backward.

With ``--quick`` (what ``unimm bench --quick`` runs): shape h16-d128, layouts causal (against
sdpa[flash], sdpa[cudnn] and flash-attn-4) and packed-images (against flex_attention); the other
anchors of those layouts are n/a, left out.

    python -m unimm.bench.attention [--shapes h16-d128,h32-d64] [--layouts causal,packed-images] [--quick] [--out DIR]
    python -m unimm.bench.attention --smoke --out DIR   # tiny shapes on the CPU: checks the family
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from unimm.bench._common import markdown_table, parse_run, peak_memory, print_outcome, save, start_run, verdict
from unimm.kernels import AttentionMask, BackendUnavailable, attention
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None
try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    _flex_error = None
except Exception as error:
    create_block_mask = flex_attention = None
    _flex_error = f"FlexAttention is not importable ({type(error).__name__}: {error})"
try:
    from flash_attn.cute import flash_attn_func as fa4_func, flash_attn_varlen_func as fa4_varlen_func
    _fa4_error = None
except Exception as error:  # not installed, or a CuTe DSL / torch it does not support
    fa4_func = fa4_varlen_func = None
    _fa4_error = f"flash-attn-4 is not importable ({type(error).__name__}: {error})"

TARGET = ("on H100: >= 0.85x SDPA's flash/cuDNN on pure causal, >= 1.3x FlexAttention on the mixed "
          "layouts, forward and backward")
TARGET_VS_SDPA = 0.85
TARGET_VS_FLEX = 1.3
WARMUP, REPEAT = 10, 30  # a call is milliseconds to tens of ms at 16k tokens
BUILD_WARMUP, BUILD_REPEAT = 2, 10
SMOKE_WARMUP, SMOKE_REPEAT = 1, 3  # the smoke run checks the script, it measures nothing

# name: (batch B, tokens per sequence S, query heads Hq, key/value heads Hkv, head dim D)
SHAPES = {
    "h16-d128": (1, 16384, 16, 16, 128),
    "h32-d64": (1, 16384, 32, 32, 64),
}
SMOKE_SHAPES = {
    "tiny": (2, 96, 2, 2, 16),
}
# Layouts, as sizes in tokens. packed: docs of ``doc`` tokens one after another; in each, text
# ``lead``, then images of ``image`` bidirectional tokens separated by ``gap`` text tokens while
# a whole image fits, then text to the end of the doc; the last ``pad`` tokens of the last
# sequence are padding (doc id -1, they see nothing).
LAYOUTS = {
    "causal": dict(kind="causal"),
    "prefix-lm": dict(kind="prefix_lm", prefix_fraction=0.5),
    "packed-images": dict(kind="packed", doc=8192, image=1024, lead=512, gap=1536, pad=0),
    "packed-causal": dict(kind="packed", doc=4096, image=0, lead=0, gap=0, pad=0),
}
SMOKE_LAYOUTS = {
    "causal": dict(kind="causal"),
    "prefix-lm": dict(kind="prefix_lm", prefix_fraction=0.5),
    "packed-images": dict(kind="packed", doc=48, image=16, lead=4, gap=8, pad=8),
    "packed-causal": dict(kind="packed", doc=24, image=0, lead=0, gap=0, pad=8),
}
PURE_CAUSAL = "causal"  # every other layout is "mixed" for the target
# --quick: one head shape; pure causal against SDPA's fused kernels, one mixed layout against FlexAttention
QUICK_SHAPES = ("h16-d128",)
QUICK_LAYOUTS = ("causal", "packed-images")

# Relative-norm error against the fp32 reference (docs/ARCHITECTURE.md, Numerics). NaN never passes.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

SDPA_CAUSAL = ("sdpa[flash]", "sdpa[cudnn]")
SDPA_DENSE = "sdpa[dense mask]"
FLEX = "flex_attention"
FA4 = "flash-attn-4"
IMPLS = ("unimm",) + SDPA_CAUSAL + (SDPA_DENSE, FLEX, FA4)
DIRECTIONS = ("forward", "backward")
BWD_FLOP_FACTOR = 2.5


class NotHere(Exception):
    """An anchor that cannot run in this process: its row is n/a with this reason."""


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

def images_per_doc(spec) -> int:
    if not spec["image"] or spec["doc"] < spec["lead"] + spec["image"]:
        return 0
    return (spec["doc"] - spec["lead"] - spec["image"]) // (spec["image"] + spec["gap"]) + 1


def packed_ids(spec, batch, seq, device):
    """doc_ids and span_ids [B, S] for a ``packed`` layout, built with torch ops."""
    doc, image, lead, gap, pad = (spec[key] for key in ("doc", "image", "lead", "gap", "pad"))
    pos = torch.arange(seq, device=device)
    doc_ids = (pos // doc).expand(batch, seq).clone()
    if pad:
        doc_ids[-1, seq - pad:] = -1
    n_images = images_per_doc(spec)
    if n_images:
        rel = pos % doc - lead  # position after the doc's leading text
        index = rel.div(image + gap, rounding_mode="floor")
        in_image = (rel >= 0) & (rel % (image + gap) < image) & (index < n_images)
        spans = torch.where(in_image, (pos // doc) * n_images + index + 1, 0)  # unique, nonzero
    else:
        spans = torch.zeros_like(pos)
    span_ids = torch.where(doc_ids >= 0, spans.expand(batch, seq), 0)
    return doc_ids, span_ids


def layout_builder(spec, batch, seq, device):
    """The layout's AttentionMask builder call, with its inputs made beforehand (not timed)."""
    if spec["kind"] == "causal":
        return lambda: AttentionMask.causal(batch, seq, device=device)
    if spec["kind"] == "prefix_lm":
        prefix_lens = torch.full((batch,), int(seq * spec["prefix_fraction"]), device=device)
        return lambda: AttentionMask.prefix_lm(prefix_lens, seq)
    doc_ids, span_ids = packed_ids(spec, batch, seq, device)
    return lambda: AttentionMask.from_spans(doc_ids, span_ids)


def describe_layout(spec, seq) -> str:
    if spec["kind"] == "causal":
        return "pure causal"
    if spec["kind"] == "prefix_lm":
        return f"prefix-LM, bidirectional prefix of {int(seq * spec['prefix_fraction'])} tokens"
    n_docs = -(-seq // spec["doc"])
    text = f"{n_docs} docs of {spec['doc']} (from_spans)"
    n_images = images_per_doc(spec)
    if n_images:
        text += (f", each: text {spec['lead']}, then {n_images} images of {spec['image']} bidirectional "
                 f"tokens {spec['gap']} text tokens apart, text to the end")
    else:
        text += ", causal within each doc (span ids all 0)"
    if spec["pad"]:
        text += f"; the last {spec['pad']} tokens of the last sequence are padding"
    return text


# ---------------------------------------------------------------------------------------------
# Reference and errors
# ---------------------------------------------------------------------------------------------

def reference(q, k, v, dout, dense, scale):
    """(out, dq, dk, dv) in fp32 on the inputs' device: explicit softmax attention with the dense
    mask, fp32 matmuls without TF32, one query head and a block of query rows at a time (512 MiB
    of fp32 scores per block). Rows with no visible key give 0."""
    batch, seq, q_heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dq = torch.empty_like(out)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    has_keys = dense.any(-1)[..., None]  # [B, S, 1]
    rows = max(1, 2**27 // (batch * kv_len))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.enable_grad():
            for h in range(q_heads):
                kh = k.detach()[:, :, h // group].float().requires_grad_()
                vh = v.detach()[:, :, h // group].float().requires_grad_()
                for start in range(0, seq, rows):
                    block = slice(start, start + rows)
                    qb = q.detach()[:, block, h].float().requires_grad_()
                    scores = torch.matmul(qb, kh.transpose(1, 2)) * scale
                    scores = scores.masked_fill(~dense[:, block], float("-inf"))
                    scores = scores.masked_fill(~has_keys[:, block], 0.0)  # no all -inf rows: no NaN
                    probs = torch.softmax(scores, dim=-1) * has_keys[:, block]
                    ob = torch.matmul(probs, vh)
                    gq, gk, gv = torch.autograd.grad(ob, (qb, kh, vh), dout[:, block, h].float())
                    out[:, block, h] = ob.detach()
                    dq[:, block, h] = gq
                    dk[:, :, h // group] += gk
                    dv[:, :, h // group] += gv
                    del scores, probs, ob, gq, gk, gv
    finally:
        torch.set_float32_matmul_precision(precision)
    return out, dq, dk, dv


def rel_error(got, expected) -> float:
    """||got - expected|| / ||expected|| in fp64; NaN when ``got`` is missing or holds a NaN."""
    if got is None:
        return math.nan
    expected = expected.double()
    return ((got.detach().double() - expected).norm() / expected.norm()).item()


def check(result, out, grads, ref, empty, tol):
    """Errors of one implementation's first call against the reference, into ``result``."""
    names = ("out",) if grads is None else ("out", "dq", "dk", "dv")
    got = (out,) if grads is None else (out,) + tuple(grads)
    for name, g, e in zip(names, got, ref):
        result[f"{name}_rel_err"] = rel_error(g, e)
    result["empty_rows"] = int(empty.sum())
    if result["empty_rows"]:
        # out and dq of rows that see no keys: exactly 0
        result["empty_rows_max_abs"] = max(g.detach()[empty].abs().max().item() for g in got[:2])
    result["within_tolerance"] = bool(all(result[f"{name}_rel_err"] <= tol for name in names)
                                      and result.get("empty_rows_max_abs", 0.0) == 0.0)


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------

def heads_first(x):
    return x.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D], a view


def make_impl(impl, case):
    """impl -> (fn(q, k, v) -> out [B, S, Hq, D], extras for the result, why there is no backward
    or None). Raises NotHere where the anchor cannot run here; the setup's own cost (the mask or
    block mask build) is timed here."""
    mask, device, timer, gqa = case["mask"], case["device"], case["timer"], case["gqa"]
    gqa_kw = {"enable_gqa": True} if gqa else {}

    if impl == "unimm":
        return (lambda q, k, v: attention(q, k, v, mask)), dict(
            variant="attention(q, k, v, mask), automatic dispatch", mask_build_ms=case["unimm_build_ms"]), None

    if impl in SDPA_CAUSAL:
        if sdpa_kernel is None:
            raise NotHere("this torch has no torch.nn.attention.sdpa_kernel")
        backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa[flash]" else SDPBackend.CUDNN_ATTENTION
        if impl == "sdpa[cudnn]" and device.type != "cuda":
            raise NotHere("cuDNN attention needs a CUDA device")

        def sdpa_causal(q, k, v):
            with sdpa_kernel([backend]):
                return heads_first(F.scaled_dot_product_attention(
                    heads_first(q), heads_first(k), heads_first(v), is_causal=True, **gqa_kw))
        return sdpa_causal, dict(variant=f"is_causal=True, {backend.name} only"), None

    if impl == SDPA_DENSE:
        kv_len = case["kv_len"]
        build_ms = timer(lambda: mask.to_dense(kv_len), **case["build_counts"])["median_ms"]
        dense = case["dense"][:, None]  # [B, 1, S, Skv]: broadcast over heads

        def sdpa_dense(q, k, v):
            return heads_first(F.scaled_dot_product_attention(
                heads_first(q), heads_first(k), heads_first(v), attn_mask=dense, **gqa_kw))
        return sdpa_dense, dict(variant="SDPA's dispatch, bool mask [B, 1, S, Skv] from mask.to_dense",
                                mask_build_ms=build_ms), None

    if impl == FA4:
        return fa4_impl(case)

    assert impl == FLEX
    if flex_attention is None:
        raise NotHere(_flex_error)
    kv_start, kv_end = mask.kv_start, mask.kv_end
    batch, seq, kv_len = case["batch"], case["seq"], case["kv_len"]

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_start[b, q_idx] <= kv_idx) & (kv_idx < kv_end[b, q_idx])

    def build():
        return create_block_mask(mask_mod, batch, None, seq, kv_len, device=device)

    build_ms = timer(build, **case["build_counts"])["median_ms"]
    block_mask = build()
    if device.type == "cuda":
        torch.compiler.reset()  # compiled afresh for every case: its compile time is its own
        flex = torch.compile(flex_attention, dynamic=False)
        variant, no_backward = "torch.compile(flex_attention), inductor", None
    else:
        # inductor's CPU build takes far longer than a smoke run, and eager flex has no CPU backward
        flex = flex_attention
        variant, no_backward = "eager flex_attention, forward only", "FlexAttention has no backward on the CPU"

    def flex_fn(q, k, v):
        if no_backward:
            q, k, v = q.detach(), k.detach(), v.detach()  # it refuses inputs that require grad
        return heads_first(flex(heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask, **gqa_kw))
    return flex_fn, dict(variant=variant, mask_build_ms=build_ms,
                         block_size=list(block_mask.BLOCK_SIZE)), no_backward


def fa4_impl(case):
    """FlashAttention-4 (CuTe DSL) where a layout is what its plain interface expresses: pure
    causal (``causal=True``) and packed causal documents (the varlen interface over the flattened
    rows, documents as ``cu_seqlens``). Bidirectional spans would need its ``mask_mod`` with block
    sparsity, not wired here: n/a."""
    if fa4_func is None:
        raise NotHere(_fa4_error)
    if case["device"].type != "cuda":
        raise NotHere("a CuTe DSL GPU kernel: needs a CUDA device")
    spec, batch, seq = case["layout_spec"], case["batch"], case["seq"]
    if spec["kind"] == "causal":
        return (lambda q, k, v: fa4_func(q, k, v, causal=True)[0]), dict(variant="flash_attn_func(causal=True)"), None
    if spec["kind"] != "packed" or spec["image"] or spec["pad"]:
        raise NotHere("bidirectional spans or padding need flash-attn-4's mask_mod with block sparsity, "
                      "not wired in this benchmark")
    doc = spec["doc"]
    bounds = sorted({row * seq + start for row in range(batch) for start in range(0, seq, doc)} | {batch * seq})
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=case["device"])
    longest = min(doc, seq)

    def fa4_varlen(q, k, v):
        flat = [x.reshape(batch * seq, x.shape[2], x.shape[3]) for x in (q, k, v)]
        out = fa4_varlen_func(*flat, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=longest,
                              max_seqlen_k=longest, causal=True)[0]
        return out.view(q.shape)
    return fa4_varlen, dict(variant="flash_attn_varlen_func(causal=True), documents as cu_seqlens"), None


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_backward(fn, inputs, dout, forward_ms, timer, counts):
    """Backward alone on a retained graph; (forward + backward) - forward if that is refused."""
    out = fn(*inputs)
    try:
        stats = timer(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True), **counts)
        return dict(stats, method="retained graph")
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        refused = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    out = None
    both = timer(lambda: torch.autograd.grad(fn(*inputs), inputs, dout), **counts)
    return dict(median_ms=both["median_ms"] - forward_ms, fwd_bwd_median_ms=both["median_ms"],
                method=f"(forward + backward) - forward; the retained graph was refused ({refused})")


def run_impl(result, fn, no_backward, case, ref):
    """One implementation on one case: a checked first call, then forward and backward timing and
    peak memory. Fills ``result``; raises what the caller turns into n/a."""
    q, k, v, dout = case["q"], case["k"], case["v"], case["dout"]
    device, timer, counts = case["device"], case["timer"], case["counts"]
    inputs = (q, k, v)

    start = time.perf_counter()
    out = fn(q, k, v)
    grads = None if no_backward else torch.autograd.grad(out, inputs, dout)
    sync(device)
    result["first_call_s"] = time.perf_counter() - start
    if ref is not None:
        check(result, out, grads, ref, case["empty"], case["tol"])
    del out, grads
    release(device)

    forward = timer(lambda: fn(q, k, v), **counts)  # builds the graph, which the next call drops
    result["forward"] = forward
    if no_backward:
        result["backward"] = None
        result["backward_reason"] = no_backward
        return
    result["backward"] = time_backward(fn, inputs, dout, forward["median_ms"], timer, counts)
    release(device)
    if device.type == "cuda":
        result["extra_peak_bytes"] = peak_memory(lambda: torch.autograd.grad(fn(q, k, v), inputs, dout))


def throughput(result, flops, peaks):
    for direction, factor in zip(DIRECTIONS, (1.0, BWD_FLOP_FACTOR)):
        stats = result.get(direction)
        if stats is None:
            continue
        stats["tflops"] = factor * flops / (stats["median_ms"] * 1e-3) / 1e12 if stats["median_ms"] > 0 else math.nan
        if peaks is not None:
            stats["pct_bf16_peak"] = 100 * stats["tflops"] / peaks["bf16_matmul_tflops"]


def fmt_ms(stats):
    return "n/a" if stats is None else f"{stats['median_ms']:9.3f} ms {stats['tflops']:7.2f} TFLOP/s"


def bench_case(layout, layout_spec, shape, shape_spec, dtype, device, timer, counts, build_counts, peaks,
               quick=False):
    """One result dict per implementation for one layout and one head shape, same inputs."""
    batch, seq, q_heads, kv_heads, dim = shape_spec
    kv_len = seq
    torch.manual_seed(0)
    q = torch.randn(batch, seq, q_heads, dim, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(batch, kv_len, kv_heads, dim, device=device, dtype=dtype).requires_grad_()
    v = torch.randn(batch, kv_len, kv_heads, dim, device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(batch, seq, q_heads, dim, device=device, dtype=dtype)

    builder = layout_builder(layout_spec, batch, seq, device)
    mask = builder()
    unimm_build_ms = timer(builder, **build_counts)["median_ms"]
    kv_start = mask.kv_start.long().clamp(min=0)
    kv_end = mask.kv_end.long().clamp(max=kv_len)
    pairs = int((kv_end - kv_start).clamp_min(0).sum())
    empty = kv_end <= kv_start  # rows that see no keys
    flops = 4 * dim * q_heads * pairs
    dense = mask.to_dense(kv_len)
    assert int(dense.sum()) == pairs, "to_dense disagrees with kv_start / kv_end"
    case_info = dict(layout=layout, shape=shape, visible_pairs=pairs, density=pairs / (batch * seq * kv_len))
    print(f"\n{layout} / {shape}: B={batch} S={seq} Hq={q_heads} Hkv={kv_heads} D={dim}, "
          f"{pairs} visible pairs ({100 * case_info['density']:.1f}% of S x Skv), {int(empty.sum())} rows see no keys, "
          f"AttentionMask build {unimm_build_ms:.3f} ms")

    ref = None
    try:
        ref = reference(q, k, v, dout, dense, dim**-0.5)
    except torch.OutOfMemoryError as error:
        print(f"  fp32 reference ran out of memory, no correctness check: {str(error).splitlines()[0]}")
    release(device)

    case = dict(mask=mask, dense=dense, device=device, timer=timer, counts=counts, build_counts=build_counts,
                layout_spec=layout_spec,
                gqa=q_heads != kv_heads, batch=batch, seq=seq, kv_len=kv_len, unimm_build_ms=unimm_build_ms,
                q=q, k=k, v=v, dout=dout, empty=empty, tol=TOLERANCE[dtype])
    impls = ("unimm",) + (SDPA_CAUSAL if layout == PURE_CAUSAL else (SDPA_DENSE,)) + (FLEX, FA4)
    results = []
    for impl in impls:
        result = dict(case_info, impl=impl)
        results.append(result)
        reason = None
        try:
            if quick and impl not in ("unimm",) + (SDPA_CAUSAL + (FA4,) if layout == PURE_CAUSAL else (FLEX,)):
                raise NotHere("left out of --quick runs")
            fn, extras, no_backward = make_impl(impl, case)
            result.update(extras)
            run_impl(result, fn, no_backward, case, ref)
        except NotHere as error:
            reason = str(error)
        except BackendUnavailable as error:
            reason = str(error)
        except torch.OutOfMemoryError as error:
            reason = f"out of memory: {str(error).splitlines()[0]}"
        except Exception as error:  # an anchor's own failure is its n/a; unimm's is a bug
            if impl == "unimm":
                raise
            reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        fn = None
        release(device)
        if reason is not None:
            for key in [key for key in result if key not in dict(case_info, impl=None)]:
                del result[key]
            result.update(available=False, reason=reason)
            print(f"  {impl:>17}  n/a: {reason}")
            continue
        result["available"] = True
        throughput(result, flops, peaks)
        if impl == FLEX and device.type == "cuda":
            result["compile_s"] = result["first_call_s"]
        names = [name for name in ("out", "dq", "dk", "dv") if f"{name}_rel_err" in result]
        errors = "" if not names else f"  err {'/'.join(names)} " + " ".join(
            f"{result[f'{name}_rel_err']:.1e}" for name in names)
        print(f"  {impl:>17}  fwd {fmt_ms(result['forward'])}  bwd {fmt_ms(result['backward'])}"
              + (f"  build {result['mask_build_ms']:.3f} ms" if "mask_build_ms" in result else "")
              + (f"  extra {result['extra_peak_bytes'] / 2**20:.0f} MiB" if "extra_peak_bytes" in result else "")
              + (f"  compile {result['compile_s']:.1f} s" if "compile_s" in result else "") + errors)
    del q, k, v, dout, ref, dense, case, mask
    release(device)

    by_impl = {r["impl"]: r for r in results if r["available"]}
    if "unimm" in by_impl:
        unimm = by_impl["unimm"]
        unimm["speedup"] = {direction: {} for direction in DIRECTIONS}
        for anchor, row in by_impl.items():
            for direction in DIRECTIONS:
                if anchor != "unimm" and row.get(direction) and unimm.get(direction):
                    unimm["speedup"][direction][anchor] = row[direction]["median_ms"] / unimm[direction]["median_ms"]
    return results


# ---------------------------------------------------------------------------------------------
# Targets and output
# ---------------------------------------------------------------------------------------------

def combine(values):
    """Several judgements into one: any failure fails, else any unjudged leaves it unjudged."""
    if not values:
        return None
    return False if False in values else (None if None in values else True)


def check_targets(results, layouts, shapes):
    """Each part of the target -> True / False / None (not judged), plus what stopped a judgement.
    Pure causal is judged against the faster of sdpa[flash] / sdpa[cudnn]."""
    checks = {f"{kind}_{direction}": [] for kind in ("causal_vs_sdpa", "mixed_vs_flex") for direction in DIRECTIONS}
    why = []
    for layout in layouts:
        kind = "causal_vs_sdpa" if layout == PURE_CAUSAL else "mixed_vs_flex"
        anchors, needed = (SDPA_CAUSAL, TARGET_VS_SDPA) if layout == PURE_CAUSAL else ((FLEX,), TARGET_VS_FLEX)
        for shape in shapes:
            rows = {r["impl"]: r for r in results if r["layout"] == layout and r["shape"] == shape}
            unimm = rows.get("unimm", {})
            for direction in DIRECTIONS:
                values = checks[f"{kind}_{direction}"]
                if not unimm.get("available") or unimm.get(direction) is None:
                    values.append(False)
                    continue
                speedups = [unimm["speedup"][direction][a] for a in anchors if a in unimm["speedup"][direction]]
                if speedups:
                    values.append(min(speedups) >= needed)
                else:
                    values.append(None)
                    why.append(f"{layout}/{shape} {direction}: {' and '.join(anchors)} n/a")
    parts = {key: combine(values) for key, values in checks.items()}
    return parts, combine(list(parts.values())), sorted(set(why))


def show(stats, key, spec):
    value = None if stats is None else stats.get(key)
    return "-" if value is None else format(value, spec)


def table_row(result, results):
    """The printed form of one result; anchor rows carry unimm's speedup over them."""
    unimm = next((r for r in results if r["impl"] == "unimm" and r["layout"] == result["layout"]
                  and r["shape"] == result["shape"] and r["available"]), None)
    speedup = {direction: (unimm or {}).get("speedup", {}).get(direction, {}).get(result["impl"])
               for direction in DIRECTIONS}
    forward, backward = result.get("forward"), result.get("backward")
    na = "n/a" if not result["available"] else "-"
    return {
        "layout": result["layout"],
        "shape": result["shape"],
        "impl": result["impl"],
        "fwd ms": show(forward, "median_ms", ".3f") if forward else na,
        "bwd ms": show(backward, "median_ms", ".3f") if backward else na,
        "fwd TFLOP/s": show(forward, "tflops", ".1f"),
        "bwd TFLOP/s": show(backward, "tflops", ".1f"),
        "fwd % peak": show(forward, "pct_bf16_peak", ".1f"),
        "bwd % peak": show(backward, "pct_bf16_peak", ".1f"),
        "unimm speedup fwd": show(speedup, "forward", ".2f"),
        "unimm speedup bwd": show(speedup, "backward", ".2f"),
        "mask build ms": show(result, "mask_build_ms", ".3f"),
        "extra MiB": "-" if "extra_peak_bytes" not in result else f"{result['extra_peak_bytes'] / 2**20:.0f}",
        "out err": show(result, "out_rel_err", ".1e"),
        "dq err": show(result, "dq_rel_err", ".1e"),
        "dk err": show(result, "dk_rel_err", ".1e"),
        "dv err": show(result, "dv_rel_err", ".1e"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_run(__doc__, "attention", SHAPES, SMOKE_SHAPES, default_dtype="bf16", quick_shapes=QUICK_SHAPES,
                     smoke_dtype="fp32", dtype_help="; fp32 with --smoke, CPU bf16 matmuls being slow",
                     add_arguments=lambda parser: parser.add_argument(
                         "--layouts", help=f"comma-separated subset of {','.join(LAYOUTS)}; default all "
                                           f"({','.join(QUICK_LAYOUTS)} with --quick)"), argv=argv)
    layout_names = (args.layouts.split(",") if args.layouts else
                    list(QUICK_LAYOUTS) if args.quick else list(LAYOUTS))
    unknown = [name for name in layout_names if name not in LAYOUTS]
    if unknown:
        sys.exit(f"unimm.bench.attention: unknown layouts {unknown}; choose from {','.join(LAYOUTS)}")
    shapes, names, dtype_name, dtype = args.shape_table, args.names, args.dtype_name, args.dtype
    device, timer = args.device, args.timer
    if args.smoke:
        torch.set_num_threads(1)  # tiny CPU tensors: thread-pool wake-ups would dominate every call
    layouts = SMOKE_LAYOUTS if args.smoke else LAYOUTS
    counts = dict(warmup=SMOKE_WARMUP, repeat=SMOKE_REPEAT) if args.smoke else dict(warmup=WARMUP, repeat=REPEAT)
    build_counts = (dict(warmup=SMOKE_WARMUP, repeat=SMOKE_REPEAT) if args.smoke
                    else dict(warmup=BUILD_WARMUP, repeat=BUILD_REPEAT))
    env, peaks = start_run(args)

    results = []
    for layout in layout_names:
        for name in names:
            results += bench_case(layout, layouts[layout], name, shapes[name], dtype, device, timer,
                                  counts, build_counts, peaks, args.quick)

    parts, target_met, undecided = check_targets(results, layout_names, names)
    if args.smoke:  # CPU times say nothing about an H100 target
        parts = {key: None for key in parts}
        target_met, undecided = None, ["smoke run"]
    payload = dict(
        target=TARGET,
        target_met=target_met,
        target_parts=parts,
        target_not_judged=undecided,
        smoke=args.smoke,
        environment=env,
        peaks=peaks,
        dtype=dtype_name,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        timing=dict(timer=timer.__name__, **counts, build_warmup=build_counts["warmup"],
                    build_repeat=build_counts["repeat"],
                    forward="one call with q, k, v requiring grad (graph built, then dropped)",
                    backward="torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) on one forward's graph"),
        flops=f"forward 4*D*Hq*visible_pairs, backward {BWD_FLOP_FACTOR}x that",
        reference="explicit softmax attention in fp32 with the dense mask (fp32 matmuls, no TF32), "
                  "per query head and block of query rows",
        tolerance=TOLERANCE[dtype],
        shapes={name: dict(batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d)
                for name, (b, s, hq, hkv, d) in ((name, shapes[name]) for name in names)},
        layouts={layout: dict(layouts[layout], mixed=layout != PURE_CAUSAL,
                              description=describe_layout(layouts[layout], shapes[names[0]][1]))
                 for layout in layout_names},
        results=results,
    )
    path = save(payload, args)

    print_outcome(path, TARGET, args.smoke, env, f"target {verdict(target_met)}: "
          + ", ".join(f"{key} {verdict(value)}" for key, value in parts.items())
          + (f" [not judged: {', '.join(undecided)}]" if undecided else ""))
    compiled = [r for r in results if "compile_s" in r]
    if compiled:
        print("flex_attention first call (forward + backward), compilation included: "
              + ", ".join(f"{r['layout']}/{r['shape']} {r['compile_s']:.1f} s" for r in compiled))
    checked = [r for r in results if "within_tolerance" in r]
    off = [f"{r['layout']}/{r['shape']}/{r['impl']}" for r in checked if not r["within_tolerance"]]
    print(f"out, dq, dk, dv vs the fp32 reference (tolerance {TOLERANCE[dtype]:g}, relative; rows with no keys "
          "exactly 0): " + (f"outside tolerance for {', '.join(off)}" if off
                            else f"all {len(checked)} checked runs within tolerance"))
    for r in results:
        if not r["available"]:
            print(f"n/a {r['layout']}/{r['shape']}/{r['impl']}: {r['reason']}")
        elif r.get("backward") is None:
            print(f"no backward {r['layout']}/{r['shape']}/{r['impl']}: {r['backward_reason']}")
        elif r["backward"]["method"] != "retained graph":
            print(f"backward of {r['layout']}/{r['shape']}/{r['impl']} timed as {r['backward']['method']}")
    print("unimm speedup = the row's median time / unimm's median time at the same layout and shape; "
          "TFLOP/s count visible pairs only; errors are against the fp32 reference\n")
    rows = [table_row(result, results) for result in results]
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
