"""Fused linear + cross-entropy: unimm.kernels.linear_cross_entropy against the losses LLM trainers use.

Each implementation runs forward + backward (``loss.backward()``, gradients for hidden and
weight, set to None between calls as ``zero_grad()`` does) in this process on the same inputs:
  * torch materialised: ``logits = (hidden @ weight.T).float()`` (Gemma-2 soft-capping
    ``c * tanh(logits / c)`` where the shape has it), then ``F.cross_entropy``: the full N x V
    logits, in fp32, live through the backward.
  * torch.compile: the same function through torch.compile (compiled once before timing; the
    first call's wall time, compilation included, is reported separately).
  * liger: Liger-Kernel's LigerFusedLinearCrossEntropyLoss (chunked over rows).
  * cut-cross-entropy: Apple's cut_cross_entropy.linear_cross_entropy (logits never materialised), in
    its default mode (gradient filtering) and its exact one (``impl="cce_exact"``).
  * quack: quack-kernels' CuTe DSL ``chunked_linear_cross_entropy`` (chunks of 4096 rows; no
    softcap, so n/a at the soft-capped shape).
  * unimm[filter]: unimm with gradient filtering at cut-cross-entropy's default threshold
    (``grad_filter_eps = finfo(dtype).eps / 32``), beside exact unimm, to compare with CCE's default.
  * unimm with automatic dispatch, and at one shape also with ``vocab_range`` restricted to the
    last 32768 columns ("image codes only", targets drawn there), next to unimm on the full vocab.
liger, cut-cross-entropy and quack are optional imports: where one is missing the row shows n/a.

Correctness, once per shape before any timing: each implementation's loss and gradients against
the materialised function run in fp32 (inputs upcast, fp32 matmuls without TF32, chunked over
rows so it fits), as |loss difference| and relative-norm error of the hidden / weight gradients.

Model: each unimm row also prints ``model ms``, the time the cost model of
``unimm.kernels.cross_entropy``'s docstring predicts from this run's measured bf16 matmul rate and
copy bandwidth (``cost_model``: the gradient path the kernel picks at that shape, per phase the
larger of FLOPs / rate and HBM bytes / bandwidth), next to the measured median.

Targets (issue): on H100, faster than both cut-cross-entropy modes and Liger at every shape, >= 70% of the
measured bf16 matmul rate, peak memory no more than cut-cross-entropy's.

With ``--quick`` (what ``unimm bench --quick`` runs): the n8k-v161k shape only, and no
torch.compile row (its compilation takes longer than the rest of the family).

    python -m unimm.bench.cross_entropy [--dtype bf16] [--shapes n16k-v248k,gemma2-2b] [--quick] [--out DIR]
    python -m unimm.bench.cross_entropy --smoke --out DIR   # tiny shapes on the CPU: checks the family
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F

from unimm.bench._harness import add_unimm_speedups, attempt, fold, mark_na, optional_import, parse_run, show, verdict
from unimm.kernels import linear_cross_entropy
from unimm.testing import BENCH_TOLERANCE, rel_err

liger, _liger_error = optional_import("liger_kernel.transformers", "liger-kernel")
cce, _cce_error = optional_import("cut_cross_entropy", "cut-cross-entropy")
quack, _quack_error = optional_import("quack.linear_cross_entropy", "quack-kernels")

TARGET = ("on H100: faster than both cut-cross-entropy modes and Liger at every shape, >= 70% of the measured "
          "matmul rate, peak memory no more than cut-cross-entropy's")
TARGET_PCT_PEAK = 70.0
COUNTS = dict(warmup=5, repeat=30)  # every call is tens of ms on the full shapes: 30 calls pin the median down

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

CCE_EXACT = "cut-cross-entropy (exact)"  # its cce_exact preset: no gradient filtering, fp32 accumulation
ANCHORS = ("cut-cross-entropy", CCE_EXACT, "liger", "quack", "torch.compile", "torch materialised")
UNIMM_RANGE = "unimm[vocab_range]"
UNIMM_FILTER = "unimm[filter]"  # grad_filter_eps at cut-cross-entropy's "auto": finfo(dtype).eps / 32
IMPLS = ("unimm", UNIMM_FILTER, UNIMM_RANGE) + ANCHORS


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

    def unimm_filter(hidden, weight, targets):
        return linear_cross_entropy(hidden, weight, targets, softcap=softcap,
                                    grad_filter_eps=torch.finfo(hidden.dtype).eps / 32)

    def unimm_range(hidden, weight, targets):
        return linear_cross_entropy(hidden, weight, targets, softcap=softcap, vocab_range=vocab_range)

    def torch_materialised(hidden, weight, targets):
        return materialised(hidden, weight, targets, softcap)

    torch.compiler.reset()  # compile afresh for every shape, so its compile time is its own
    fns = {
        "unimm": (unimm, None),
        UNIMM_FILTER: (unimm_filter, None),
        "cut-cross-entropy": (None, _cce_error),
        CCE_EXACT: (None, _cce_error),
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
        fns["cut-cross-entropy"] = fns[CCE_EXACT] = fns["liger"] = (None, "a Triton GPU kernel: needs a CUDA device")
        fns["quack"] = (None, "a CuTe DSL GPU kernel: needs a CUDA device")
        return fns
    if cce is not None:
        fns["cut-cross-entropy"] = (lambda hidden, weight, targets:
                                    cce.linear_cross_entropy(hidden, weight, targets, softcap=softcap), None)
        # a CCE without the preset raises at the call: the row is then n/a with its message
        fns[CCE_EXACT] = (lambda hidden, weight, targets:
                          cce.linear_cross_entropy(hidden, weight, targets, softcap=softcap, impl="cce_exact"), None)
    if quack is not None:
        if softcap is not None:
            fns["quack"] = (None, "quack's chunked_linear_cross_entropy has no softcap")
        else:
            fns["quack"] = (lambda hidden, weight, targets: quack.chunked_linear_cross_entropy(hidden, weight, targets),
                            None)
    if liger is not None:
        try:
            liger_loss_module = (liger.LigerFusedLinearCrossEntropyLoss(softcap=softcap) if softcap is not None
                                 else liger.LigerFusedLinearCrossEntropyLoss())
        except TypeError as error:  # a Liger from before its softcap argument
            fns["liger"] = (None, f"this liger-kernel takes no softcap ({error})")
        else:
            def liger_loss(hidden, weight, targets):
                loss = liger_loss_module(weight, hidden, targets)  # Liger's order: weight first
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


def cost_model(n, d, vocab, elem_bytes, peaks, device, workspace_bytes=None):
    """Predicted ms of unimm's forward + backward of a scalar loss: the path the kernel's cost model
    picks at this shape (``unimm.kernels._cross_entropy_cost.plan``), each phase bound by the larger
    of its FLOPs at the measured matmul rate and its HBM bytes at the measured copy bandwidth."""
    from unimm.kernels import _cross_entropy_cost, cross_entropy

    sms, l2 = 132, 50 << 20
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", l2)
    plan = _cross_entropy_cost.plan(n, d, vocab, elem_bytes, workspace_bytes or cross_entropy.workspace_bytes(),
                                    grads_now=True, want_dw=True, sms=sms, l2_bytes=l2)
    return plan.seconds(peaks["bf16_matmul_tflops"] * 1e12, peaks["copy_gbps"] * 1e9) * 1e3


def release_grads(hidden, weight, run):
    hidden.grad = weight.grad = None
    run.release()


def run_impl(result, fn, hidden, weight, targets, ref, run):
    """One implementation at one shape: a checked first call, then timing and peak memory.
    Fills ``result``; raises what the caller turns into n/a."""
    def step():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets).backward()

    hidden.grad = weight.grad = None
    start = time.perf_counter()
    loss = fn(hidden, weight, targets)
    loss.backward()
    run.sync()
    result["first_call_s"] = time.perf_counter() - start
    if ref is not None:
        ref_loss, ref_grad_hidden, ref_grad_weight = ref
        result.update(loss=loss.detach().float().item(), reference_loss=ref_loss)
        result.update(loss_abs_diff=abs(result["loss"] - ref_loss),
                      grad_hidden_rel_err=rel_err(hidden.grad, ref_grad_hidden),
                      grad_weight_rel_err=rel_err(weight.grad, ref_grad_weight))
        tol = BENCH_TOLERANCE[run.dtype]
        # NaN compares False, so it never passes
        result["within_tolerance"] = bool(result["loss_abs_diff"] <= tol * abs(ref_loss)
                                          and result["grad_hidden_rel_err"] <= tol
                                          and result["grad_weight_rel_err"] <= tol)
    del loss
    release_grads(hidden, weight, run)

    result.update(run.time(step))
    if run.device.type == "cuda":
        release_grads(hidden, weight, run)
        result["extra_peak_bytes"] = run.peak_memory(step)


def bench_shape(name, spec, run, compile_backend):
    """One result dict per implementation, all on the same random inputs."""
    n, d, vocab, softcap, codes = spec
    device, dtype = run.device, run.dtype
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
        release_grads(hidden, weight, run)

    fns = loss_functions(softcap, vocab_range, device, compile_backend, run.quick)
    results = []
    for impl in (impl for impl in IMPLS if impl in fns):
        fn, reason = fns[impl]
        in_range = impl == UNIMM_RANGE
        result = dict(shape=name, impl=impl, vocab_range=list(vocab_range) if in_range else None)
        results.append(result)
        if fn is not None:
            reason = attempt(functools.partial(run_impl, result, fn, hidden, weight,
                                               range_targets if in_range else targets,
                                               refs.get(vocab_range if in_range else None), run),
                             is_bug=impl.startswith("unimm"))
            release_grads(hidden, weight, run)
        if reason is not None:
            mark_na(result, reason, ("shape", "impl", "vocab_range"), f"{name:>12} {impl:>20}")
            continue
        tflops = 6 * n * d * (codes if in_range else vocab) / (result["median_ms"] * 1e-3) / 1e12
        result.update(available=True, tflops=tflops)
        if run.peaks is not None:
            result["pct_bf16_peak"] = 100 * tflops / run.peaks["bf16_matmul_tflops"]
            if impl.startswith("unimm"):
                result["model_ms"] = cost_model(n, d, codes if in_range else vocab, hidden.element_size(), run.peaks,
                                                device)
        if impl == "torch.compile":
            result["compile_s"] = result["first_call_s"]
        print(f"{name:>12} {impl:>20}  {result['median_ms']:9.3f} ms  {tflops:7.2f} TFLOP/s"
              + (f"  model {result['model_ms']:9.3f} ms" if "model_ms" in result else "")
              + (f"  extra {result['extra_peak_bytes'] / 2**20:9.1f} MiB" if "extra_peak_bytes" in result else "")
              + (f"  compile {result['compile_s']:.1f} s" if "compile_s" in result else ""))
    del hidden, weight, targets, range_targets, refs
    run.release()

    by_impl = add_unimm_speedups(results, ANCHORS)
    for variant in (UNIMM_RANGE, UNIMM_FILTER):  # the image-code block, and filtering, against plain unimm
        if variant in by_impl and "unimm" in by_impl:
            by_impl[variant]["speedup"] = {"unimm": by_impl["unimm"]["median_ms"] / by_impl[variant]["median_ms"]}
    return results


def check_targets(results, names):
    """Each part of the target -> True / False / None (could not be judged in this run), plus
    what stopped a judgement. A part is False as soon as one shape misses it."""
    checks = {"faster_than_cce_and_liger": [], "pct_matmul_peak": [], "memory_vs_cce": []}
    why = []
    for name in names:
        rows = {r["impl"]: r for r in results if r["shape"] == name}
        unimm = rows.get("unimm", {})
        if not unimm.get("available"):
            for values in checks.values():
                values.append(False)
            continue
        for anchor in ("cut-cross-entropy", CCE_EXACT, "liger"):
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
    parts = {key: fold(values) for key, values in checks.items()}
    return parts, fold(parts.values()), sorted(set(why))


def table_row(result, shapes):
    """The printed form of one result: short numbers, '-' where a column does not apply."""
    n, d, vocab, softcap, codes = shapes[result["shape"]]
    impl = result["impl"]
    if result["vocab_range"] is not None:
        impl = f"unimm vocab_range=({result['vocab_range'][0]}, {result['vocab_range'][1]})"
    row = {
        "shape": f"{result['shape']} N={n} D={d} V={vocab}" + (f" softcap={softcap:g}" if softcap else ""),
        "impl": impl,
        "median ms": show(result, "median_ms", ".2f") if result["available"] else "n/a",
        "model ms": show(result, "model_ms", ".2f"),
        "TFLOP/s": show(result, "tflops", ".1f"),
        "% bf16 peak": show(result, "pct_bf16_peak", ".1f"),
        "extra MiB": show(result, "extra_peak_bytes", ".0f", 2**-20),
        "loss diff": show(result, "loss_abs_diff", ".1e"),
        "grad_h err": show(result, "grad_hidden_rel_err", ".1e"),
        "grad_w err": show(result, "grad_weight_rel_err", ".1e"),
    }
    for anchor in ANCHORS + ("unimm",):
        row[f"speedup vs {anchor}"] = show(result.get("speedup"), anchor, ".2f")
    return row


def main(argv: list[str] | None = None) -> int:
    run = parse_run(__doc__, "cross_entropy", SHAPES, SMOKE_SHAPES, default_dtype="bf16", counts=COUNTS,
                     quick_shapes=QUICK_SHAPES, smoke_dtype="fp32",
                     dtype_help="; fp32 with --smoke, CPU bf16 matmuls being slow", argv=argv)
    shapes, names = run.shape_table, run.names
    # smoke: aot_eager traces the same graphs as inductor without its C++ build (half a minute cold)
    compile_backend = "aot_eager" if run.smoke else "inductor"
    run.start()

    results = []
    for name in names:
        torch.manual_seed(0)
        results += bench_shape(name, shapes[name], run, compile_backend)

    parts, target_met, undecided = check_targets(results, names)
    payload = dict(
        target=TARGET,
        target_met=target_met,
        target_parts=parts,
        **run.fields(),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        compile_backend=compile_backend,
        timing=dict(timer=run.timer.__name__, **run.counts, measures="forward + backward"),
        reference="materialised loss in fp32 (fp32 matmuls, no TF32), chunked over rows",
        shapes={name: dict(n=n, d=d, vocab=vocab, softcap=softcap,
                           vocab_range=[vocab - codes, vocab] if codes else None)
                for name, (n, d, vocab, softcap, codes) in ((name, shapes[name]) for name in names)},
        results=results,
    )
    outcome = (f"target {verdict(target_met)}: faster than both cut-cross-entropy modes and Liger "
               f"{verdict(parts['faster_than_cce_and_liger'])}, >= {TARGET_PCT_PEAK:g}% of the matmul rate "
               f"{verdict(parts['pct_matmul_peak'])}, memory <= cut-cross-entropy {verdict(parts['memory_vs_cce'])}")
    peak_shares = [f"{r['shape']} {r['pct_bf16_peak']:.1f}%" for r in results
                   if r["impl"] == "unimm" and r["available"] and "pct_bf16_peak" in r]
    run.report(payload, outcome, undecided=undecided, case=("shape",),
               compiled=f"torch.compile ({compile_backend}) first call, compilation included",
               agreement=f"loss and gradients vs the fp32 materialised reference "
                         f"(tolerance {BENCH_TOLERANCE[run.dtype]:g}, relative)",
               notes=["unimm % of matmul rate: " + ", ".join(peak_shares)] if peak_shares else [],
               tables=[("speedup vs X = X's median time / this row's median time; the vocab_range row is compared "
                        "with unimm on the full vocab; errors are against the fp32 reference",
                        [table_row(result, shapes) for result in results])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
