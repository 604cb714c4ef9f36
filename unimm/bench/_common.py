"""Shared pieces of every benchmark family (``unimm.bench.<family>``): timers, peak memory, the
device's measured peaks, the environment record, the results file, the markdown table and the
command line every family takes.

A family runs as ``unimm bench --families <family>`` (with the others: ``unimm bench``) or as
``python -m unimm.bench.<family>`` (with all its own options).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import pathlib
import platform
import re
import subprocess
import sys
import time

import torch

import unimm

# In a checkout (an editable install) the package sits beside benchmarks/ and docs/: results go
# to benchmarks/results, where they are committed, and docs/PERFORMANCE.md is rendered from them.
# Installed from a wheel there is no such folder: results go to ./unimm-bench.
PACKAGE_ROOT = pathlib.Path(unimm.__file__).resolve().parent.parent
CHECKOUT_RESULTS_DIR = PACKAGE_ROOT / "benchmarks" / "results"
IN_CHECKOUT = CHECKOUT_RESULTS_DIR.is_dir()
RESULTS_DIR = CHECKOUT_RESULTS_DIR if IN_CHECKOUT else pathlib.Path("unimm-bench")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def _calls(fn, rotate):
    """The zero-argument calls to cycle through: ``fn`` itself, or ``fn(*args)`` per rotation entry."""
    if rotate is None:
        return [fn]
    return [functools.partial(fn, *args) for args in rotate]


def _summary(times_ms: list[float]) -> dict:
    p20, median, p80 = torch.tensor(times_ms).quantile(torch.tensor([0.2, 0.5, 0.8])).tolist()
    return dict(median_ms=median, p20_ms=p20, p80_ms=p80)


def time_cuda(fn, *, warmup: int = 10, repeat: int = 50, rotate=None) -> dict:
    """Milliseconds per call of ``fn`` on the current stream: median and 20th / 80th percentiles.

    Each call sits between its own pair of CUDA events, so one slow call (a clock dip, another
    process) moves a percentile, not the median. ``rotate``: argument tuples cycled through, one
    per call, so that inputs small enough to stay in L2 are cold again by their next turn.
    """
    calls = _calls(fn, rotate)
    for i in range(warmup):  # compilation, autotuning, allocator growth, clocks ramping up
        calls[i % len(calls)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for i in range(repeat):
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize()
    return _summary([start.elapsed_time(end) for start, end in zip(starts, ends)])


def time_cpu(fn, *, warmup: int = 10, repeat: int = 50, rotate=None) -> dict:
    """``time_cuda`` with a wall clock, for CPU tensors: what ``--smoke`` runs use."""
    calls = _calls(fn, rotate)
    for i in range(warmup):
        calls[i % len(calls)]()
    times_ms = []
    for i in range(repeat):
        start = time.perf_counter()
        calls[i % len(calls)]()
        times_ms.append((time.perf_counter() - start) * 1e3)
    return _summary(times_ms)


# ---------------------------------------------------------------------------------------------
# Memory and device peaks
# ---------------------------------------------------------------------------------------------

def peak_memory(fn) -> int:
    """Bytes of CUDA memory allocated beyond what was live before one call of ``fn``, at its peak.

    Counts the output too while it is alive. Call after the timing warm-up, so one-off
    allocations (compilation, autotuning) do not count.
    """
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def measure_device_peaks() -> dict:
    """What this GPU reaches in practice: a large bf16 matmul (TFLOP/s) and a large device copy
    (GB/s, bytes read + written), timed like the kernels so ratios to them are fair."""
    n = 8192
    # random data, not zeros: tensor cores draw less power (and clock higher) on zeros
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = time_cuda(lambda: torch.matmul(a, b, out=c))["median_ms"]
    del a, b, c

    src = torch.randn(1 << 28, device="cuda")  # 1 GiB: far beyond any L2
    dst = torch.empty_like(src)
    copy_ms = time_cuda(lambda: dst.copy_(src))["median_ms"]
    moved_bytes = 2 * src.numel() * src.element_size()
    del src, dst

    return dict(bf16_matmul_tflops=2 * n**3 / (matmul_ms * 1e-3) / 1e12,
                copy_gbps=moved_bytes / (copy_ms * 1e-3) / 1e9)


# ---------------------------------------------------------------------------------------------
# Environment and results
# ---------------------------------------------------------------------------------------------

def _git_sha() -> str:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


# The anchors that are packages of their own (benchmarks/requirements-anchors.txt), by distribution name
ANCHOR_PACKAGES = ("liger-kernel", "cut-cross-entropy", "flash-attn-4", "quack-kernels", "flashinfer-python",
                   "transformers")


def anchor_versions() -> dict[str, str | None]:
    """The installed version of each anchor package (None: not installed)."""
    from importlib import metadata

    versions = {}
    for name in ANCHOR_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment(device: torch.device | str = "cuda") -> dict:
    """What a result depends on: device, software versions, commit and date (no hostname)."""
    device = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = dict(device="cpu", compute_capability=None, sm_count=None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env = dict(device=props.name, compute_capability=f"{props.major}.{props.minor}",
                   sm_count=props.multi_processor_count)
    return dict(
        **env,
        machine=platform.machine(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        unimm=unimm.__version__,
        anchors=anchor_versions(),
        git_sha=_git_sha(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )


def result_name(stem: str, env: dict, suffix: str = ".json") -> str:
    """``<stem>-<device>-<date><suffix>``: a later run on the same device and day replaces the file."""
    device_slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    return f"{stem}-{device_slug}-{env['date'][:10]}{suffix}"


def write_results(family: str, payload: dict, out_dir: pathlib.Path | str | None = None, *,
                  path: pathlib.Path | str | None = None) -> pathlib.Path:
    """Writes ``payload`` (which holds ``environment``) to ``path``, by default
    ``<out_dir>/<family>-<device>-<date>.json``."""
    if path is None:
        out_dir = pathlib.Path(out_dir) if out_dir is not None else RESULTS_DIR
        path = out_dir / result_name(family, payload["environment"])
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"family": family, **payload}, indent=2) + "\n")
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table: one line per row, ``columns`` are both the headers and the keys."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_run(doc: str, family: str, shapes: dict, smoke_shapes: dict, *, default_dtype: str,
              quick_shapes: tuple[str, ...] = (), smoke_dtype: str | None = None, dtype_help: str = "",
              add_arguments=None, argv: list[str] | None = None):
    """The command line every family shares: ``--dtype``, ``--shapes``, ``--out``, ``--json``,
    ``--quick``, ``--smoke``, ``--peaks``; ``add_arguments(parser)`` adds a family's own options.

    Returns the parsed arguments plus what follows from them: ``shape_table`` (full or smoke),
    ``names`` (the shapes to run: ``--shapes``, else ``quick_shapes`` with ``--quick``, else all),
    ``dtype_name`` / ``dtype``, ``device`` and ``timer``.
    """
    parser = argparse.ArgumentParser(prog=f"python -m unimm.bench.{family}", description=doc.splitlines()[0])
    parser.add_argument("--dtype", choices=DTYPES, help=f"input dtype (default {default_dtype}{dtype_help})")
    parser.add_argument("--shapes", help=f"comma-separated subset of {','.join(shapes)} "
                                         f"(with --smoke: of {','.join(smoke_shapes)}); default all")
    parser.add_argument("--out", help=f"directory for the JSON results (default {RESULTS_DIR}; required with --smoke)")
    parser.add_argument("--json", type=pathlib.Path,
                        help="write the results to this file instead of OUT/<family>-<device>-<date>.json")
    parser.add_argument("--quick", action="store_true",
                        help=f"the headline shape ({','.join(quick_shapes) or 'all'}) against the strongest anchors "
                             "only, anchors that compile for minutes left out: what `unimm bench --quick` runs "
                             "(with --smoke: that choice of anchors on the tiny shapes)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU with a wall clock: checks that the family runs, measures nothing")
    parser.add_argument("--peaks", type=pathlib.Path,
                        help="JSON file with this device's measured bf16_matmul_tflops and copy_gbps, used instead "
                             "of measuring them again (`unimm bench` measures them once for all families)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke and args.out is None and args.json is None:
        parser.error("--smoke needs --out DIR: smoke numbers do not belong in benchmarks/results")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(f"unimm.bench.{family} times CUDA kernels and no CUDA device is visible; run "
                 f"`python -m unimm.bench.{family} --smoke --out DIR` to check it on the CPU")
    args.family = family
    args.shape_table = smoke_shapes if args.smoke else shapes
    if args.shapes:
        args.names = args.shapes.split(",")
    elif args.quick and quick_shapes and not args.smoke:
        args.names = list(quick_shapes)
    else:
        args.names = list(args.shape_table)
    unknown = [name for name in args.names if name not in args.shape_table]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {','.join(args.shape_table)}")
    args.dtype_name = args.dtype or (smoke_dtype if args.smoke and smoke_dtype else default_dtype)
    args.dtype = DTYPES[args.dtype_name]
    args.device = torch.device("cpu" if args.smoke else "cuda")
    args.timer = time_cpu if args.smoke else time_cuda
    return args


def save(payload: dict, args) -> pathlib.Path:
    """Writes a family's payload where its command line says (``--json``, else ``--out``), marked
    as a quick run where it was one."""
    return write_results(args.family, dict(payload, quick=args.quick), args.out, path=args.json)


# ---------------------------------------------------------------------------------------------
# Start and end of a run
# ---------------------------------------------------------------------------------------------

def load_peaks(path: pathlib.Path | str) -> dict:
    """Measured peaks saved by ``unimm bench`` (``measure_device_peaks``' dict as JSON)."""
    peaks = json.loads(pathlib.Path(path).read_text())
    if not isinstance(peaks, dict) or not {"bf16_matmul_tflops", "copy_gbps"} <= peaks.keys():
        raise ValueError(f"{path}: expected a JSON object with bf16_matmul_tflops and copy_gbps")
    return peaks


def start_run(args) -> tuple[dict, dict | None]:
    """Prints the device and versions and, except in smoke runs, the device's peaks: measured
    now, or read from ``--peaks``."""
    env = environment(args.device)
    print(f"device: {env['device']}  dtype: {args.dtype_name}  torch {env['torch']}  triton {env['triton']}")
    if args.smoke:
        return env, None
    peaks = load_peaks(args.peaks) if args.peaks is not None else measure_device_peaks()
    print(f"{'peaks from ' + str(args.peaks) if args.peaks else 'measured peaks'}: bf16 matmul "
          f"{peaks['bf16_matmul_tflops']:.0f} TFLOP/s, copy {peaks['copy_gbps']:.0f} GB/s")
    return env, peaks


def verdict(met: bool | None) -> str:
    """How a target (or a part of one) came out: None when this run could not judge it."""
    return {True: "met", False: "NOT met", None: "not judged"}[met]


def print_outcome(path: pathlib.Path, target: str, smoke: bool, env: dict, outcome: str) -> None:
    """Where the results went, the issue's target, and what this run says about it."""
    print(f"\nwrote {path}")
    print(f"target (issue): {target}")
    if smoke:
        print("smoke run: tiny shapes on the CPU, the times say nothing about the target")
    else:
        note = "" if "H100" in env["device"] else " (the target is stated for H100)"
        print(f"this run on {env['device']}{note}: {outcome}")


def add_unimm_speedups(results: list[dict], anchors) -> dict:
    """Gives the available "unimm" row a ``speedup`` over each available anchor (anchor's median
    time / unimm's); returns the available rows by implementation."""
    by_impl = {r["impl"]: r for r in results if r["available"]}
    if "unimm" in by_impl:
        by_impl["unimm"]["speedup"] = {anchor: by_impl[anchor]["median_ms"] / by_impl["unimm"]["median_ms"]
                                       for anchor in anchors if anchor in by_impl}
    return by_impl
