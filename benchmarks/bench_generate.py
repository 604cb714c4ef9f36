"""Generation: the kernels of one decode step against the PyTorch a generation loop would otherwise use.

The script is a set of parts (``--parts``, default all), each with its own shapes, named
``<part>/<shape>`` in ``--shapes``. A part is an entry of ``PARTS``: its shapes, its smoke shapes,
the function that benchmarks one shape, its target and how to judge it, and how a result prints.

Part ``decode_attention`` (issue 7, item c): ``unimm.kernels.decode_attention`` over a KV cache
``[B, max_len, Hkv, D]`` in unimm's layout against ``F.scaled_dot_product_attention`` on the same
cache (``[B, Hkv, max_len, D]`` transposed views, no copy; ``enable_gqa=True``), in this process on
the same inputs, for Llama-3.2-1B-shaped attention (Hq 32, Hkv 8, D 64) and Llama-3-8B-shaped
attention (Hq 32, Hkv 8, D 128), batches 1 / 16 / 64 and caches of 1k / 4k / 16k rows, bf16.
Two cases per shape:
  * ragged: row lengths spread over [max_len / 2, max_len] (fixed seed; max_len at batch 1). SDPA
    runs on the padded cache with a boolean mask ``[B, 1, 1, max_len]`` of each row's valid keys,
    built once outside the timing (a generation loop keeps it up to date);
  * full: every row of length max_len; SDPA with no mask (its flash path).
unimm runs with auto dispatch and with each backend forced through UNIMM_BACKEND; a backend that
cannot serve the call shows as n/a. GB/s counts the bytes of K and V the call has to read (sum of
row lengths x Hkv x D x 2 tensors x element size), the same count for every implementation (SDPA on
the padded cache reads more: that is part of its time). "% copy" is that rate over the device's
measured copy bandwidth (large device-to-device copy, read + write bytes). Every output is checked
against the fp32 reference (relative-norm error). Inputs smaller than twice the L2 cache are
rotated through copies so that every call reads them from HBM, as a decode step does.

Target (issue): decode_attention at >= 85% of the measured copy bandwidth for caches of >= 4k rows.

Parts ``discrete`` and ``continuous`` (whole generation steps) are to come; they add an entry to
``PARTS``.

    python benchmarks/bench_generate.py [--parts decode_attention] [--shapes decode_attention/llama-3-8b-b16-4k] [--out DIR]
    python benchmarks/bench_generate.py --smoke --out DIR   # tiny shapes on the CPU: checks the script
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from _common import add_unimm_speedups, markdown_table, parse_run, print_outcome, start_run, verdict, write_results
from unimm.kernels import BackendUnavailable, decode_attention
from unimm.kernels.reference.decode import decode_attention as reference_decode_attention

WARMUP, REPEAT = 10, 50
SMOKE_WARMUP, SMOKE_REPEAT = 1, 3  # the smoke run checks the script, it measures nothing


@dataclass
class Run:
    """What every part gets: the run's dtype, device, timer and measured peaks."""
    dtype: torch.dtype
    device: torch.device
    timer: Callable
    peaks: dict | None
    smoke: bool

    def time(self, fn, rotate=None) -> dict:
        warmup, repeat = (SMOKE_WARMUP, SMOKE_REPEAT) if self.smoke else (WARMUP, REPEAT)
        return self.timer(fn, warmup=warmup, repeat=repeat, rotate=rotate)


@dataclass
class Part:
    """One benchmark of the script. ``bench(name, spec, run)`` returns result dicts (each with
    ``shape``, ``impl`` and ``available``, plus ``reason`` when not available);
    ``judge(results, shapes, run)`` says whether the target is met (None: not judged);
    ``describe(spec)`` is the shape's JSON record; ``row(result, spec)`` its table row."""
    shapes: dict
    smoke_shapes: dict
    bench: Callable
    target: str
    judge: Callable
    describe: Callable
    row: Callable


def set_backend(backend: str | None) -> None:
    """unimm reads UNIMM_BACKEND on every call, so one process can time every backend."""
    if backend is None:
        os.environ.pop("UNIMM_BACKEND", None)
    else:
        os.environ["UNIMM_BACKEND"] = backend


def rotation(args: tuple, device: torch.device, repeat: int) -> list[tuple]:
    """``args`` plus copies of its tensors, enough that together they span twice the L2 cache
    (none on the CPU, or when one set is already that large)."""
    if device.type != "cuda":
        return [args]
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    input_bytes = sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))
    copies = min(repeat, -(-2 * l2_bytes // input_bytes))
    return [args] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args) for _ in range(copies - 1)]


