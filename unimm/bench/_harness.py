"""The harness every benchmark family (``unimm.bench.<family>``) runs on: the command line and
the run it describes (``Run``: timing, peak memory, the environment record and the device's
measured peaks, the results file and the printed end of a run), n/a rows, speedups, verdicts.

A family keeps only what is its own: its shapes, its anchors, how it checks a result and what
its table shows. It runs as ``unimm bench --families <family>`` (with the others: ``unimm
bench``) or as ``python -m unimm.bench.<family>`` (with all its own options).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import time

import torch

import unimm
from unimm.kernels import BackendUnavailable

# In a checkout (an editable install) the package sits beside benchmarks/ and docs/: results go
# to benchmarks/results, where they are committed, and docs/PERFORMANCE.md is rendered from them.
# Installed from a wheel there is no such folder: results go to ./unimm-bench.
PACKAGE_ROOT = pathlib.Path(unimm.__file__).resolve().parent.parent
CHECKOUT_RESULTS_DIR = PACKAGE_ROOT / "benchmarks" / "results"
IN_CHECKOUT = CHECKOUT_RESULTS_DIR.is_dir()
RESULTS_DIR = CHECKOUT_RESULTS_DIR if IN_CHECKOUT else pathlib.Path("unimm-bench")


# ---------------------------------------------------------------------------------------------
# Timing and the device's peaks
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


def measure_device_peaks() -> dict:
    """What this GPU reaches in practice: a large bf16 matmul (TFLOP/s) and a large device copy
    (GB/s, bytes read + written), timed like the kernels so ratios to them are fair."""
    n = 8192
    # random data, not zeros: tensor cores draw less power (and clock higher) on zeros
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    matmul_ms = time_cuda(functools.partial(torch.matmul, a, b, out=c))["median_ms"]
    del a, b, c

    src = torch.randn(1 << 28, device="cuda")  # 1 GiB: far beyond any L2
    dst = torch.empty_like(src)
    copy_ms = time_cuda(functools.partial(dst.copy_, src))["median_ms"]
    moved_bytes = 2 * src.numel() * src.element_size()
    del src, dst

    return dict(bf16_matmul_tflops=2 * n**3 / (matmul_ms * 1e-3) / 1e12,
                copy_gbps=moved_bytes / (copy_ms * 1e-3) / 1e9)


@contextlib.contextmanager
def forced_backend(name: str | None):
    """UNIMM_BACKEND set to ``name`` (None: unset, automatic dispatch) while the block runs. unimm
    reads it on every call, so one process can time every backend."""
    before = os.environ.pop("UNIMM_BACKEND", None)
    if name is not None:
        os.environ["UNIMM_BACKEND"] = name
    try:
        yield
    finally:
        os.environ.pop("UNIMM_BACKEND", None)
        if before is not None:
            os.environ["UNIMM_BACKEND"] = before


# ---------------------------------------------------------------------------------------------
# Environment and results file
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
# A run: the command line, the device, timing
# ---------------------------------------------------------------------------------------------

DTYPE_CHOICES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Run(argparse.Namespace):
    """One run of a family: its command line (``parse_run``) and what follows from it (``family``,
    ``shape_table``, ``names``, ``dtype_name`` / ``dtype``, ``device``, ``timer`` and its
    ``counts``), then, once started, ``env`` (the environment record) and ``peaks`` (the device's
    measured peaks; None in smoke runs)."""

    def start(self) -> None:
        """Prints the device and versions into the log and measures the peaks, or reads them from
        ``--peaks`` (``unimm bench`` measures them once for every family)."""
        self.env = env = environment(self.device)
        print(f"device: {env['device']}  dtype: {self.dtype_name}  torch {env['torch']}  triton {env['triton']}")
        self.peaks = None
        if self.smoke:
            return
        self.peaks = load_peaks(self.peaks_file) if self.peaks_file is not None else measure_device_peaks()
        print(f"{'peaks from ' + str(self.peaks_file) if self.peaks_file else 'measured peaks'}: bf16 matmul "
              f"{self.peaks['bf16_matmul_tflops']:.0f} TFLOP/s, copy {self.peaks['copy_gbps']:.0f} GB/s")

    def time(self, fn, **options) -> dict:
        """``fn`` timed with this run's timer and counts; ``options`` override them (``rotate``,
        ``warmup``, ``repeat``)."""
        return self.timer(fn, **{**self.counts, **options})

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def release(self, collect: bool = False) -> None:
        """Returns cached CUDA memory between implementations, after a garbage collection with
        ``collect`` (whole models, whose reference cycles outlive their last name)."""
        if collect:
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def peak_memory(self, fn) -> int:
        """Bytes of CUDA memory allocated beyond what was live before one call of ``fn``, at its
        peak (the output too while it is alive). Call it after the timing warm-up, so one-off
        allocations (compilation, autotuning) do not count."""
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)

    def rotation(self, inputs: tuple, repeat: int) -> list[tuple]:
        """``inputs`` plus copies of its tensors, enough that together they span twice the L2 cache,
        so every timed call reads cold inputs (none on the CPU, or when one set is that large)."""
        if self.device.type != "cuda":
            return [inputs]
        l2_bytes = torch.cuda.get_device_properties(self.device).L2_cache_size
        input_bytes = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))
        copies = min(repeat, -(-2 * l2_bytes // input_bytes))
        return [inputs] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in inputs)
                           for _ in range(copies - 1)]

    def choose(self, spec: str | None, choices, default, what: str) -> list[str]:
        """A family's own comma-separated choice (layouts, parts): ``spec``, else ``default``; exits
        naming the unknown ones."""
        names = spec.split(",") if spec else list(default)
        unknown = [name for name in names if name not in choices]
        if unknown:
            sys.exit(f"unimm.bench.{self.family}: unknown {what} {unknown}; choose from {','.join(choices)}")
        return names

    def fields(self) -> dict:
        """The fields of every family's JSON that describe the run itself."""
        return dict(smoke=self.smoke, environment=self.env, peaks=self.peaks, dtype=self.dtype_name)

    def report(self, payload: dict, outcome: str, *, case: tuple[str, ...], tables: list[tuple[str, list[dict]]],
               undecided: list[str] = (), agreement: str | None = None, compiled: str | None = None,
               notes: list[str] = ()) -> pathlib.Path:
        """Writes the family's payload where the command line says (``--json``, else ``--out``;
        marked as a quick run where it was one), then prints the end of the run: where the
        results went, the target and this run's ``outcome`` (with what was ``undecided``); the
        first calls that compiled (``compiled`` says what they include); how the results agreed
        with the reference (``agreement`` says against what, within what); every n/a and why;
        the family's ``notes``; then each table under its heading. ``case``: the result keys
        that name a case, for those lines."""
        path = write_results(self.family, dict(payload, quick=self.quick), self.out, path=self.json)
        print(f"\nwrote {path}")
        print(f"target (issue): {payload['target']}")
        if self.smoke:
            print("smoke run: tiny shapes on the CPU, the times say nothing about the target")
        else:
            note = "" if "H100" in self.env["device"] else " (the target is stated for H100)"
            undecided = f" [not judged: {', '.join(undecided)}]" if undecided else ""
            print(f"this run on {self.env['device']}{note}: {outcome}{undecided}")
        results = payload["results"]

        def label(r, keys=case):
            return "/".join(str(r.get(key, "")) for key in keys)

        timed_compiles = [r for r in results if "compile_s" in r]
        if compiled and timed_compiles:
            print(f"{compiled}: " + ", ".join(f"{label(r)} {r['compile_s']:.1f} s" for r in timed_compiles))
        if agreement:
            checked = [r for r in results if "within_tolerance" in r]
            off = [label(r, case + ("impl",)) for r in checked if not r["within_tolerance"]]
            print(f"{agreement}: " + (f"outside tolerance for {', '.join(off)}" if off
                                      else f"all {len(checked)} checked runs within tolerance"))
        for r in results:
            if not r["available"]:
                print(f"n/a {label(r, case + ('impl',))}: {r['reason']}")
        for note in notes:
            print(note)
        for heading, rows in tables:
            print(f"{heading}\n")
            print(markdown_table(rows, list(rows[0])))
        return path


