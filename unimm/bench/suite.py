"""``unimm bench``: every benchmark family in one command, one summary table at the end.

Each family (``unimm.bench.<family>``) runs in a process of its own, so that one which fails (an
exception, out of memory, a CUDA error that poisons its context, the time budget) is reported in
its row and never stops the others. The device's peaks (bf16 matmul rate, copy bandwidth) are
measured once, here, and handed to every family, so every "% of peak" of a run has the same
denominator. Written to ``--out``: each family's JSON (as ``python -m unimm.bench.<family>``
writes it), ``summary-<device>-<date>.json`` after every family, each family's log under
``--logs``, and the performance page rendered from the newest results there
(docs/PERFORMANCE.md for a checkout's benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

from unimm.bench import FAMILIES
from unimm.bench._harness import RESULTS_DIR, environment, measure_device_peaks, result_name
from unimm.bench.render import SUMMARY, SUMMARY_LEGEND, case_of, render, summary_table, timings

ALIASES = {"ce": "cross_entropy", "diffusion": "diffusion_head", "train": "train_step"}
# where a family's unimm result says whether it agreed with the reference (or its own eager run)
AGREEMENT_KEYS = ("within_tolerance", "same_codes_as_eager", "finite")
# unimm's share of a measured peak, and what to call it
PEAK_KEYS = (("pct_bf16_peak", "matmul"), ("mfu_pct", "MFU"), ("pct_copy_peak", "copy"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="one headline shape per family against its strongest installed anchors, anchors that "
                             "compile for minutes left out (designed for <= 5 minutes on one H100)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU: checks that every family runs, measures nothing (needs --out); "
                             "with --quick, the quick choice of anchors on those shapes")
    parser.add_argument("--families", help=f"comma-separated subset of {','.join(FAMILIES)} "
                                           f"(also {', '.join(f'{a}={f}' for a, f in ALIASES.items())}); default all")
    parser.add_argument("--out", type=pathlib.Path,
                        help=f"directory for the JSON results and the performance page (default {RESULTS_DIR})")
    parser.add_argument("--logs", type=pathlib.Path, help="directory for each family's log (default OUT/logs)")
    parser.add_argument("--budget-s", type=float,
                        help="stop after this many seconds: the family running then is stopped and the rest are "
                             "not started, each reported in its row (default: no limit)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print every family's output as it runs")


def families_of(spec: str | None, parser: argparse.ArgumentParser) -> list[str]:
    if not spec:
        return list(FAMILIES)
    chosen = [ALIASES.get(name.strip(), name.strip()) for name in spec.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in FAMILIES]
    if unknown or not chosen:
        parser.error(f"--families: unknown {unknown}; choose from {','.join(FAMILIES)}")
    return list(dict.fromkeys(chosen))


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    families = families_of(args.families, parser)
    if args.smoke and args.out is None:
        parser.error("--smoke needs --out DIR: smoke numbers do not belong with real results")
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s must be > 0, got {args.budget_s}")
    if not args.smoke and not torch.cuda.is_available():
        print("unimm bench times CUDA kernels and no CUDA device is visible; `unimm bench --smoke --out DIR` "
              "checks every family on the CPU", file=sys.stderr)
        return 2
    out = args.out if args.out is not None else RESULTS_DIR
    logs = args.logs if args.logs is not None else out / "logs"
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    return Suite(families, out, logs, args).run()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

class Suite:
    def __init__(self, families: list[str], out: pathlib.Path, logs: pathlib.Path, args: argparse.Namespace):
        self.families, self.out, self.logs, self.args = families, out, logs, args
        self.mode = " ".join(mode for mode in ("smoke", "quick") if getattr(args, mode)) or "full"
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.env = environment(self.device)
        self.start = time.monotonic()
        self.records: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.summary_path = out / result_name(SUMMARY, self.env)

    def remaining(self) -> float | None:
        if self.args.budget_s is None:
            return None
        return self.args.budget_s - (time.monotonic() - self.start)

    def run(self) -> int:
        from tqdm import tqdm

        print(f"unimm bench ({self.mode}): {', '.join(self.families)} on {self.env['device']}, torch "
              f"{self.env['torch']}, triton {self.env['triton']}; results in {self.out}, logs in {self.logs}")
        print("anchor packages: " + ", ".join(f"{name} {version or 'not installed'}"
                                              for name, version in self.env["anchors"].items()))
        self.peaks = None if self.args.smoke else measure_device_peaks()
        if self.peaks is not None:
            torch.cuda.empty_cache()
            print(f"measured peaks: bf16 matmul {self.peaks['bf16_matmul_tflops']:.0f} TFLOP/s, "
                  f"copy {self.peaks['copy_gbps']:.0f} GB/s")
        with tempfile.TemporaryDirectory() as scratch:
            peaks_file = pathlib.Path(scratch) / "peaks.json"
            peaks_file.write_text(json.dumps(self.peaks))
            with tqdm(total=len(self.families), unit="family", dynamic_ncols=True, file=sys.stderr) as bar:
                for family in self.families:
                    bar.set_description(family)
                    self.run_family(family, peaks_file, bar)
                    record = self.records[family]
                    bar.write(f"{family}: {record['status']} in {record['elapsed_s']:.1f} s"
                              + (f" ({record['error']})" if record.get("error") else ""))
                    self.write_summary()
                    bar.update(1)
        self.render_page()
        self.write_summary()
        self.print_summary()
        failed = [f for f, record in self.records.items() if record["status"] != "ok"]
        return 1 if failed else 0

    def run_family(self, family: str, peaks_file: pathlib.Path, bar) -> None:
        record = self.records[family] = dict(status=None, elapsed_s=0.0)
        remaining = self.remaining()
        if remaining is not None and remaining <= 0:
            record.update(status="not run", error=f"the time budget of {self.args.budget_s:g} s was spent")
            self.rows.append(failure_row(family, record))
            return
        json_path = self.out / result_name(family, self.env)
        log_path = self.logs / result_name(family, self.env, ".log")
        command = self.command(family, json_path, peaks_file)
        record.update(command=" ".join(command[1:]), log=str(log_path))
        started = time.monotonic()
        if json_path.exists():
            json_path.unlink()  # a file left from an earlier run must not pass for this one's
        rc, tail = run_logged(command, log_path, remaining, bar, self.args.verbose, family)
        record["elapsed_s"] = round(time.monotonic() - started, 1)
        if rc == "timeout":
            record.update(status="stopped", error=f"stopped at the time budget ({self.args.budget_s:g} s in all)")
        elif rc != 0 or not json_path.exists():
            record.update(status="failed", rc=rc, error=tail or f"exit code {rc}, no output")
        else:
            record.update(status="ok", json=str(json_path))
            try:
                self.rows += headline_rows(family, json.loads(json_path.read_text()))
                return
            except (OSError, ValueError, KeyError, TypeError) as error:
                record.update(status="failed", error=f"its JSON could not be summarised: {type(error).__name__}: "
                                                     f"{error}")
        self.rows.append(failure_row(family, record))

    def command(self, family: str, json_path: pathlib.Path, peaks_file: pathlib.Path) -> list[str]:
        """The family's own command line, as a user would type it."""
        command = [sys.executable, "-m", f"unimm.bench.{family}", "--json", str(json_path)]
        command += ["--smoke", "--out", str(self.out)] if self.args.smoke else ["--peaks", str(peaks_file)]
        if self.args.quick:
            command.append("--quick")
        return command

    def render_page(self) -> None:
        try:
            page, plot, _, _ = render(self.out, include_smoke=self.args.smoke)
        except Exception as error:  # the page must not cost the run its summary
            self.page = None
            print(f"the performance page could not be rendered: {type(error).__name__}: {error}", file=sys.stderr)
        else:
            self.page = str(page)
            print(f"rendered {page}" + (f" and {plot}" if plot else ""))

    def write_summary(self) -> None:
        payload = dict(family=SUMMARY, mode=self.mode, smoke=self.args.smoke, quick=self.args.quick,
                       environment=self.env, peaks=self.peaks,
                       elapsed_s=round(time.monotonic() - self.start, 1), budget_s=self.args.budget_s,
                       families=self.records, page=getattr(self, "page", None), rows=self.rows)
        self.summary_path.write_text(json.dumps(payload, indent=2) + "\n")

    def print_summary(self) -> None:
        elapsed = time.monotonic() - self.start
        print(f"\nwrote {self.summary_path}")
        for family, record in self.records.items():
            print(f"  {family:<15} {record['status']:<8} {record['elapsed_s']:7.1f} s"
                  + (f"  {record['error']}" if record.get("error") else ""))
        print(f"\nunimm bench ({self.mode}) on {self.env['device']} in {elapsed:.0f} s; {SUMMARY_LEGEND}\n")
        print(summary_table(self.rows))


