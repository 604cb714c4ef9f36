"""Fused linear + cross-entropy: unimm.kernels.linear_cross_entropy against the losses LLM trainers use.

Each implementation runs forward + backward (``loss.backward()``, gradients for hidden and
weight, set to None between calls as ``zero_grad()`` does) in this process on the same inputs:
  * torch materialised: ``logits = (hidden @ weight.T).float()`` (Gemma-2 soft-capping
    ``c * tanh(logits / c)`` where the shape has it), then ``F.cross_entropy``: the full N x V
    logits, in fp32, live through the backward.
  * torch.compile: the same function through torch.compile (compiled once before timing; the
    first call's wall time, compilation included, is reported separately).
  * liger: Liger-Kernel's LigerFusedLinearCrossEntropyLoss (chunked over rows).
  * cut-cross-entropy: Apple's cut_cross_entropy.linear_cross_entropy (logits never materialised).
  * quack: quack-kernels' CuTe DSL ``chunked_linear_cross_entropy`` (chunks of 4096 rows; no
    softcap, so n/a at the soft-capped shape).
  * unimm with automatic dispatch, and at one shape also with ``vocab_range`` restricted to the
    last 32768 columns ("image codes only", targets drawn there), next to unimm on the full vocab.
liger, cut-cross-entropy and quack are optional imports: where one is missing the row shows n/a.

Correctness, once per shape before any timing: each implementation's loss and gradients against
the materialised function run in fp32 (inputs upcast, fp32 matmuls without TF32, chunked over
rows so it fits), as |loss difference| and relative-norm error of the hidden / weight gradients.

Targets (issue): on H100, faster than cut-cross-entropy and Liger at every shape, >= 70% of the
measured bf16 matmul rate, peak memory no more than cut-cross-entropy's.

With ``--quick`` (what ``unimm bench --quick`` runs): the n8k-v161k shape only, and no
torch.compile row (its compilation takes longer than the rest of the family).

    python -m unimm.bench.cross_entropy [--dtype bf16] [--shapes n16k-v248k,gemma2-2b] [--quick] [--out DIR]
    python -m unimm.bench.cross_entropy --smoke --out DIR   # tiny shapes on the CPU: checks the family
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from unimm.bench._common import add_unimm_speedups, markdown_table, parse_run, peak_memory, print_outcome, save, start_run, verdict
from unimm.kernels import BackendUnavailable, linear_cross_entropy

try:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    _liger_error = None
except Exception as error:  # ImportError, or a triton / torch it does not support
    LigerFusedLinearCrossEntropyLoss = None
    _liger_error = f"liger-kernel is not importable ({type(error).__name__}: {error})"
try:
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
    _cce_error = None
except Exception as error:
    cce_linear_cross_entropy = None
    _cce_error = f"cut-cross-entropy is not importable ({type(error).__name__}: {error})"
try:
    from quack.linear_cross_entropy import chunked_linear_cross_entropy as quack_linear_cross_entropy
    _quack_error = None
except Exception as error:  # ImportError, or a CuTe DSL / torch it does not support
    quack_linear_cross_entropy = None
    _quack_error = f"quack-kernels is not importable ({type(error).__name__}: {error})"

TARGET = ("on H100: faster than cut-cross-entropy and Liger at every shape, >= 70% of the measured "
          "matmul rate, peak memory no more than cut-cross-entropy's")
TARGET_PCT_PEAK = 70.0
WARMUP = 5
REPEAT = 30  # every call is tens of ms on the full shapes: 30 calls pin the median down

# name: (tokens N, hidden D, vocab V, softcap, size of the trailing vocab block timed with vocab_range)
SHAPES = {
    "n16k-v248k": (16384, 2048, 248320, None, None),
    "n8k-v161k": (8192, 4096, 161280, None, 32768),
    "gemma2-2b": (8192, 2304, 256000, 30.0, None),
}
QUICK_SHAPES = ("n8k-v161k",)  # --quick: an 8B-class model with Emu3's expanded vocabulary
# --smoke: small enough for a CPU; softcap 2 bends O(1) logits visibly
SMOKE_SHAPES = {
    "tiny": (37, 24, 301, None, 100),
    "tiny-softcap": (37, 24, 301, 2.0, None),
}
# Relative-norm error a gradient may have against the fp32 reference (docs/ARCHITECTURE.md, Numerics); the
# loss may differ by this much relative to the reference loss.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

ANCHORS = ("cut-cross-entropy", "liger", "quack", "torch.compile", "torch materialised")
UNIMM_RANGE = "unimm[vocab_range]"
IMPLS = ("unimm", UNIMM_RANGE) + ANCHORS


def materialised(hidden, weight, targets, softcap=None, reduction="mean"):
    """The loss as a model without a fused kernel computes it: whole logits, upcast, then CE."""
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction=reduction)


def loss_functions(softcap, vocab_range, device, compile_backend, quick=False):
    """impl -> (loss_fn(hidden, weight, targets), None) or (None, why it cannot run here)."""
    def unimm(hidden, weight, targets):
        return linear_cross_entropy(hidden, weight, targets, softcap=softcap)

    def unimm_range(hidden, weight, targets):
        return linear_cross_entropy(hidden, weight, targets, softcap=softcap, vocab_range=vocab_range)

    def torch_materialised(hidden, weight, targets):
        return materialised(hidden, weight, targets, softcap)

    torch.compiler.reset()  # compile afresh for every shape, so its compile time is its own
    fns = {
        "unimm": (unimm, None),
        "cut-cross-entropy": (None, _cce_error),
        "liger": (None, _liger_error),
        "quack": (None, _quack_error),
        "torch.compile": ((None, "left out of --quick runs: compilation takes longer than the rest of the family")
                          if quick else (torch.compile(torch_materialised, dynamic=False, backend=compile_backend),
                                         None)),
        "torch materialised": (torch_materialised, None),
    }
    if vocab_range is not None:
        fns[UNIMM_RANGE] = (unimm_range, None)
    if device.type != "cuda":
        fns["cut-cross-entropy"] = fns["liger"] = (None, "a Triton GPU kernel: needs a CUDA device")
        fns["quack"] = (None, "a CuTe DSL GPU kernel: needs a CUDA device")
        return fns
    if cce_linear_cross_entropy is not None:
        fns["cut-cross-entropy"] = (lambda hidden, weight, targets:
                                    cce_linear_cross_entropy(hidden, weight, targets, softcap=softcap), None)
    if quack_linear_cross_entropy is not None:
        if softcap is not None:
            fns["quack"] = (None, "quack's chunked_linear_cross_entropy has no softcap")
        else:
            fns["quack"] = (lambda hidden, weight, targets: quack_linear_cross_entropy(hidden, weight, targets), None)
    if LigerFusedLinearCrossEntropyLoss is not None:
        try:
            liger = (LigerFusedLinearCrossEntropyLoss(softcap=softcap) if softcap is not None
                     else LigerFusedLinearCrossEntropyLoss())
        except TypeError as error:  # a Liger from before its softcap argument
            fns["liger"] = (None, f"this liger-kernel takes no softcap ({error})")
        else:
            def liger_loss(hidden, weight, targets):
                loss = liger(weight, hidden, targets)  # Liger's order: weight first
                return loss[0] if isinstance(loss, tuple) else loss
            fns["liger"] = (liger_loss, None)
    return fns


def reference(hidden, weight, targets, softcap, vocab_range):
    """(loss, grad hidden, grad weight) of ``materialised`` in fp32 with fp32 matmuls, chunked
    over rows so the fp32 logits fit; the gradients are fp32 on the CPU, out of the way."""
    n, vocab = hidden.shape[0], weight.shape[0]
    lo, hi = vocab_range if vocab_range is not None else (0, vocab)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        w = weight.detach()[lo:hi].float().requires_grad_()
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        rows = max(1, 2**28 // (hi - lo))  # 1 GiB of fp32 logits per chunk
        for start in range(0, n, rows):
            h = hidden.detach()[start:start + rows].float().requires_grad_()
            loss = materialised(h, w, targets[start:start + rows] - lo, softcap, reduction="sum") / n
            loss.backward()
            total += loss.detach().double()
            grad_hidden[start:start + rows] = h.grad.cpu()
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32)
        grad_weight[lo:hi] = w.grad.cpu()
        return total.item(), grad_hidden, grad_weight
    finally:
        torch.set_float32_matmul_precision(precision)


def rel_error(got, expected) -> float:
    """||got - expected|| / ||expected||, in fp64; ``expected`` lives on the CPU and crosses over
    in slices. NaN when ``got`` is missing or holds a NaN."""
    if got is None:
        return math.nan
    rows = max(1, 2**24 // got[0].numel())
    diff = torch.zeros((), dtype=torch.float64, device=got.device)
    norm = torch.zeros((), dtype=torch.float64, device=got.device)
    for g, e in zip(got.detach().split(rows), expected.split(rows)):
        e = e.to(g.device, torch.float64)
        diff += (g.double() - e).square().sum()
        norm += e.square().sum()
    return (diff / norm).sqrt().item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def release(hidden, weight, device):
    hidden.grad = weight.grad = None
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_impl(result, fn, hidden, weight, targets, ref, dtype, device, timer):
    """One implementation at one shape: a checked first call, then timing and peak memory.
    Fills ``result``; raises what the caller turns into n/a."""
    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).backward()

    hidden.grad = weight.grad = None
    start = time.perf_counter()
    loss = fn(hidden, weight, targets)
    loss.backward()
    sync(device)
    result["first_call_s"] = time.perf_counter() - start
    if ref is not None:
        ref_loss, ref_grad_hidden, ref_grad_weight = ref
        result.update(loss=loss.detach().float().item(), reference_loss=ref_loss)
        result.update(loss_abs_diff=abs(result["loss"] - ref_loss),
                      grad_hidden_rel_err=rel_error(hidden.grad, ref_grad_hidden),
                      grad_weight_rel_err=rel_error(weight.grad, ref_grad_weight))
        tol = TOLERANCE[dtype]
        # NaN compares False, so it never passes
        result["within_tolerance"] = bool(result["loss_abs_diff"] <= tol * abs(ref_loss)
                                          and result["grad_hidden_rel_err"] <= tol
                                          and result["grad_weight_rel_err"] <= tol)
    del loss
    release(hidden, weight, device)

    result.update(timer(step, warmup=WARMUP, repeat=REPEAT))
    if device.type == "cuda":
        release(hidden, weight, device)
        result["extra_peak_bytes"] = peak_memory(step)


def bench_shape(name, spec, dtype, device, timer, peaks, compile_backend, quick=False):
    """One result dict per implementation, all on the same random inputs."""
    n, d, vocab, softcap, codes = spec
    vocab_range = (vocab - codes, vocab) if codes else None
    hidden = torch.randn(n, d, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(vocab, d, device=device, dtype=dtype).mul_(d**-0.5).requires_grad_()  # logits O(1)
    targets = torch.randint(0, vocab, (n,), device=device)
    range_targets = torch.randint(*vocab_range, (n,), device=device) if vocab_range else None

    refs = {}
    for key in (None, vocab_range) if vocab_range else (None,):
        try:
            refs[key] = reference(hidden, weight, targets if key is None else range_targets, softcap, key)
        except torch.OutOfMemoryError as error:
            print(f"{name:>12}  fp32 reference{'' if key is None else ' ' + str(key)} ran out of memory, "
                  f"no correctness check: {str(error).splitlines()[0]}")
        release(hidden, weight, device)

    fns = loss_functions(softcap, vocab_range, device, compile_backend, quick)
    results = []
    for impl in IMPLS:
        if impl not in fns:
            continue
        fn, reason = fns[impl]
        in_range = impl == UNIMM_RANGE
        result = dict(shape=name, impl=impl, vocab_range=list(vocab_range) if in_range else None)
        results.append(result)
        if fn is not None:
            try:
                run_impl(result, fn, hidden, weight, range_targets if in_range else targets,
                         refs.get(vocab_range if in_range else None), dtype, device, timer)
            except BackendUnavailable as error:
                reason = str(error)
            except torch.OutOfMemoryError as error:
                reason = f"out of memory: {str(error).splitlines()[0]}"
            except Exception as error:  # an anchor's own failure is its n/a; unimm's is a bug
                if impl.startswith("unimm"):
                    raise
                reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            release(hidden, weight, device)
        if reason is not None:
            for key in [key for key in result if key not in ("shape", "impl", "vocab_range")]:
                del result[key]
            result.update(available=False, reason=reason)
            print(f"{name:>12} {impl:>20}  n/a: {reason}")
            continue
        v_eff = codes if in_range else vocab
        tflops = 6 * n * d * v_eff / (result["median_ms"] * 1e-3) / 1e12
        result.update(available=True, tflops=tflops)
        if peaks is not None:
            result["pct_bf16_peak"] = 100 * tflops / peaks["bf16_matmul_tflops"]
        if impl == "torch.compile":
            result["compile_s"] = result["first_call_s"]
        print(f"{name:>12} {impl:>20}  {result['median_ms']:9.3f} ms  {tflops:7.2f} TFLOP/s"
              + (f"  extra {result['extra_peak_bytes'] / 2**20:9.1f} MiB" if "extra_peak_bytes" in result else "")
              + (f"  compile {result['compile_s']:.1f} s" if "compile_s" in result else ""))
    del hidden, weight, targets, range_targets, refs
    if device.type == "cuda":
        torch.cuda.empty_cache()

    by_impl = add_unimm_speedups(results, ANCHORS)
    if UNIMM_RANGE in by_impl and "unimm" in by_impl:  # the image-code block against the full vocab
        by_impl[UNIMM_RANGE]["speedup"] = {"unimm": by_impl["unimm"]["median_ms"] / by_impl[UNIMM_RANGE]["median_ms"]}
    return results


def check_targets(results, names):
    """Each part of the target -> True / False / None (could not be judged in this run), plus
    what stopped a judgement. A part is False as soon as one shape misses it."""
    def verdict(values):
        return False if False in values else (None if None in values else True)

    checks = {"faster_than_cce_and_liger": [], "pct_matmul_peak": [], "memory_vs_cce": []}
    why = []
    for name in names:
        rows = {r["impl"]: r for r in results if r["shape"] == name}
        unimm = rows.get("unimm", {})
        if not unimm.get("available"):
            for values in checks.values():
                values.append(False)
            continue
        for anchor in ("cut-cross-entropy", "liger"):
            if rows[anchor]["available"]:
                checks["faster_than_cce_and_liger"].append(unimm["median_ms"] < rows[anchor]["median_ms"])
            else:
                checks["faster_than_cce_and_liger"].append(None)
                why.append(f"{name}: {anchor} n/a")
        pct = unimm.get("pct_bf16_peak")
        checks["pct_matmul_peak"].append(None if pct is None else pct >= TARGET_PCT_PEAK)
        cce = rows["cut-cross-entropy"]
        if "extra_peak_bytes" in unimm and "extra_peak_bytes" in cce:
            checks["memory_vs_cce"].append(unimm["extra_peak_bytes"] <= cce["extra_peak_bytes"])
        else:
            checks["memory_vs_cce"].append(None)
    parts = {key: verdict(values) for key, values in checks.items()}
    return parts, verdict(list(parts.values())), sorted(set(why))


def show(result, key, spec, scale=1.0):
    value = result.get(key)
    return "-" if value is None else format(value * scale, spec)


def table_row(result, shapes):
    """The printed form of one result: short numbers, '-' where a column does not apply."""
    n, d, vocab, softcap, codes = shapes[result["shape"]]
    impl = result["impl"]
    if result["vocab_range"] is not None:
        impl = f"unimm vocab_range=({result['vocab_range'][0]}, {result['vocab_range'][1]})"
    speedup = result.get("speedup", {})
    row = {
        "shape": f"{result['shape']} N={n} D={d} V={vocab}" + (f" softcap={softcap:g}" if softcap else ""),
        "impl": impl,
        "median ms": show(result, "median_ms", ".2f") if result["available"] else "n/a",
        "TFLOP/s": show(result, "tflops", ".1f"),
        "% bf16 peak": show(result, "pct_bf16_peak", ".1f"),
        "extra MiB": show(result, "extra_peak_bytes", ".0f", 2**-20),
        "loss diff": show(result, "loss_abs_diff", ".1e"),
        "grad_h err": show(result, "grad_hidden_rel_err", ".1e"),
        "grad_w err": show(result, "grad_weight_rel_err", ".1e"),
    }
    for anchor in ANCHORS + ("unimm",):
        row[f"speedup vs {anchor}"] = "-" if anchor not in speedup else f"{speedup[anchor]:.2f}"
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_run(__doc__, "cross_entropy", SHAPES, SMOKE_SHAPES, default_dtype="bf16", quick_shapes=QUICK_SHAPES,
                     smoke_dtype="fp32", dtype_help="; fp32 with --smoke, CPU bf16 matmuls being slow", argv=argv)
    shapes, names, dtype_name, dtype = args.shape_table, args.names, args.dtype_name, args.dtype
    device, timer = args.device, args.timer
    # smoke: aot_eager traces the same graphs as inductor without its C++ build (half a minute cold)
    compile_backend = "aot_eager" if args.smoke else "inductor"
    env, peaks = start_run(args)

    results = []
    for name in names:
        torch.manual_seed(0)
        results += bench_shape(name, shapes[name], dtype, device, timer, peaks, compile_backend, args.quick)

    parts, target_met, undecided = check_targets(results, names)
    payload = dict(
        target=TARGET,
        target_met=target_met,
        target_parts=parts,
        smoke=args.smoke,
        environment=env,
        peaks=peaks,
        dtype=dtype_name,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        compile_backend=compile_backend,
        timing=dict(timer=timer.__name__, warmup=WARMUP, repeat=REPEAT, measures="forward + backward"),
        reference="materialised loss in fp32 (fp32 matmuls, no TF32), chunked over rows",
        shapes={name: dict(n=n, d=d, vocab=vocab, softcap=softcap,
                           vocab_range=[vocab - codes, vocab] if codes else None)
                for name, (n, d, vocab, softcap, codes) in ((name, shapes[name]) for name in names)},
        results=results,
    )
    path = save(payload, args)

    print_outcome(path, TARGET, args.smoke, env, f"target {verdict(target_met)}: "
          f"faster than cut-cross-entropy and Liger {verdict(parts['faster_than_cce_and_liger'])}, "
          f">= {TARGET_PCT_PEAK:g}% of the matmul rate {verdict(parts['pct_matmul_peak'])}, "
          f"memory <= cut-cross-entropy {verdict(parts['memory_vs_cce'])}"
          + (f" [not judged: {', '.join(undecided)}]" if undecided else ""))
    unimm_rows = [r for r in results if r["impl"] == "unimm" and r["available"] and "pct_bf16_peak" in r]
    if unimm_rows:
        print("unimm % of matmul rate: " + ", ".join(f"{r['shape']} {r['pct_bf16_peak']:.1f}%" for r in unimm_rows))
    compiled = [r for r in results if r["impl"] == "torch.compile" and r["available"]]
    if compiled:
        print(f"torch.compile ({compile_backend}) first call, compilation included: "
              + ", ".join(f"{r['shape']} {r['compile_s']:.1f} s" for r in compiled))
    checked = [r for r in results if "within_tolerance" in r]
    off = [f"{r['shape']}/{r['impl']}" for r in checked if not r["within_tolerance"]]
    print(f"loss and gradients vs the fp32 materialised reference (tolerance {TOLERANCE[dtype]:g}, relative): "
          + (f"outside tolerance for {', '.join(off)}" if off else f"all {len(checked)} checked runs within tolerance"))
    for r in results:
        if not r["available"]:
            print(f"n/a {r['shape']}/{r['impl']}: {r['reason']}")
    print("speedup vs X = X's median time / this row's median time; the vocab_range row is compared "
          "with unimm on the full vocab; errors are against the fp32 reference\n")
    rows = [table_row(result, shapes) for result in results]
    print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