def parse_run(doc: str, family: str, shapes: dict, smoke_shapes: dict, *, default_dtype: str, counts: dict,
              smoke_counts: dict | None = None, quick_counts: dict | None = None, quick_shapes: tuple[str, ...] = (),
              smoke_dtype: str | None = None, dtype_help: str = "", add_arguments=None, argv: list[str] | None = None
              ) -> Run:
    """The command line every family shares: ``--dtype``, ``--shapes``, ``--out``, ``--json``,
    ``--quick``, ``--smoke``, ``--peaks``; ``add_arguments(parser)`` adds a family's own options.

    Returns the run: the parsed arguments plus ``shape_table`` (full or smoke), ``names`` (the
    shapes to run: ``--shapes``, else ``quick_shapes`` with ``--quick``, else all), ``dtype_name``
    / ``dtype``, ``device``, ``timer`` and its ``counts`` (warm-up and timed calls:
    ``smoke_counts`` in a smoke run, ``quick_counts`` in a quick one, where given).
    """
    summary = " ".join(doc.split("\n\n")[0].split())  # the docstring's first paragraph
    parser = argparse.ArgumentParser(prog=f"python -m unimm.bench.{family}", description=summary)
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, help=f"input dtype (default {default_dtype}{dtype_help})")
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
    parser.add_argument("--peaks", type=pathlib.Path, dest="peaks_file", metavar="PEAKS",
                        help="JSON file with this device's measured bf16_matmul_tflops and copy_gbps, used instead "
                             "of measuring them again (`unimm bench` measures them once for all families)")
    if add_arguments is not None:
        add_arguments(parser)
    run = parser.parse_args(argv, namespace=Run())
    if run.smoke and run.out is None and run.json is None:
        parser.error("--smoke needs --out DIR: smoke numbers do not belong in benchmarks/results")
    if not run.smoke and not torch.cuda.is_available():
        sys.exit(f"unimm.bench.{family} times CUDA kernels and no CUDA device is visible; run "
                 f"`python -m unimm.bench.{family} --smoke --out DIR` to check it on the CPU")
    run.family = family
    run.shape_table = smoke_shapes if run.smoke else shapes
    if run.shapes:
        run.names = run.shapes.split(",")
    elif run.quick and quick_shapes and not run.smoke:
        run.names = list(quick_shapes)
    else:
        run.names = list(run.shape_table)
    unknown = [name for name in run.names if name not in run.shape_table]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {','.join(run.shape_table)}")
    run.dtype_name = run.dtype or (smoke_dtype if run.smoke and smoke_dtype else default_dtype)
    run.dtype = DTYPE_CHOICES[run.dtype_name]
    run.device = torch.device("cpu" if run.smoke else "cuda")
    run.timer = time_cpu if run.smoke else time_cuda
    run.counts = (smoke_counts if run.smoke and smoke_counts else
                  quick_counts if run.quick and quick_counts else counts)
    return run


