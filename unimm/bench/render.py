"""Renders the newest ``benchmarks/results/*.json`` of every kernel family into ``docs/PERFORMANCE.md``
(one table per family) and a bar plot of unimm's speedups over the anchors (``docs/performance.png``).
``unimm bench`` calls it after every run; outside a checkout (no benchmarks/ or docs/) it renders
``PERFORMANCE.md`` and ``performance.png`` into the results folder.

Every family writes the same outline (``_harness.report``): ``family``,
``environment``, ``peaks``, ``dtype``, ``target`` / ``target_met`` (/ ``target_parts``),
``shapes`` and ``results``, one entry per case and implementation (``impl``) with
``available`` and either ``median_ms`` or, for forward / backward timings, ``forward`` and
``backward`` dicts holding it. A case is what ``layout``, ``shape`` and ``rows`` name. The
table gives, per case (and direction), each implementation's median time, unimm's speedup over
each anchor (the anchor's median / unimm's; the implementations not named ``unimm...``), and
unimm's throughput fields (TFLOP/s, GB/s, tokens/s, % of the measured peaks). Smoke runs
(``smoke: true``, CPU times of tiny shapes) are skipped unless asked for (``unimm bench --smoke``
renders them into its own folder, to check the page).

    python -m unimm.bench.render [--results benchmarks/results] [--out docs/PERFORMANCE.md]
        [--plot docs/performance.png]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

from PIL import Image, ImageDraw, ImageFont

from unimm.bench._harness import IN_CHECKOUT, PACKAGE_ROOT, RESULTS_DIR, markdown_table, verdict

ROOT = PACKAGE_ROOT
CASE_KEYS = ("part", "layout", "shape", "case", "rows")  # what names a case, in column order
DIRECTIONS = ("forward", "backward")
UNIMM = "unimm"
# unimm's throughput fields and their column names, in column order
THROUGHPUT = {"tflops": "TFLOP/s", "pct_bf16_peak": "% matmul peak", "mfu_pct": "MFU %", "gbps": "GB/s",
              "weight_gbps": "weights GB/s", "pct_copy_peak": "% copy peak", "tokens_per_s": "tokens/s"}


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def load_latest(results_dir: pathlib.Path, include_smoke: bool = False
                ) -> tuple[dict[str, tuple[pathlib.Path, dict]], list[str]]:
    """family -> (path, payload) of its newest non-smoke (or, with ``include_smoke``, any) result
    file (by the run's UTC date, then file name), and a note for every file that was skipped."""
    latest, notes = {}, []
    for path in sorted(pathlib.Path(results_dir).glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            notes.append(f"{path.name}: not readable JSON ({error})")
            continue
        if isinstance(payload, dict) and payload.get("family") == SUMMARY and "rows" in payload:
            payload.setdefault("results", [])
        if not isinstance(payload, dict) or not {"family", "environment", "results"} <= payload.keys():
            notes.append(f"{path.name}: not a benchmark result (no family / environment / results)")
            continue
        if payload.get("smoke") and not include_smoke:
            notes.append(f"{path.name}: a smoke run, skipped")
            continue
        key = (payload["environment"].get("date") or "", path.name)
        family = payload["family"]
        if family not in latest or key > latest[family][0]:
            latest[family] = (key, path, payload)
    return {family: (path, payload) for family, (_, path, payload) in sorted(latest.items())}, notes


def case_of(result: dict) -> tuple:
    return tuple((key, result[key]) for key in CASE_KEYS if key in result)


def timings(result: dict) -> dict[str, dict]:
    """direction -> the dict holding ``median_ms`` ("" when the result has one timing)."""
    if not result.get("available"):
        return {}
    if "median_ms" in result:
        return {"": result}
    return {d: result[d] for d in DIRECTIONS if isinstance(result.get(d), dict) and "median_ms" in result[d]}


def is_anchor(impl: str) -> bool:
    return not impl.startswith(UNIMM)


def case_rows(payload: dict) -> list[tuple[tuple, str, dict[str, dict]]]:
    """(case, direction, impl -> timing dict) in the order the results list them; n/a impls absent."""
    order, table = [], {}
    for result in payload["results"]:
        case = case_of(result)
        if case not in table:
            order.append(case)
            table[case] = {}
        for direction, stats in timings(result).items():
            table[case].setdefault(direction, {})[result["impl"]] = stats
    return [(case, direction, rows) for case in order for direction, rows in table[case].items()]


def speedups(payload: dict) -> list[tuple[str, str, float]]:
    """(case label, anchor, unimm's speedup over it) for every case, direction and available anchor."""
    out = []
    for case, direction, rows in case_rows(payload):
        unimm = rows.get(UNIMM)
        if unimm is None:
            continue
        for impl, stats in rows.items():
            if is_anchor(impl) and stats["median_ms"] > 0 and unimm["median_ms"] > 0:
                label = " ".join(str(value) for _, value in case) + (f" {direction}" if direction else "")
                out.append((label, impl, stats["median_ms"] / unimm["median_ms"]))
    return out


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _parts(parts, prefix: str = "") -> list[str]:
    """``target_parts`` (possibly nested dicts of True / False / None) as "name: verdict" strings."""
    out = []
    for name, value in (parts or {}).items():
        if isinstance(value, dict):
            out += _parts(value, f"{prefix}{name} ")
        else:
            out.append(f"{prefix}{name}: {verdict(value)}")
    return out


def family_table(payload: dict) -> str:
    """The family's markdown table: one line per case (and direction)."""
    results = payload["results"]
    impls = list(dict.fromkeys(r["impl"] for r in results))
    impls = [i for i in impls if not is_anchor(i)] + [i for i in impls if is_anchor(i)]
    anchors = [i for i in impls if is_anchor(i)]
    case_columns = [key for key in CASE_KEYS if any(key in r for r in results)]
    has_direction = any("median_ms" not in r and r.get("available") for r in results)
    unavailable = {(case_of(r), r["impl"]) for r in results if not r.get("available")}
    unimm_fields = [key for key in THROUGHPUT
                    if any(key in stats for r in results if r["impl"] == UNIMM for stats in timings(r).values())]

    columns = case_columns + (["direction"] if has_direction else []) + [f"{i} ms" for i in impls]
    columns += [f"unimm vs {a}" for a in anchors] + [f"unimm {THROUGHPUT[key]}" for key in unimm_fields]
    lines = []
    for case, direction, rows in case_rows(payload):
        line = {key: str(value) for key, value in case}
        if has_direction:
            line["direction"] = direction or "-"
        for impl in impls:
            stats = rows.get(impl)
            line[f"{impl} ms"] = ("n/a" if (case, impl) in unavailable else "-") if stats is None \
                else _fmt(stats["median_ms"], ".3f")
        unimm = rows.get(UNIMM)
        for anchor in anchors:
            ok = unimm is not None and anchor in rows and unimm["median_ms"] > 0
            line[f"unimm vs {anchor}"] = f"{rows[anchor]['median_ms'] / unimm['median_ms']:.2f}x" if ok else "-"
        for key in unimm_fields:
            value = None if unimm is None else unimm.get(key)
            line[f"unimm {THROUGHPUT[key]}"] = _fmt(value, ".3g")
        lines.append(line)
    return markdown_table(lines, columns)


def family_section(family: str, path: pathlib.Path, payload: dict, root: pathlib.Path) -> str:
    env, peaks = payload["environment"], payload.get("peaks") or {}
    device = env.get("device", "?")
    if env.get("compute_capability"):
        device += f" (sm_{env['compute_capability'].replace('.', '')}, {env.get('sm_count')} SMs)"
    versions = ", ".join(f"{name} {env[name]}" for name in ("torch", "triton", "cuda", "unimm") if env.get(name))
    lines = [f"## {family}", "",
             f"- run: {env.get('date', '?')} on {device}, {versions}, commit `{str(env.get('git_sha', '?'))[:12]}`",
             f"- file: `{_relative(path, root)}`"]
    if payload.get("dtype"):
        lines.append(f"- dtype: {payload['dtype']}")
    if peaks:
        lines.append(f"- measured peaks: bf16 matmul {_fmt(peaks.get('bf16_matmul_tflops'), '.0f')} TFLOP/s, "
                     f"copy {_fmt(peaks.get('copy_gbps'), '.0f')} GB/s")
    if payload.get("target"):
        parts = _parts(payload.get("target_parts"))
        lines.append(f"- target: {payload['target']} -- **{verdict(payload.get('target_met'))}**"
                     + (f" ({'; '.join(parts)})" if parts else ""))
    shapes = payload.get("shapes") or {}
    if shapes:
        lines.append("- shapes: " + "; ".join(
            f"`{name}` " + ", ".join(f"{key}={value}" for key, value in spec.items()) if isinstance(spec, dict)
            else f"`{name}` {spec}" for name, spec in shapes.items()))
    layouts = payload.get("layouts") or {}
    if layouts:
        lines.append("- layouts: " + "; ".join(
            f"`{name}` {spec.get('description', '') if isinstance(spec, dict) else spec}".rstrip()
            for name, spec in layouts.items()))
    lines += ["", family_table(payload)]
    missing = [f"{r['impl']} at {' '.join(str(v) for _, v in case_of(r))}: {r.get('reason', '?')}"
               for r in payload["results"] if not r.get("available")]
    if missing:
        lines += ["", "n/a:"] + [f"- {line}" for line in missing]
    return "\n".join(lines)


def _relative(path: pathlib.Path, start: pathlib.Path) -> str:
    return pathlib.Path(os.path.relpath(pathlib.Path(path).resolve(), pathlib.Path(start).resolve())).as_posix()


SUMMARY = "summary"  # the family name of `unimm bench`'s summary file
SUMMARY_COLUMNS = ("family", "case", "unimm ms", "best anchor", "anchor ms", "speedup", "% of peak", "agrees",
                   "note")
SUMMARY_LEGEND = ("speedup = the fastest anchor's median time / unimm's (above 1: unimm is faster); % of peak = of "
                  "the run's measured bf16 matmul rate (matmul, MFU) or copy bandwidth (copy); agrees = unimm's "
                  "result within tolerance of the reference")


def summary_cells(row: dict) -> dict:
    """One row of ``unimm bench``'s summary (suite.headline_rows) as its table prints it."""
    def number(key, spec, suffix=""):
        return "-" if row.get(key) is None else f"{row[key]:{spec}}{suffix}"

    agrees = row.get("agrees")
    return {
        "family": row["family"],
        "case": row["case"],
        "unimm ms": number("unimm_ms", ".4g"),
        "best anchor": row.get("best_anchor", "-"),
        "anchor ms": number("anchor_ms", ".4g"),
        "speedup": number("speedup", ".2f", "x"),
        "% of peak": "-" if row.get("pct_peak") is None else f"{row['pct_peak']:.1f}% {row['peak']}",
        "agrees": "-" if agrees is None else "yes" if agrees else "NO",
        "note": row.get("note", "").replace("|", "/").replace("\n", " "),
    }


def summary_table(rows: list[dict]) -> str:
    return markdown_table([summary_cells(row) for row in rows], list(SUMMARY_COLUMNS))


def summary_section(path: pathlib.Path, payload: dict) -> str:
    env = payload["environment"]
    options = "".join(" --" + mode for mode in payload.get("mode", "").split() if mode != "full")
    return "\n".join([
        f"## Summary of the latest `unimm bench{options}`",
        "", f"- run: {env.get('date', '?')} on {env.get('device', '?')}, commit `{str(env.get('git_sha', '?'))[:12]}`, "
            f"{payload.get('elapsed_s', '?')} s; file `{path.name}`",
        f"- {SUMMARY_LEGEND}", "", summary_table(payload["rows"])])


def render_page(latest: dict, notes: list[str], plot: pathlib.Path | None, out: pathlib.Path,
                results_dir: pathlib.Path) -> str:
    """The whole PERFORMANCE.md."""
    where = _relative(results_dir, ROOT) if pathlib.Path(results_dir).resolve().is_relative_to(ROOT) \
        else str(results_dir)
    head = ["# Performance", "",
            "Generated by `unimm bench` (or `python -m unimm.bench.render`) from the newest "
            f"`{where}/*.json` of each benchmark family; do not edit by hand.", ""]
    latest = dict(latest)
    summary = latest.pop(SUMMARY, None)
    how = ["To measure, on a machine with a CUDA GPU:", "", "```",
           "unimm bench --quick    # one headline shape per family against its strongest anchors, minutes",
           "unimm bench            # every family at its headline shapes", "```", "",
           "Each family writes `benchmarks/results/<family>-<device>-<date>.json`, the run a "
           "`summary-<device>-<date>.json`, and this page is rendered again (see "
           "[benchmarks/README.md](../benchmarks/README.md) for what each family times and against which anchors)."]
    if not latest:
        return "\n".join(head + [f"No kernel has been measured on a GPU yet: `{where}/` holds no results.", ""]
                         + how + [""])
    body = ["unimm vs X = X's median time / unimm's median time on the same inputs (above 1x: unimm is "
            "faster); n/a: the implementation could not run that case (reason below the table).", ""]
    if summary is not None:
        body += [summary_section(*summary), ""]
    if plot is not None:
        body += [f"![unimm's speedup over each anchor]({_relative(plot, out.parent)})", ""]
    for family, (path, payload) in latest.items():
        body += [family_section(family, path, payload, out.parent), ""]
    if notes:
        body += ["Files not shown:", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(head + body + how + [""])


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------

def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):
        return ImageFont.load_default()


def plot_speedups(latest: dict, path: pathlib.Path) -> pathlib.Path | None:
    """Horizontal bars of unimm's speedup over every anchor, a panel per family, on a log2 axis
    with the 1x line marked; green where unimm is faster. None (no file) when there is nothing
    to plot."""
    panels = [(family, speedups(payload)) for family, (_, payload) in latest.items()]
    panels = [(family, bars) for family, bars in panels if bars]
    if not panels:
        return None
    font, title_font = _font(12), _font(14)
    bar_h, gap, label_w, plot_w, right = 16, 4, 360, 480, 60
    values = [value for _, bars in panels for _, _, value in bars]
    low = math.floor(math.log2(min(min(values), 1.0)))
    high = math.ceil(math.log2(max(max(values), 1.0)))
    if high == low:
        high = low + 1
    height = sum(30 + len(bars) * (bar_h + gap) for _, bars in panels) + 40
    canvas = Image.new("RGB", (label_w + plot_w + right, height), "white")
    draw = ImageDraw.Draw(canvas)

    def x_of(value):
        return label_w + (math.log2(value) - low) / (high - low) * plot_w

    every = max(1, math.ceil((high - low) / 8))  # at most ~9 labelled powers of two
    powers = [p for p in range(low, high + 1) if p % every == 0 or p == 0]
    y = 10
    for family, bars in panels:
        draw.text((10, y), family, fill="black", font=title_font)
        y += 24
        bottom = y + len(bars) * (bar_h + gap)
        for power in powers:
            x = x_of(2.0**power)
            draw.line([x, y - 2, x, bottom], fill="#dddddd")
        for label, anchor, value in bars:
            x0, x1 = x_of(1.0), x_of(value)
            draw.rectangle([min(x0, x1), y, max(x0, x1), y + bar_h], fill="#2ca02c" if value >= 1 else "#d62728")
            draw.text((label_w - 8, y + bar_h / 2), f"{label} vs {anchor}", fill="black", font=font, anchor="rm")
            draw.text((max(x0, x1) + 4, y + bar_h / 2), f"{value:.3g}x", fill="black", font=font, anchor="lm")
            y += bar_h + gap
        draw.line([x_of(1.0), bottom - len(bars) * (bar_h + gap) - 2, x_of(1.0), bottom], fill="black", width=2)
        y += 6
    for power in powers:
        draw.text((x_of(2.0**power), y), f"{2.0**power:.2g}x", fill="black", font=font, anchor="ma")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def default_page(results_dir: pathlib.Path) -> pathlib.Path:
    """Where the page of ``results_dir`` goes (its plot beside it): docs/PERFORMANCE.md for a
    checkout's benchmarks/results, else PERFORMANCE.md beside the results."""
    if IN_CHECKOUT and pathlib.Path(results_dir).resolve() == RESULTS_DIR.resolve():
        return ROOT / "docs" / "PERFORMANCE.md"
    return pathlib.Path(results_dir) / "PERFORMANCE.md"


def render(results_dir: pathlib.Path, out: pathlib.Path | None = None, plot: pathlib.Path | None = None, *,
           include_smoke: bool = False) -> tuple[pathlib.Path, pathlib.Path | None, dict, list[str]]:
    """Renders the page (and plot) of ``results_dir``; returns (page, plot or None, the newest
    payload of each family, notes on skipped files)."""
    out = out or default_page(results_dir)
    plot = plot or out.parent / "performance.png"
    latest, notes = load_latest(results_dir, include_smoke)
    plot = plot_speedups(latest, plot)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(latest, notes, plot, out, results_dir))
    return out, plot, latest, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m unimm.bench.render", description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=RESULTS_DIR,
                        help=f"directory of result JSON files (default {RESULTS_DIR})")
    parser.add_argument("--out", type=pathlib.Path,
                        help="markdown page to write (default docs/PERFORMANCE.md for a checkout's "
                             "benchmarks/results, else RESULTS/PERFORMANCE.md)")
    parser.add_argument("--plot", type=pathlib.Path, help="speedup plot to write (default beside the page)")
    parser.add_argument("--include-smoke", action="store_true", help="render smoke runs too (checks the page)")
    args = parser.parse_args(argv)
    out, plot, latest, notes = render(args.results, args.out, args.plot, include_smoke=args.include_smoke)
    print(f"wrote {out}" + (f" and {plot}" if plot else "")
          + f" from {len(latest)} famil{'y' if len(latest) == 1 else 'ies'}: {', '.join(latest) or 'none measured'}")
    for note in notes:
        print(f"skipped {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
