"""Attention with interval masks: unimm.kernels.attention against SDPA and FlexAttention.

Every layout is one ``AttentionMask`` (docs/ARCHITECTURE.md, "Attention masks"): per query row one
range of visible keys ``[kv_start, kv_end)``, or two (``sinks-window``). For each layout and head
shape, in this process on the same bf16 inputs (q, k, v in unimm's layout [B, S, H, D], all requiring grad):
  * unimm: ``attention(q, k, v, mask)`` with the layout's AttentionMask, automatic dispatch; the
    row's ``served_by`` names the kernel that ran (``attention_backend``: "triton", or the vendor
    kernel "sdpa" / "flash_attn_varlen" for plain causal / packed causal documents).
  * unimm[triton]: the same call with ``UNIMM_BACKEND=triton``, unimm's own kernel, where
    automatic dispatch chose a vendor kernel.
  * sdpa[flash], sdpa[cudnn] (pure causal only): ``F.scaled_dot_product_attention`` with
    ``is_causal=True`` on [B, H, S, D] views (transposes, no copies), restricted to one backend
    with ``sdpa_kernel``.
  * sdpa[dense mask] (every other layout): SDPA's own dispatch with the boolean mask
    ``mask.to_dense(Skv)`` broadcast over heads, [B, 1, S, Skv].
  * flex_attention: ``torch.compile(flex_attention)`` with a block mask from
    ``create_block_mask`` over the mask's own ``mask_mod()``, which reads the same interval
    tensors (``kv_start[b, q] <= kv < kv_end[b, q]``, or the second interval); compiled afresh
    for every case, its first call (compilation included) reported as ``compile_s``. Not
    importable, or failing: n/a with the reason.
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
sum over rows of their intervals' lengths, forward 4*D*Hq*pairs, backward 2.5x that.

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

import functools
import math
import time

import torch
import torch.nn.functional as F

from unimm.bench._attention_cases import OWN, check, describe_layout, layout_builder, reference, unimm_impl
from unimm.bench._harness import NotHere, attempt, first_line, fold, mark_na, optional_import, parse_run, show, verdict
from unimm.kernels.attention import attention_backend
from unimm.testing import BENCH_TOLERANCE

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None
flex, _flex_error = optional_import("torch.nn.attention.flex_attention", "FlexAttention")
fa4, _fa4_error = optional_import("flash_attn.cute", "flash-attn-4")  # FlashAttention-4, CuTe DSL

TARGET = ("on H100: >= 0.85x SDPA's flash/cuDNN on pure causal, >= 1.3x FlexAttention on the mixed "
          "layouts, forward and backward")
TARGET_VS_SDPA = 0.85
TARGET_VS_FLEX = 1.3
COUNTS = dict(warmup=10, repeat=30)  # a call is milliseconds to tens of ms at 16k tokens
BUILD_COUNTS = dict(warmup=2, repeat=10)
SMOKE_COUNTS = dict(warmup=1, repeat=3)  # the smoke run checks the script, it measures nothing

# name: (batch B, tokens per sequence S, query heads Hq, key/value heads Hkv, head dim D)
SHAPES = {
    "h16-d128": (1, 16384, 16, 16, 128),
    "h32-d64": (1, 16384, 32, 32, 64),
    "gqa32-8-d128-s8k": (1, 8192, 32, 8, 128),  # Llama-3-8B's heads
    "gqa32-8-d128": (1, 16384, 32, 8, 128),
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
    # two intervals per row: the first ``sinks`` keys plus a causal window of ``window``
    "sinks-window": dict(kind="sinks_window", sinks=128, window=4096),
}
SMOKE_LAYOUTS = {
    "causal": dict(kind="causal"),
    "prefix-lm": dict(kind="prefix_lm", prefix_fraction=0.5),
    "packed-images": dict(kind="packed", doc=48, image=16, lead=4, gap=8, pad=8),
    "packed-causal": dict(kind="packed", doc=24, image=0, lead=0, gap=0, pad=8),
    "sinks-window": dict(kind="sinks_window", sinks=4, window=24),
}
PURE_CAUSAL = "causal"  # every other layout is "mixed" for the target
# --quick: one head shape; pure causal against SDPA's fused kernels, one mixed layout against FlexAttention
QUICK_SHAPES = ("h16-d128",)
QUICK_LAYOUTS = ("causal", "packed-images")

SDPA_CAUSAL = ("sdpa[flash]", "sdpa[cudnn]")
SDPA_DENSE = "sdpa[dense mask]"
FLEX = "flex_attention"
FA4 = "flash-attn-4"
IMPLS = ("unimm", OWN) + SDPA_CAUSAL + (SDPA_DENSE, FLEX, FA4)
DIRECTIONS = ("forward", "backward")
BWD_FLOP_FACTOR = 2.5


# ---------------------------------------------------------------------------------------------
# Implementations
# ---------------------------------------------------------------------------------------------

def heads_first(x):
    return x.transpose(1, 2)  # [B, S, H, D] -> [B, H, S, D], a view


def make_impl(impl, case, run):
    """impl -> (fn(q, k, v) -> out [B, S, Hq, D], extras for the result, why there is no backward
    or None). Raises NotHere where the anchor cannot run here; the setup's own cost (the mask or
    block mask build) is timed here."""
    mask, device, gqa = case["mask"], run.device, case["gqa"]
    gqa_kw = {"enable_gqa": True} if gqa else {}

    if impl in ("unimm", OWN):
        return unimm_impl(impl, case)

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
        build_ms = run.time(lambda: mask.to_dense(kv_len), **case["build_counts"])["median_ms"]
        dense = case["dense"][:, None]  # [B, 1, S, Skv]: broadcast over heads

        def sdpa_dense(q, k, v):
            return heads_first(F.scaled_dot_product_attention(
                heads_first(q), heads_first(k), heads_first(v), attn_mask=dense, **gqa_kw))
        return sdpa_dense, dict(variant="SDPA's dispatch, bool mask [B, 1, S, Skv] from mask.to_dense",
                                mask_build_ms=build_ms), None

    if impl == FA4:
        return fa4_impl(case, device)

    assert impl == FLEX
    if flex is None:
        raise NotHere(_flex_error)
    batch, seq, kv_len = case["batch"], case["seq"], case["kv_len"]
    mask_mod = mask.mask_mod()  # reads the mask's own interval tensors (one or two per row)

    def build():
        return flex.create_block_mask(mask_mod, batch, None, seq, kv_len, device=device)

    build_ms = run.time(build, **case["build_counts"])["median_ms"]
    block_mask = build()
    if device.type == "cuda":
        torch.compiler.reset()  # compiled afresh for every case: its compile time is its own
        flex_kernel = torch.compile(flex.flex_attention, dynamic=False)
        variant, no_backward = "torch.compile(flex_attention), inductor", None
    else:
        # inductor's CPU build takes far longer than a smoke run, and eager flex has no CPU backward
        flex_kernel = flex.flex_attention
        variant, no_backward = "eager flex_attention, forward only", "FlexAttention has no backward on the CPU"

    def flex_fn(q, k, v):
        if no_backward:
            q, k, v = q.detach(), k.detach(), v.detach()  # it refuses inputs that require grad
        return heads_first(flex_kernel(heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask, **gqa_kw))
    return flex_fn, dict(variant=variant, mask_build_ms=build_ms,
                         block_size=list(block_mask.BLOCK_SIZE)), no_backward


def fa4_impl(case, device):
    """FlashAttention-4 (CuTe DSL) where a layout is what its plain interface expresses: pure
    causal (``causal=True``) and packed causal documents (the varlen interface over the flattened
    rows, documents as ``cu_seqlens``). Bidirectional spans would need its ``mask_mod`` with block
    sparsity, not wired here: n/a."""
    if fa4 is None:
        raise NotHere(_fa4_error)
    if device.type != "cuda":
        raise NotHere("a CuTe DSL GPU kernel: needs a CUDA device")
    spec, batch, seq = case["layout_spec"], case["batch"], case["seq"]
    if spec["kind"] == "causal":
        return (lambda q, k, v: fa4.flash_attn_func(q, k, v, causal=True)[0],
                dict(variant="flash_attn_func(causal=True)"), None)
    if spec["kind"] != "packed" or spec["image"] or spec["pad"]:
        raise NotHere("bidirectional spans or padding need flash-attn-4's mask_mod with block sparsity, "
                      "not wired in this benchmark")
    doc = spec["doc"]
    bounds = sorted({row * seq + start for row in range(batch) for start in range(0, seq, doc)} | {batch * seq})
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
    longest = min(doc, seq)

    def fa4_varlen(q, k, v):
        flat = [x.reshape(batch * seq, x.shape[2], x.shape[3]) for x in (q, k, v)]
        out = fa4.flash_attn_varlen_func(*flat, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=longest,
                                         max_seqlen_k=longest, causal=True)[0]
        return out.view(q.shape)
    return fa4_varlen, dict(variant="flash_attn_varlen_func(causal=True), documents as cu_seqlens"), None


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def time_backward(fn, inputs, dout, forward_ms, run):
    """Backward alone on a retained graph; (forward + backward) - forward if that is refused."""
    out = fn(*inputs)
    try:
        stats = run.time(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
        return dict(stats, method="retained graph")
    except torch.OutOfMemoryError:
        raise
    except Exception as error:
        refused = first_line(error)
    out = None
    both = run.time(lambda: torch.autograd.grad(fn(*inputs), inputs, dout))
    return dict(median_ms=both["median_ms"] - forward_ms, fwd_bwd_median_ms=both["median_ms"],
                method=f"(forward + backward) - forward; the retained graph was refused ({refused})")


def run_impl(result, impl, case, ref, run):
    """One implementation on one case: a checked first call, then forward and backward timing and
    peak memory. Fills ``result``; raises what the caller turns into n/a."""
    if run.quick and impl not in ("unimm", OWN) + (SDPA_CAUSAL + (FA4,) if case["layout"] == PURE_CAUSAL else (FLEX,)):
        raise NotHere("left out of --quick runs")
    fn, extras, no_backward = make_impl(impl, case, run)
    result.update(extras)
    q, k, v, dout = case["q"], case["k"], case["v"], case["dout"]
    inputs = (q, k, v)

    start = time.perf_counter()
    out = fn(q, k, v)
    grads = None if no_backward else torch.autograd.grad(out, inputs, dout)
    run.sync()
    result["first_call_s"] = time.perf_counter() - start
    if ref is not None:
        check(result, out, grads, ref, case["empty"], BENCH_TOLERANCE[run.dtype])
    del out, grads
    run.release()

    forward = run.time(lambda: fn(q, k, v))  # builds the graph, which the next call drops
    result["forward"] = forward
    if no_backward:
        result["backward"] = None
        result["backward_reason"] = no_backward
        return
    result["backward"] = time_backward(fn, inputs, dout, forward["median_ms"], run)
    run.release()
    if run.device.type == "cuda":
        result["extra_peak_bytes"] = run.peak_memory(lambda: torch.autograd.grad(fn(q, k, v), inputs, dout))


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


def bench_case(layout, layout_spec, shape, shape_spec, run, build_counts):
    """One result dict per implementation for one layout and one head shape, same inputs."""
    batch, seq, q_heads, kv_heads, dim = shape_spec
    device, dtype, kv_len = run.device, run.dtype, seq
    torch.manual_seed(0)
    q = torch.randn(batch, seq, q_heads, dim, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(batch, kv_len, kv_heads, dim, device=device, dtype=dtype).requires_grad_()
    v = torch.randn(batch, kv_len, kv_heads, dim, device=device, dtype=dtype).requires_grad_()
    dout = torch.randn(batch, seq, q_heads, dim, device=device, dtype=dtype)

    builder = layout_builder(layout_spec, batch, seq, device)
    mask = builder()
    unimm_build_ms = run.time(builder, **build_counts)["median_ms"]
    pairs = mask.visible_pairs()  # over every interval of a row (one or two)
    flops = 4 * dim * q_heads * pairs
    dense = mask.to_dense(kv_len)
    empty = ~dense.any(-1)  # rows that see no keys
    assert int(dense.sum()) == pairs, "to_dense disagrees with the mask's intervals"
    case_info = dict(layout=layout, shape=shape, visible_pairs=pairs, density=pairs / (batch * seq * kv_len))
    print(f"\n{layout} / {shape}: B={batch} S={seq} Hq={q_heads} Hkv={kv_heads} D={dim}, "
          f"{pairs} visible pairs ({100 * case_info['density']:.1f}% of S x Skv), {int(empty.sum())} rows see no keys, "
          f"AttentionMask build {unimm_build_ms:.3f} ms")

    ref = None
    try:
        ref = reference(q, k, v, dout, dense, dim**-0.5)
    except torch.OutOfMemoryError as error:
        print(f"  fp32 reference ran out of memory, no correctness check: {str(error).splitlines()[0]}")
    run.release()

    case = dict(layout=layout, mask=mask, dense=dense, build_counts=build_counts, layout_spec=layout_spec,
                gqa=q_heads != kv_heads, batch=batch, seq=seq, kv_len=kv_len, unimm_build_ms=unimm_build_ms,
                q=q, k=k, v=v, dout=dout, empty=empty)
    own = (OWN,) if attention_backend(q, k, v, mask) not in ("triton", "reference") else ()  # vendor served "unimm"
    impls = ("unimm",) + own + (SDPA_CAUSAL if layout == PURE_CAUSAL else (SDPA_DENSE,)) + (FLEX, FA4)
    results = []
    for impl in impls:
        result = dict(case_info, impl=impl)
        results.append(result)
        # an anchor's own failure is its n/a; unimm's is a bug
        reason = attempt(functools.partial(run_impl, result, impl, case, ref, run), is_bug=impl == "unimm")
        run.release()
        if reason is not None:
            mark_na(result, reason, tuple(case_info) + ("impl",), f"  {impl:>17}")
            continue
        result["available"] = True
        throughput(result, flops, run.peaks)
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
    run.release()

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

def check_targets(results, layouts, shapes):
    """Each part of the target -> True / False / None (not judged), plus what stopped a judgement.
    Pure causal is judged against the faster of sdpa[flash] / sdpa[cudnn]. Judged is unimm's own
    kernel (the unimm[triton] row where automatic dispatch chose a vendor kernel)."""
    checks = {f"{kind}_{direction}": [] for kind in ("causal_vs_sdpa", "mixed_vs_flex") for direction in DIRECTIONS}
    why = []
    for layout in layouts:
        kind = "causal_vs_sdpa" if layout == PURE_CAUSAL else "mixed_vs_flex"
        anchors, needed = (SDPA_CAUSAL, TARGET_VS_SDPA) if layout == PURE_CAUSAL else ((FLEX,), TARGET_VS_FLEX)
        for shape in shapes:
            rows = {r["impl"]: r for r in results if r["layout"] == layout and r["shape"] == shape}
            unimm = rows[OWN] if rows.get(OWN, {}).get("available") else rows.get("unimm", {})
            for direction in DIRECTIONS:
                values = checks[f"{kind}_{direction}"]
                if not unimm.get("available") or unimm.get(direction) is None:
                    values.append(False)
                    continue
                speedups = [rows[a][direction]["median_ms"] / unimm[direction]["median_ms"] for a in anchors
                            if rows.get(a, {}).get("available") and rows[a].get(direction)]
                if speedups:
                    values.append(min(speedups) >= needed)
                else:
                    values.append(None)
                    why.append(f"{layout}/{shape} {direction}: {' and '.join(anchors)} n/a")
    parts = {key: fold(values) for key, values in checks.items()}
    return parts, fold(parts.values()), sorted(set(why))


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
        "impl": result["impl"] + (f" ({result['served_by']})" if "served_by" in result else ""),
        "fwd ms": show(forward, "median_ms", ".3f") if forward else na,
        "bwd ms": show(backward, "median_ms", ".3f") if backward else na,
        "fwd TFLOP/s": show(forward, "tflops", ".1f"),
        "bwd TFLOP/s": show(backward, "tflops", ".1f"),
        "fwd % peak": show(forward, "pct_bf16_peak", ".1f"),
        "bwd % peak": show(backward, "pct_bf16_peak", ".1f"),
        "unimm speedup fwd": show(speedup, "forward", ".2f"),
        "unimm speedup bwd": show(speedup, "backward", ".2f"),
        "mask build ms": show(result, "mask_build_ms", ".3f"),
        "extra MiB": show(result, "extra_peak_bytes", ".0f", 2**-20),
        "out err": show(result, "out_rel_err", ".1e"),
        "dq err": show(result, "dq_rel_err", ".1e"),
        "dk err": show(result, "dk_rel_err", ".1e"),
        "dv err": show(result, "dv_rel_err", ".1e"),
    }


def main(argv: list[str] | None = None) -> int:
    run = parse_run(__doc__, "attention", SHAPES, SMOKE_SHAPES, default_dtype="bf16", counts=COUNTS,
                     smoke_counts=SMOKE_COUNTS, quick_shapes=QUICK_SHAPES, smoke_dtype="fp32",
                     dtype_help="; fp32 with --smoke, CPU bf16 matmuls being slow",
                     add_arguments=lambda parser: parser.add_argument(
                         "--layouts", help=f"comma-separated subset of {','.join(LAYOUTS)}; default all "
                                           f"({','.join(QUICK_LAYOUTS)} with --quick)"), argv=argv)
    layout_names = run.choose(run.layouts, LAYOUTS, QUICK_LAYOUTS if run.quick else LAYOUTS, "layouts")
    shapes, names = run.shape_table, run.names
    if run.smoke:
        torch.set_num_threads(1)  # tiny CPU tensors: thread-pool wake-ups would dominate every call
    layouts = SMOKE_LAYOUTS if run.smoke else LAYOUTS
    build_counts = SMOKE_COUNTS if run.smoke else BUILD_COUNTS
    run.start()

    results = []
    for layout in layout_names:
        for name in names:
            results += bench_case(layout, layouts[layout], name, shapes[name], run, build_counts)

    parts, target_met, undecided = check_targets(results, layout_names, names)
    if run.smoke:  # CPU times say nothing about an H100 target
        parts = {key: None for key in parts}
        target_met, undecided = None, ["smoke run"]
    tolerance = BENCH_TOLERANCE[run.dtype]
    payload = dict(
        target=TARGET,
        target_met=target_met,
        target_parts=parts,
        target_not_judged=undecided,
        **run.fields(),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        timing=dict(timer=run.timer.__name__, **run.counts, build_warmup=build_counts["warmup"],
                    build_repeat=build_counts["repeat"],
                    forward="one call with q, k, v requiring grad (graph built, then dropped)",
                    backward="torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) on one forward's graph"),
        flops=f"forward 4*D*Hq*visible_pairs, backward {BWD_FLOP_FACTOR}x that",
        reference="explicit softmax attention in fp32 with the dense mask (fp32 matmuls, no TF32), "
                  "per query head and block of query rows",
        tolerance=tolerance,
        shapes={name: dict(batch=b, seq_len=s, q_heads=hq, kv_heads=hkv, head_dim=d)
                for name, (b, s, hq, hkv, d) in ((name, shapes[name]) for name in names)},
        layouts={layout: dict(layouts[layout], mixed=layout != PURE_CAUSAL,
                              description=describe_layout(layouts[layout], shapes[names[0]][1]))
                 for layout in layout_names},
        results=results,
    )
    notes = [f"no backward {r['layout']}/{r['shape']}/{r['impl']}: {r['backward_reason']}"
             for r in results if r["available"] and r.get("backward") is None]
    notes += [f"backward of {r['layout']}/{r['shape']}/{r['impl']} timed as {r['backward']['method']}"
              for r in results if r["available"] and r.get("backward") and r["backward"]["method"] != "retained graph"]
    notes = [f"no backward {r['layout']}/{r['shape']}/{r['impl']}: {r['backward_reason']}"
             for r in results if r["available"] and r.get("backward") is None]
    notes += [f"backward of {r['layout']}/{r['shape']}/{r['impl']} timed as {r['backward']['method']}"
              for r in results if r["available"] and r.get("backward") and r["backward"]["method"] != "retained graph"]
    outcome = f"target {verdict(target_met)}: " + ", ".join(f"{key} {verdict(value)}" for key, value in parts.items())
    run.report(payload, outcome, undecided=undecided, case=("layout", "shape"), notes=notes,
               compiled="flex_attention first call (forward + backward), compilation included",
               agreement=f"out, dq, dk, dv vs the fp32 reference (tolerance {tolerance:g}, relative; rows with no "
                         "keys exactly 0)",
               tables=[("unimm speedup = the row's median time / unimm's median time at the same layout and shape; "
                        "TFLOP/s count visible pairs only; errors are against the fp32 reference",
                        [table_row(result, results) for result in results])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