def load_peaks(path: pathlib.Path | str) -> dict:
    """Measured peaks saved by ``unimm bench`` (``measure_device_peaks``' dict as JSON)."""
    peaks = json.loads(pathlib.Path(path).read_text())
    if not isinstance(peaks, dict) or not {"bf16_matmul_tflops", "copy_gbps"} <= peaks.keys():
        raise ValueError(f"{path}: expected a JSON object with bf16_matmul_tflops and copy_gbps")
    return peaks


# ---------------------------------------------------------------------------------------------
# Results: optional anchors, n/a rows, speedups, verdicts, table cells
# ---------------------------------------------------------------------------------------------

def optional_import(module: str, package: str):
    """(``module``, None), or (None, why not) where ``package`` is not installed or does not
    import with this torch / triton: an optional anchor is an n/a row, never a failed run."""
    try:
        return importlib.import_module(module), None
    except Exception as error:
        return None, f"{package} is not importable ({type(error).__name__}: {error})"


class NotHere(Exception):
    """An implementation that cannot run in this process (not installed, needs a GPU, left out of
    ``--quick``): its row is n/a with this reason."""


def first_line(error: BaseException) -> str:
    """An error as an n/a reason: its type and the first line of its message."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def attempt(fill, *, is_bug: bool) -> str | None:
    """Calls ``fill()`` (which fills in a result); returns None, or why the implementation is n/a:
    ``NotHere`` or ``BackendUnavailable`` (their message), out of memory, or any other error of an
    anchor. An error of unimm's own (``is_bug``) is raised: the run must not hide it."""
    try:
        fill()
    except (NotHere, BackendUnavailable) as error:
        return str(error)
    except torch.OutOfMemoryError as error:
        return f"out of memory: {str(error).splitlines()[0]}"
    except Exception as error:
        if is_bug:
            raise
        return first_line(error)
    return None


def mark_na(result: dict, reason: str, keep: tuple[str, ...], label: str) -> None:
    """Makes ``result`` an n/a row, keeping only the ``keep`` keys that name its case and
    implementation, and says so in the log under ``label``."""
    for key in [key for key in result if key not in keep]:
        del result[key]
    result.update(available=False, reason=reason)
    print(f"{label}  n/a: {reason}")


def add_unimm_speedups(results: list[dict], anchors) -> dict:
    """Gives the available "unimm" row a ``speedup`` over each available anchor (anchor's median
    time / unimm's); returns the available rows by implementation."""
    by_impl = {r["impl"]: r for r in results if r["available"]}
    if "unimm" in by_impl:
        by_impl["unimm"]["speedup"] = {anchor: by_impl[anchor]["median_ms"] / by_impl["unimm"]["median_ms"]
                                       for anchor in anchors if anchor in by_impl}
    return by_impl


def fold(values) -> bool | None:
    """Judgements (True / False / None: could not judge) into one: any failure fails, else
    anything unjudged (or nothing at all) leaves it unjudged."""
    values = list(values)
    if not values:
        return None
    return False if False in values else (None if None in values else True)


def verdict(met: bool | None) -> str:
    """How a target (or a part of one) came out: None when the run could not judge it."""
    return {True: "met", False: "NOT met", None: "not judged"}.get(met, str(met))


def show(values: dict | None, key, spec: str, scale: float = 1.0) -> str:
    """``values[key]`` for a table: formatted, or '-' where there is none."""
    value = None if values is None else values.get(key)
    return "-" if value is None else format(value * scale, spec)