def run_logged(command: list[str], log_path: pathlib.Path, timeout: float | None, bar, verbose: bool,
               family: str) -> tuple[int | str, str]:
    """Runs ``command`` with its output (stdout and stderr) into ``log_path``, its latest line on the
    progress bar; returns (exit code or "timeout", the last lines that say why it failed)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    lines: list[str] = []
    live = sys.stderr.isatty()  # in a log file the bar's redraws would be noise
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   start_new_session=True, bufsize=1)

        def pump():
            shown = 0.0
            for line in process.stdout:
                log.write(line)
                log.flush()
                text = line.rstrip()
                if not text:
                    continue
                lines.append(text)
                del lines[:-40]
                if verbose:
                    bar.write(f"[{family}] {text}")
                elif live and time.monotonic() - shown > 0.5:  # the latest line on the bar, twice a second
                    bar.set_postfix_str(text.strip()[:60])
                    shown = time.monotonic()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            rc = "timeout"
        reader.join(timeout=10)
    return rc, why_it_failed(lines)


def why_it_failed(lines: list[str]) -> str:
    """The line of a failed run that says why: a traceback's last line, else the last line."""
    for line in reversed(lines):
        if line and not line.startswith(" ") and ("Error" in line or "Exception" in line or "error" in line):
            return line[:500]
    return lines[-1][:500] if lines else ""


