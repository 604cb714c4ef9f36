"""Diffusion-head sampling: unimm.models.DiffusionHead.sample against its eager reference and torch.compile.

One full ``sample`` call (MAR's ancestral sampler, ``num_steps`` = 100 denoiser evaluations of
SimpleMLPAdaLN, classifier-free guidance at cfg_scale 4) is what every implementation runs, in
this process, on the same module, inputs and ``noise`` (so the samples are comparable):
  * unimm: automatic dispatch (UNIMM_BACKEND unset).
  * eager reference: the same call with UNIMM_BACKEND=reference.
  * torch.compile: ``torch.compile(lambda: head.sample(...), mode="reduce-overhead")`` traced and
    run with UNIMM_BACKEND=reference (compiled afresh per case; its first call, compilation and
    CUDA-graph capture included, is reported as ``compile_s``). A failure to compile is n/a.
``rows`` counts the CFG-doubled batch: cond is ``[rows, cond_dim]`` = [cond; uncond] and rows / 2
tokens come out. The weights are re-drawn at random (MAR zero-initialises adaLN and the output
layer, which would make every sample plain noise arithmetic); the timing does not depend on it.
The weights are not rotated: every step re-reads them, as real sampling does (MAR-B's 63 MB of
bf16 block weights exceed an H100's L2, the 1024 / 3 config's 31 MB do not).

Reported per case: the median time of one sample call, per step, the speedup of unimm over each
anchor, achieved TFLOP/s and weight-streaming GB/s (as % of this device's measured bf16 matmul
rate and copy bandwidth), and the max abs difference of each sample from the eager reference's
(also relative to the sample's max abs value, which the tolerance bounds).
FLOPs per call: num_steps * (rows * 2 * [token_dim*w + depth*(3w^2 + 2w^2) + 2w^2 + w*2*token_dim]
+ 2 * (256*w + w^2)) + rows * 2 * cond_dim * w (the timestep MLP once per step, the cond
projection once per call). Weight bytes: every weight and bias but the cond projection's, per
step, plus the cond projection's once.

Target (issue): on H100, >= 20x the eager reference and >= 2x torch.compile at 64 rows for MAR-B
(1024 / 6); >= 50% of the measured matmul rate at 2048 rows.

With ``--quick`` (what ``unimm bench --quick`` runs): MAR-B at 64 rows against the eager
reference; torch.compile is left out (minutes of compilation), unless ``--compile-rows`` asks.

    python -m unimm.bench.diffusion_head [--dtype bf16] [--shapes mar-b,mar-h] [--rows 64,2048]
        [--compile-rows 64 | --no-compile] [--quick] [--out DIR]
    python -m unimm.bench.diffusion_head --smoke --out DIR   # tiny head on the CPU: checks the family
"""

from __future__ import annotations

import functools
import math
import time

import torch
from torch import nn

from unimm.bench._harness import add_unimm_speedups, attempt, fold, forced_backend, mark_na, parse_run, show, verdict
from unimm.testing import SAMPLE_TOLERANCE

try:
    from unimm.models import DiffusionHead
except ImportError:  # the head is not in this checkout: main() says so and exits
    DiffusionHead = None

TARGET = ("on H100: >= 20x eager and >= 2x compiled at 64 rows (MAR-B 1024/6); "
          ">= 50% of the measured matmul rate at 2048 rows")
TARGET_SHAPE, TARGET_ROWS = "mar-b", 64
TARGET_VS_EAGER, TARGET_VS_COMPILE = 20.0, 2.0
TARGET_PCT_PEAK, TARGET_PEAK_ROWS = 50.0, 2048
CFG_SCALE = 4.0
NUM_STEPS, SMOKE_NUM_STEPS = 100, 5
TIMESTEP_FREQUENCIES = 256  # sinusoidal features into the timestep MLP (MAR / DiT)
COUNTS = dict(warmup=5, repeat=20)  # one call is 100 denoiser steps: 20 calls pin the median down
SMOKE_COUNTS = dict(warmup=1, repeat=3)

# name: (token_dim, width, depth); cond_dim = width
SHAPES = {
    "w1024-d3": (16, 1024, 3),
    "mar-b": (16, 1024, 6),
    "mar-h": (16, 1536, 12),
}
ROWS = (16, 64, 512, 2048)
QUICK_SHAPES, QUICK_ROWS = (TARGET_SHAPE,), (TARGET_ROWS,)  # --quick: the target's headline case
SMOKE_SHAPES = {"tiny": (4, 32, 2)}
SMOKE_ROWS = (4, 8)

