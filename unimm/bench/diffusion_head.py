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

import contextlib
import math
import os
import time

import torch
from torch import nn

from unimm.bench._common import add_unimm_speedups, markdown_table, parse_run, peak_memory, print_outcome, save, start_run, verdict
from unimm.kernels import BackendUnavailable

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
WARMUP, REPEAT = 5, 20  # one call is 100 denoiser steps: 20 calls pin the median down
SMOKE_WARMUP, SMOKE_REPEAT = 1, 3

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
# Max abs difference from the eager reference's sample, relative to max(1, the sample's max abs
# value). An untrained head's samples are large (x0 = x_t / sqrt(abar) - ... is not clipped, as in
# MAR): 1e5 is usual, so only the relative size of a difference means anything. 100 steps of bf16
# rounding in two accumulation orders differ by ~1% of the sample's range.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}

ANCHORS = ("eager reference", "torch.compile")
IMPLS = ("unimm",) + ANCHORS


@contextlib.contextmanager
def backend(name: str | None):
    """unimm reads UNIMM_BACKEND on every call, so one process can time every backend."""
    before = os.environ.pop("UNIMM_BACKEND", None)
    if name is not None:
        os.environ["UNIMM_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("UNIMM_BACKEND", None)
        if before is not None:
            os.environ["UNIMM_BACKEND"] = before


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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


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


def run_impl(result, fn, device, timer, warmup, repeat):
    """First call (kept: its sample and wall time), timing, peak memory. Raises what the caller
    turns into n/a."""
    start = time.perf_counter()
    sample = fn().clone()  # clone: a CUDA-graph replay overwrites its output buffer
    sync(device)
    result["first_call_s"] = time.perf_counter() - start
    result.update(timer(fn, warmup=warmup, repeat=repeat))
    if device.type == "cuda":
        result["extra_peak_bytes"] = peak_memory(fn)
    return sample


def build_head(spec, dtype, device):
    """The config's head, random weights (seeded), cast with ``.to(device, dtype)``."""
    token_dim, width, depth = spec
    head = DiffusionHead(token_dim, width, width, depth)
    randomize(head, torch.Generator().manual_seed(0))
    return head.to(device, dtype).eval()


def bench_case(name, spec, head, rows, dtype, device, timer, peaks, num_steps, smoke, compile_reason):
    """One result dict per implementation at (config, rows), all on the same head, cond and noise."""
    token_dim, width, depth = spec
    tokens = rows // 2
    generator = torch.Generator().manual_seed(rows)
    cond = torch.randn(rows, width, generator=generator).to(device, dtype)
    noise = torch.randn(num_steps + 1, tokens, token_dim, generator=generator).to(device)
    flops, weight_bytes = counts(spec, rows, num_steps, dtype.itemsize)
    warmup, repeat = (SMOKE_WARMUP, SMOKE_REPEAT) if smoke else (WARMUP, REPEAT)

    fns = sample_fns(head, cond, noise, num_steps, smoke, compile_reason)
    results, samples = [], {}
    for impl in IMPLS:
        fn, forced, reason = fns[impl]
        result = dict(shape=name, rows=rows, tokens=tokens, impl=impl)
        results.append(result)
        if fn is not None:
            try:
                with backend(forced):
                    samples[impl] = run_impl(result, fn, device, timer, warmup, repeat)
            except BackendUnavailable as error:
                reason = str(error)
            except torch.OutOfMemoryError as error:
                reason = f"out of memory: {str(error).splitlines()[0]}"
            except Exception as error:  # torch.compile's failure is its n/a; unimm's is a bug
                if impl != "torch.compile":
                    raise
                reason = first_line(error)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if reason is not None:
            for key in [key for key in result if key not in ("shape", "rows", "tokens", "impl")]:
                del result[key]
            result.update(available=False, reason=reason)
            print(f"{name:>9} {rows:>5} {impl:>16}  n/a: {reason}")
            continue
        tflops = flops / (result["median_ms"] * 1e-3) / 1e12
        gbps = weight_bytes / (result["median_ms"] * 1e-3) / 1e9
        result.update(available=True, ms_per_step=result["median_ms"] / num_steps, tflops=tflops, weight_gbps=gbps)
        if peaks is not None:
            result["pct_bf16_peak"] = 100 * tflops / peaks["bf16_matmul_tflops"]
            result["pct_copy_peak"] = 100 * gbps / peaks["copy_gbps"]
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
        result["within_tolerance"] = bool(result["max_abs_diff_rel"] <= TOLERANCE[dtype])  # NaN: never passes
    del cond, noise, samples, fns
    if device.type == "cuda":
        torch.cuda.empty_cache()

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
    values = [r.get("pct_bf16_peak", -math.inf) >= TARGET_PCT_PEAK if r["available"] else False for r in peak_rows]
    if not peak_rows:
        why.append(f"no case at {TARGET_PEAK_ROWS} rows run")
    parts["pct_matmul_peak"] = False if False in values else (True if values else None)
    verdicts = list(parts.values())
    met = False if False in verdicts else (None if None in verdicts else True)
    return parts, met, sorted(set(why))


def show(result, key, spec, scale=1.0):
    value = result.get(key)
    return "-" if value is None else format(value * scale, spec)


def table_row(result, shapes):
    """The printed form of one result: short numbers, '-' where a column does not apply."""
    token_dim, width, depth = shapes[result["shape"]]
    speedup = result.get("speedup", {})
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
        row[f"speedup vs {anchor}"] = "-" if anchor not in speedup else f"{speedup[anchor]:.2f}"
    return row


def add_arguments(parser):
    parser.add_argument("--rows", help=f"comma-separated row counts (CFG-doubled batch; default "
                                       f"{','.join(map(str, ROWS))}, with --smoke {','.join(map(str, SMOKE_ROWS))})")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile anchor (it unrolls all 100 steps: minutes per case)")
    parser.add_argument("--compile-rows", help="comma-separated row counts at which torch.compile runs "
                                               "(default: every row count); n/a elsewhere")


def main(argv: list[str] | None = None) -> int:
    args = parse_run(__doc__, "diffusion_head", SHAPES, SMOKE_SHAPES, default_dtype="bf16", quick_shapes=QUICK_SHAPES,
                     smoke_dtype="fp32", dtype_help="; fp32 with --smoke, CPU bf16 matmuls being slow",
                     add_arguments=add_arguments, argv=argv)
    if DiffusionHead is None:
        raise SystemExit("unimm.models has no DiffusionHead in this checkout: nothing to benchmark")
    shapes, names, dtype_name, dtype = args.shape_table, args.names, args.dtype_name, args.dtype
    device, timer, smoke = args.device, args.timer, args.smoke
    rows_list = ([int(r) for r in args.rows.split(",")] if args.rows else
                 list(SMOKE_ROWS if smoke else QUICK_ROWS if args.quick else ROWS))
    if any(r < 2 or r % 2 for r in rows_list):
        raise SystemExit(f"--rows must be even and >= 2 (cond holds [cond; uncond] halves), got {rows_list}")
    compile_rows = ({int(r) for r in args.compile_rows.split(",")} if args.compile_rows is not None else
                    set() if args.quick else set(rows_list))
    num_steps = SMOKE_NUM_STEPS if smoke else NUM_STEPS
    env, peaks = start_run(args)

    results = []
    for name in names:
        head = build_head(shapes[name], dtype, device)
        for rows in rows_list:
            compile_reason = ("skipped with --no-compile" if args.no_compile else
                              None if rows in compile_rows else
                              "left out of --quick runs: compilation takes minutes" if args.quick else
                              f"skipped: {rows} rows not in --compile-rows")
            torch.manual_seed(0)
            results += bench_case(name, shapes[name], head, rows, dtype, device, timer, peaks, num_steps, smoke,
                                  compile_reason)
        del head

    parts, target_met, undecided = check_targets(results, smoke)
    warmup, repeat = (SMOKE_WARMUP, SMOKE_REPEAT) if smoke else (WARMUP, REPEAT)
    payload = dict(
        target=TARGET,
        target_met=target_met,
        target_parts=parts,
        smoke=smoke,
        environment=env,
        peaks=peaks,
        dtype=dtype_name,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        num_steps=num_steps,
        cfg_scale=CFG_SCALE,
        rows=rows_list,
        compile_mode="reduce-overhead",
        timing=dict(timer=timer.__name__, warmup=warmup, repeat=repeat, measures="one sample call (all steps)"),
        reference="eager reference (UNIMM_BACKEND=reference) on the same head, cond and noise",
        shapes={name: dict(token_dim=token_dim, cond_dim=width, width=width, depth=depth)
                for name, (token_dim, width, depth) in ((name, shapes[name]) for name in names)},
        results=results,
    )
    path = save(payload, args)

    print_outcome(path, TARGET, smoke, env, f"target {verdict(target_met)}: "
          f">= {TARGET_VS_EAGER:g}x eager {verdict(parts['vs_eager'])}, "
          f">= {TARGET_VS_COMPILE:g}x torch.compile {verdict(parts['vs_compile'])}, "
          f">= {TARGET_PCT_PEAK:g}% of the matmul rate at {TARGET_PEAK_ROWS} rows {verdict(parts['pct_matmul_peak'])}"
          + (f" [not judged: {', '.join(undecided)}]" if undecided else ""))
    compiled = [r for r in results if r["impl"] == "torch.compile" and r["available"]]
    if compiled:
        print("torch.compile first call, compilation and graph capture included: "
              + ", ".join(f"{r['shape']}/{r['rows']} {r['compile_s']:.1f} s" for r in compiled))
    checked = [r for r in results if "within_tolerance" in r]
    off = [f"{r['shape']}/{r['rows']}/{r['impl']}" for r in checked if not r["within_tolerance"]]
    print(f"samples vs the eager reference's on the same noise (max abs diff <= {TOLERANCE[dtype]:g} "
          "x max(1, max |sample|)): "
          + (f"outside tolerance for {', '.join(off)}" if off else f"all {len(checked)} checked runs within tolerance"))
    for r in results:
        if not r["available"]:
            print(f"n/a {r['shape']}/{r['rows']}/{r['impl']}: {r['reason']}")
    print(f"rows = the CFG-doubled batch (cfg_scale {CFG_SCALE:g}, rows / 2 tokens sampled); median ms = one "
          f"{num_steps}-step sample call; speedup vs X = X's median time / unimm's\n")
    table = [table_row(result, shapes) for result in results]
    print(markdown_table(table, list(table[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