# ---------------------------------------------------------------------------------------------
# Summary rows
# ---------------------------------------------------------------------------------------------

def is_anchor(impl: str) -> bool:
    """What unimm is compared with: not unimm itself, in any variant or inside another framework."""
    return "unimm" not in impl


def headline_rows(family: str, payload: dict) -> list[dict]:
    """One row per case (and direction) of a family's results: unimm (automatic dispatch) against
    the fastest anchor that ran, unimm's share of the measured peak, and whether it agreed."""
    cases: dict[tuple, dict[str, dict]] = {}
    for result in payload["results"]:
        cases.setdefault(case_of(result), {})[result["impl"]] = result
    rows = []
    for case, impls in cases.items():
        unimm = impls.get("unimm")
        label = dict(case)
        family_label = family + (f"/{label.pop('part')}" if "part" in label else "")
        case_label = " ".join(str(value) for value in label.values())
        directions = timings(unimm) if unimm is not None else {}
        for direction, stats in (directions or {"": None}).items():
            row = dict(family=family_label, case=f"{case_label} {direction}".strip())
            rows.append(row)
            if stats is None:
                reason = "no unimm row" if unimm is None else unimm.get("reason", "no timing")
                row["note"] = f"unimm n/a: {reason}"
                continue
            row["unimm_ms"] = stats["median_ms"]
            anchors = {impl: timings(result).get(direction) for impl, result in impls.items() if is_anchor(impl)}
            ran = {impl: s["median_ms"] for impl, s in anchors.items() if s is not None and s["median_ms"] > 0}
            if ran:
                best = min(ran, key=ran.get)
                row.update(best_anchor=best, anchor_ms=ran[best], speedup=ran[best] / stats["median_ms"])
            else:
                why = [f"{impl}: {impls[impl].get('reason', 'no timing')}" for impl in anchors]
                row["note"] = f"no anchor ran ({'; '.join(why)})" if why else "no anchor: reported alone"
            for key, name in PEAK_KEYS:
                value = stats.get(key, unimm.get(key))
                if value is not None:
                    row.update(pct_peak=value, peak=name)
                    break
            agreement = next((unimm[key] for key in AGREEMENT_KEYS if key in unimm), None)
            row["agrees"] = agreement
    return rows


def failure_row(family: str, record: dict) -> dict:
    return dict(family=family, case="-", note=f"{record['status'].upper()}: {record.get('error', '')}")