ANCHORS = ("eager reference", "torch.compile")
IMPLS = ("unimm",) + ANCHORS


def randomize(head: nn.Module, generator: torch.Generator) -> None:
    """Every linear layer drawn at fan-in scale, biases small: activations O(1) through the depth."""
    with torch.no_grad():
        for module in head.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.02, generator=generator)


def counts(spec, rows, num_steps, element_size):
    """(FLOPs, weight bytes read) of one sample call; see the module docstring."""
    token_dim, w, depth = spec
    cond_dim = w
    per_row_step = token_dim * w + depth * 5 * w * w + 2 * w * w + w * 2 * token_dim
    flops = (num_steps * (rows * 2 * per_row_step + 2 * (TIMESTEP_FREQUENCIES * w + w * w))
             + rows * 2 * cond_dim * w)
    step_weights = ((TIMESTEP_FREQUENCIES * w + w) + (w * w + w)  # timestep MLP
                    + (token_dim * w + w)  # input projection
                    + depth * (2 * w + 2 * (w * w + w) + 3 * w * w + 3 * w)  # LayerNorm, MLP, adaLN
                    + (2 * w * w + 2 * w) + (w * 2 * token_dim + 2 * token_dim))  # final adaLN, output
    weight_bytes = (num_steps * step_weights + (cond_dim * w + w)) * element_size
    return flops, weight_bytes


def sample_fns(head, cond, noise, num_steps, smoke, compile_reason):
    """impl -> (zero-argument sample call, UNIMM_BACKEND while it runs, None) or (None, None, why not)."""
    def call():
        return head.sample(cond, num_steps=num_steps, cfg_scale=CFG_SCALE, noise=noise)

    fns = {"unimm": (call, None, None), "eager reference": (call, "reference", None)}
    if smoke:
        fns["torch.compile"] = (None, None, "CPU smoke: torch.compile is not run on the CPU")
    elif compile_reason is not None:
        fns["torch.compile"] = (None, None, compile_reason)
    else:
        torch.compiler.reset()  # compile afresh for every case, so its compile time is its own
        compiled = torch.compile(lambda: head.sample(cond, num_steps=num_steps, cfg_scale=CFG_SCALE, noise=noise),
                                 mode="reduce-overhead", dynamic=False)
        fns["torch.compile"] = (compiled, "reference", None)
    return fns


def run_impl(result, samples, impl, fn, forced, run):
    """First call (its sample kept in ``samples``, and its wall time), timing, peak memory.
    Raises what the caller turns into n/a."""
    with forced_backend(forced):
        start = time.perf_counter()
        samples[impl] = fn().clone()  # clone: a CUDA-graph replay overwrites its output buffer
        run.sync()
        result["first_call_s"] = time.perf_counter() - start
        result.update(run.time(fn))
        if run.device.type == "cuda":
            result["extra_peak_bytes"] = run.peak_memory(fn)


def build_head(spec, dtype, device):
    """The config's head, random weights (seeded), cast with ``.to(device, dtype)``."""
    token_dim, width, depth = spec
    head = DiffusionHead(token_dim, width, width, depth)
    randomize(head, torch.Generator().manual_seed(0))
    return head.to(device, dtype).eval()