def show(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------------------------
# Part decode_attention
# ---------------------------------------------------------------------------------------------

DECODE_TARGET = "decode_attention at >= 85% of the measured copy bandwidth for caches of >= 4k rows (H100)"
DECODE_TARGET_PCT = 85.0
DECODE_TARGET_MIN_LEN = 4096
# model: (query heads Hq, kv heads Hkv, head dim D)
DECODE_MODELS = {"llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128), "tiny": (4, 2, 64)}
# name: (model, batch B, cache rows max_len)
DECODE_SHAPES = {f"{model}-b{batch}-{max_len // 1024}k": (model, batch, max_len)
                 for model in ("llama-3.2-1b", "llama-3-8b") for batch in (1, 16, 64) for max_len in (1024, 4096, 16384)}
DECODE_SMOKE_SHAPES = {"tiny-b3-300": ("tiny", 3, 300), "tiny-b1-64": ("tiny", 1, 64)}
DECODE_CASES = ("ragged", "full")
# (name, UNIMM_BACKEND while it runs; None = auto dispatch)
DECODE_UNIMM = (("unimm", None), ("unimm[triton]", "triton"), ("unimm[cuda]", "cuda"))
DECODE_ANCHOR = "sdpa"
# Relative-norm error against the fp32 reference (DESIGN.md, Numerics).
DECODE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def ragged_lengths(batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Row lengths spread over [max_len / 2, max_len], the longest first; max_len at batch 1."""
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=torch.Generator().manual_seed(batch))
    lengths[0] = max_len
    return lengths.to(device, torch.int32)


def sdpa_decode(q, k_cache, v_cache, mask):
    """``[B, Hq, D]`` queries through SDPA over ``[B, Hkv, max_len, D]`` views of the caches."""
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]


def bench_decode_attention(name: str, spec: tuple, run: Run) -> list[dict]:
    model, batch, max_len = spec
    q_heads, kv_heads, head_dim = DECODE_MODELS[model]
    dtype, device = run.dtype, run.device
    q = torch.randn(batch, q_heads, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
    lengths = {"ragged": ragged_lengths(batch, max_len, device),
               "full": torch.full((batch,), max_len, dtype=torch.int32, device=device)}
    results = []
    for case in DECODE_CASES:
        lens = lengths[case]
        kv_bytes = 2 * int(lens.sum()) * kv_heads * head_dim * k_cache.element_size()
        mask = None
        if case == "ragged":
            mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        # fp32 queries: the reference's fp32 result, not rounded to the input dtype
        expected = reference_decode_attention(q.float(), k_cache, v_cache, lens)
        rotate = rotation((q, k_cache, v_cache), device, REPEAT)
        # (impl, UNIMM_BACKEND, call, errors that make the row n/a instead of ending the run)
        calls = [(impl, backend, lambda q, k, v, lens=lens: decode_attention(q, k, v, lens),
                  (BackendUnavailable, torch.OutOfMemoryError)) for impl, backend in DECODE_UNIMM]
        calls.append((DECODE_ANCHOR, None, lambda q, k, v, mask=mask: sdpa_decode(q, k, v, mask),
                      (RuntimeError, TypeError)))  # an SDPA without enable_gqa, or out of memory
        case_results = []
        for impl, backend, fn, not_here in calls:
            result = dict(shape=name, case=case, impl=impl, kv_bytes=kv_bytes)
            case_results.append(result)
            set_backend(backend)
            try:
                out = fn(q, k_cache, v_cache)
                timing = run.time(fn, rotate=rotate)
            except not_here as error:
                result.update(available=False, reason=f"{type(error).__name__}: {error}".splitlines()[0])
                print(f"{name:>22} {case:>6} {impl:>14}  n/a: {result['reason']}")
                continue
            finally:
                set_backend(None)
            gbps = kv_bytes / (timing["median_ms"] * 1e-3) / 1e9
            error = ((out.float() - expected).norm() / expected.norm()).item()
            result.update(available=True, **timing, gbps=gbps, rel_error=error,
                          within_tolerance=error <= DECODE_TOLERANCE[dtype])
            if run.peaks is not None:
                result["pct_copy_peak"] = 100 * gbps / run.peaks["copy_gbps"]
            print(f"{name:>22} {case:>6} {impl:>14}  {timing['median_ms']:9.4f} ms  {gbps:8.1f} GB/s  "
                  f"rel err {error:.1e}")
        add_unimm_speedups(case_results, (DECODE_ANCHOR,))
        results += case_results
    return results


def judge_decode_attention(results: list[dict], shapes: dict, run: Run) -> bool | None:
    if run.peaks is None:
        return None
    judged = [r for r in results if r["impl"] == "unimm" and shapes[r["shape"]][2] >= DECODE_TARGET_MIN_LEN]
    if not judged:
        return None
    return all(r.get("available") and r["pct_copy_peak"] >= DECODE_TARGET_PCT for r in judged)


def describe_decode_shape(spec: tuple) -> dict:
    model, batch, max_len = spec
    q_heads, kv_heads, head_dim = DECODE_MODELS[model]
    return dict(model=model, batch=batch, max_len=max_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)


def decode_table_row(result: dict, spec: tuple) -> dict:
    model, batch, max_len = spec
    q_heads, kv_heads, head_dim = DECODE_MODELS[model]
    available = result["available"]
    return {
        "shape": f"{model} B={batch} L={max_len} Hq={q_heads} Hkv={kv_heads} D={head_dim}",
        "case": result["case"],
        "impl": result["impl"],
        "median ms": show(result.get("median_ms"), ".4f") if available else "n/a",
        "GB/s": show(result.get("gbps"), ".0f"),
        "% copy": show(result.get("pct_copy_peak"), ".1f"),
        f"speedup vs {DECODE_ANCHOR}": show(result.get("speedup", {}).get(DECODE_ANCHOR), ".2f"),
        "rel err": show(result.get("rel_error"), ".1e"),
    }


# ---------------------------------------------------------------------------------------------
# Parts and the run
# ---------------------------------------------------------------------------------------------

PARTS = {
    "decode_attention": Part(shapes=DECODE_SHAPES, smoke_shapes=DECODE_SMOKE_SHAPES, bench=bench_decode_attention,
                             target=DECODE_TARGET, judge=judge_decode_attention, describe=describe_decode_shape,
                             row=decode_table_row),
}
SHAPES = {f"{part}/{name}": spec for part, entry in PARTS.items() for name, spec in entry.shapes.items()}
SMOKE_SHAPES = {f"{part}/{name}": spec for part, entry in PARTS.items() for name, spec in entry.smoke_shapes.items()}


def add_arguments(parser) -> None:
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default all)")


def main():
    args = parse_run(__doc__, "bench_generate.py", SHAPES, SMOKE_SHAPES, default_dtype="bf16", smoke_dtype="fp32",
                     dtype_help="; fp32 with --smoke, CPU bf16 being slow", add_arguments=add_arguments)
    parts = args.parts.split(",") if args.parts else list(PARTS)
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    names = [name for name in args.names if name.split("/")[0] in parts]
    if not names:
        raise SystemExit(f"--shapes {args.shapes} names no shape of --parts {','.join(parts)}")
    env, peaks = start_run(args.device, args.dtype_name, args.smoke)
    run = Run(dtype=args.dtype, device=args.device, timer=args.timer, peaks=peaks, smoke=args.smoke)

    part_results = {}
    for part in parts:
        entry = PARTS[part]
        results = []
        for name in names:
            part_name, _, shape = name.partition("/")
            if part_name == part:
                torch.manual_seed(0)
                results += [dict(part=part, **r) for r in entry.bench(shape, args.shape_table[name], run)]
        part_results[part] = results

    summary = {}
    for part, results in part_results.items():
        entry = PARTS[part]
        table = entry.smoke_shapes if args.smoke else entry.shapes
        shapes = {r["shape"]: table[r["shape"]] for r in results}
        summary[part] = dict(target=entry.target, target_met=entry.judge(results, shapes, run),
                             shapes={shape: entry.describe(spec) for shape, spec in shapes.items()})
    met = [s["target_met"] for s in summary.values()]
    shapes = {f"{part}/{shape}": dict(part=part, **record) for part, s in summary.items()
              for shape, record in s["shapes"].items()}
    warmup, repeat = (SMOKE_WARMUP, SMOKE_REPEAT) if args.smoke else (WARMUP, REPEAT)
    payload = dict(
        target="; ".join(s["target"] for s in summary.values()),
        target_met=None if None in met else all(met),
        parts=summary,
        smoke=args.smoke,
        environment=env,
        peaks=peaks,
        dtype=args.dtype_name,
        timing=dict(timer=args.timer.__name__, warmup=warmup, repeat=repeat),
        shapes=shapes,
        results=[r for results in part_results.values() for r in results],
    )
    path = write_results("generate", payload, args.out)

    print_outcome(path, payload["target"], args.smoke, env,
                  ", ".join(f"{part}: target {verdict(s['target_met'])}" for part, s in summary.items()))
    results = payload["results"]
    off = [f"{r['shape']}/{r['case']}/{r['impl']}" for r in results if r.get("within_tolerance") is False]
    print("outputs vs the fp32 reference: " + (f"outside tolerance for {', '.join(off)}" if off else
                                                 f"all {sum('within_tolerance' in r for r in results)} within tolerance"))
    for r in results:
        if not r["available"]:
            print(f"n/a {r['part']}/{r['shape']}/{r.get('case', '')}/{r['impl']}: {r['reason']}")
    for part, results in part_results.items():
        entry = PARTS[part]
        table = entry.smoke_shapes if args.smoke else entry.shapes
        rows = [entry.row(r, table[r["shape"]]) for r in results]
        print(f"\n{part}: speedup vs X = X's median time / this row's; GB/s = K and V bytes the call must read "
              "/ median time\n")
        print(markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