def bench_case(name, spec, head, rows, run, num_steps, compile_reason):
    """One result dict per implementation at (config, rows), all on the same head, cond and noise."""
    token_dim, width, depth = spec
    tokens = rows // 2
    generator = torch.Generator().manual_seed(rows)
    cond = torch.randn(rows, width, generator=generator).to(run.device, run.dtype)
    noise = torch.randn(num_steps + 1, tokens, token_dim, generator=generator).to(run.device)
    flops, weight_bytes = counts(spec, rows, num_steps, run.dtype.itemsize)

    fns = sample_fns(head, cond, noise, num_steps, run.smoke, compile_reason)
    results, samples = [], {}
    for impl in IMPLS:
        fn, forced, reason = fns[impl]
        result = dict(shape=name, rows=rows, tokens=tokens, impl=impl)
        results.append(result)
        if fn is not None:
            # torch.compile's failure is its n/a; unimm's (or the eager reference's) is a bug
            reason = attempt(functools.partial(run_impl, result, samples, impl, fn, forced, run),
                             is_bug=impl != "torch.compile")
            run.release()
        if reason is not None:
            mark_na(result, reason, ("shape", "rows", "tokens", "impl"), f"{name:>9} {rows:>5} {impl:>16}")
            continue
        tflops = flops / (result["median_ms"] * 1e-3) / 1e12
        gbps = weight_bytes / (result["median_ms"] * 1e-3) / 1e9
        result.update(available=True, ms_per_step=result["median_ms"] / num_steps, tflops=tflops, weight_gbps=gbps)
        if run.peaks is not None:
            result["pct_bf16_peak"] = 100 * tflops / run.peaks["bf16_matmul_tflops"]
            result["pct_copy_peak"] = 100 * gbps / run.peaks["copy_gbps"]
        if impl == "torch.compile":
            result["compile_s"] = result["first_call_s"]
        print(f"{name:>9} {rows:>5} {impl:>16}  {result['median_ms']:9.3f} ms  {tflops:7.2f} TFLOP/s  "
              f"{gbps:8.1f} GB/s weights"
              + (f"  compile {result['compile_s']:.1f} s" if "compile_s" in result else ""))

    ref = samples.get("eager reference")
    for result in results:
        got = samples.get(result["impl"])
        if ref is None or got is None or result["impl"] == "eager reference":
            continue
        ref64, got64 = ref.double(), got.double()
        result["max_abs_diff"] = (got64 - ref64).abs().max().item()
        result["sample_max_abs"] = ref64.abs().max().item()
        result["max_abs_diff_rel"] = result["max_abs_diff"] / max(1.0, result["sample_max_abs"])
        # NaN never passes
        result["within_tolerance"] = bool(result["max_abs_diff_rel"] <= SAMPLE_TOLERANCE[run.dtype])
    del cond, noise, samples, fns
    run.release()

    add_unimm_speedups(results, ANCHORS)
    return results


def check_targets(results, smoke):
    """Each part of the target -> True / False / None (not judged in this run), plus why not."""
    if smoke:
        return dict(vs_eager=None, vs_compile=None, pct_matmul_peak=None), None, ["smoke run"]
    why = []
    rows = {r["impl"]: r for r in results if r["shape"] == TARGET_SHAPE and r["rows"] == TARGET_ROWS}
    parts = {}
    for part, anchor, bound in (("vs_eager", "eager reference", TARGET_VS_EAGER),
                                ("vs_compile", "torch.compile", TARGET_VS_COMPILE)):
        unimm, other = rows.get("unimm"), rows.get(anchor)
        if unimm is None:
            parts[part] = None
            why.append(f"{TARGET_SHAPE} at {TARGET_ROWS} rows not run")
        elif not unimm["available"]:
            parts[part] = False
        elif not other["available"]:
            parts[part] = None
            why.append(f"{TARGET_SHAPE}/{TARGET_ROWS}: {anchor} n/a")
        else:
            parts[part] = unimm["speedup"][anchor] >= bound
    peak_rows = [r for r in results if r["impl"] == "unimm" and r["rows"] == TARGET_PEAK_ROWS]
    if not peak_rows:
        why.append(f"no case at {TARGET_PEAK_ROWS} rows run")
    parts["pct_matmul_peak"] = fold(r.get("pct_bf16_peak", -math.inf) >= TARGET_PCT_PEAK if r["available"] else False
                                    for r in peak_rows)
    return parts, fold(parts.values()), sorted(set(why))


def table_row(result, shapes):
    """The printed form of one result: short numbers, '-' where a column does not apply."""
    token_dim, width, depth = shapes[result["shape"]]
    row = {
        "config": f"{result['shape']} w={width} depth={depth} token_dim={token_dim}",
        "rows": str(result["rows"]),
        "impl": result["impl"],
        "median ms": show(result, "median_ms", ".2f") if result["available"] else "n/a",
        "ms / step": show(result, "ms_per_step", ".3f"),
        "TFLOP/s": show(result, "tflops", ".2f"),
        "% bf16 peak": show(result, "pct_bf16_peak", ".1f"),
        "weights GB/s": show(result, "weight_gbps", ".0f"),
        "% copy peak": show(result, "pct_copy_peak", ".1f"),
        "max abs diff": show(result, "max_abs_diff", ".1e"),
        "diff / max abs": show(result, "max_abs_diff_rel", ".1e"),
        "compile s": show(result, "compile_s", ".1f"),
    }
    for anchor in ANCHORS:
        row[f"speedup vs {anchor}"] = show(result.get("speedup"), anchor, ".2f")
    return row


def add_arguments(parser):
    parser.add_argument("--rows", help=f"comma-separated row counts (CFG-doubled batch; default "
                                       f"{','.join(map(str, ROWS))}, with --smoke {','.join(map(str, SMOKE_ROWS))})")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile anchor (it unrolls all 100 steps: minutes per case)")
    parser.add_argument("--compile-rows", help="comma-separated row counts at which torch.compile runs "
                                               "(default: every row count); n/a elsewhere")


def main(argv: list[str] | None = None) -> int:
    run = parse_run(__doc__, "diffusion_head", SHAPES, SMOKE_SHAPES, default_dtype="bf16", counts=COUNTS,
                     smoke_counts=SMOKE_COUNTS, quick_shapes=QUICK_SHAPES, smoke_dtype="fp32",
                     dtype_help="; fp32 with --smoke, CPU bf16 matmuls being slow", add_arguments=add_arguments,
                     argv=argv)
    if DiffusionHead is None:
        raise SystemExit("unimm.models has no DiffusionHead in this checkout: nothing to benchmark")
    shapes, names, smoke = run.shape_table, run.names, run.smoke
    rows_list = ([int(r) for r in run.rows.split(",")] if run.rows else
                 list(SMOKE_ROWS if smoke else QUICK_ROWS if run.quick else ROWS))
    if any(r < 2 or r % 2 for r in rows_list):
        raise SystemExit(f"--rows must be even and >= 2 (cond holds [cond; uncond] halves), got {rows_list}")
    compile_rows = ({int(r) for r in run.compile_rows.split(",")} if run.compile_rows is not None else
                    set() if run.quick else set(rows_list))
    num_steps = SMOKE_NUM_STEPS if smoke else NUM_STEPS
    run.start()

    results = []
    for name in names:
        head = build_head(shapes[name], run.dtype, run.device)
        for rows in rows_list:
            compile_reason = ("skipped with --no-compile" if run.no_compile else
                              None if rows in compile_rows else
                              "left out of --quick runs: compilation takes minutes" if run.quick else
                              f"skipped: {rows} rows not in --compile-rows")
            torch.manual_seed(0)
            results += bench_case(name, shapes[name], head, rows, run, num_steps, compile_reason)
        del head

    parts, target_met, undecided = check_targets(results, smoke)
    payload = dict(
        target=TARGET,
        target_met=target_met,
        target_parts=parts,
        **run.fields(),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        num_steps=num_steps,
        cfg_scale=CFG_SCALE,
        rows=rows_list,
        compile_mode="reduce-overhead",
        timing=dict(timer=run.timer.__name__, **run.counts, measures="one sample call (all steps)"),
        reference="eager reference (UNIMM_BACKEND=reference) on the same head, cond and noise",
        shapes={name: dict(token_dim=token_dim, cond_dim=width, width=width, depth=depth)
                for name, (token_dim, width, depth) in ((name, shapes[name]) for name in names)},
        results=results,
    )
    outcome = (f"target {verdict(target_met)}: >= {TARGET_VS_EAGER:g}x eager {verdict(parts['vs_eager'])}, "
               f">= {TARGET_VS_COMPILE:g}x torch.compile {verdict(parts['vs_compile'])}, >= {TARGET_PCT_PEAK:g}% "
               f"of the matmul rate at {TARGET_PEAK_ROWS} rows {verdict(parts['pct_matmul_peak'])}")
    run.report(payload, outcome, undecided=undecided, case=("shape", "rows"),
               compiled="torch.compile first call, compilation and graph capture included",
               agreement=f"samples vs the eager reference's on the same noise (max abs diff <= "
                         f"{SAMPLE_TOLERANCE[run.dtype]:g} x max(1, max |sample|))",
               tables=[(f"rows = the CFG-doubled batch (cfg_scale {CFG_SCALE:g}, rows / 2 tokens sampled); median ms "
                        f"= one {num_steps}-step sample call; speedup vs X = X's median time / unimm's",
                        [table_row(result, shapes) for result in results])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
