"""unimm.bench.render: synthetic result files -> docs page with one table per family, plot."""

import json
import pathlib

import pytest
from PIL import Image

from unimm.bench import render


def environment(date: str, device: str = "NVIDIA H100 80GB HBM3") -> dict:
    return dict(device=device, compute_capability="9.0", sm_count=132, machine="x86_64", torch="2.13.0",
                triton="3.9.0", cuda="13.0", unimm="0.1.0", git_sha="0123456789abcdef", date=date)


def vq_payload(date: str, unimm_ms: float) -> dict:
    """bench_vq-like: one timing per result, flat speedups, an n/a backend."""
    return dict(family="vq", target=">= 5x faster than einsum+argmin", target_met=True, smoke=False,
                environment=environment(date), peaks=dict(bf16_matmul_tflops=750.0, copy_gbps=3000.0), dtype="fp32",
                shapes={"emu3": dict(batch=4, tokens=8100, num_codes=32768, code_dim=4, metric="l2")},
                results=[
                    dict(shape="emu3", impl="einsum+argmin", available=True, median_ms=10.0, tflops=3.5),
                    dict(shape="emu3", impl="unimm", available=True, median_ms=unimm_ms, tflops=35.0,
                         pct_bf16_peak=4.7, speedup={"einsum+argmin": 10.0 / unimm_ms}),
                    dict(shape="emu3", impl="unimm[cuda]", available=False, reason="not built"),
                ])


def attention_payload() -> dict:
    """bench_attention-like: forward / backward timings nested per result, layouts, nested target parts."""
    def timed(fwd, bwd):
        return dict(available=True, forward=dict(median_ms=fwd, tflops=400.0),
                    backward=dict(median_ms=bwd, tflops=300.0, method="retained graph"))
    return dict(family="attention", target="fast", target_met=None, smoke=False,
                target_parts=dict(causal=dict(forward=True, backward=None)),
                environment=environment("2026-02-01T00:00:00+00:00"), peaks=None, dtype="bf16",
                shapes={"h16-d128": dict(batch=1, seq_len=16384)},
                layouts={"causal": dict(kind="causal", description="pure causal")},
                results=[
                    dict(layout="causal", shape="h16-d128", impl="unimm", **timed(2.0, 5.0)),
                    dict(layout="causal", shape="h16-d128", impl="sdpa[flash]", **timed(3.0, 4.0)),
                    dict(layout="causal", shape="h16-d128", impl="flex_attention", available=False, reason="no flex"),
                ])


def write(directory: pathlib.Path, name: str, payload) -> None:
    (directory / name).write_text(payload if isinstance(payload, str) else json.dumps(payload))


def test_newest_file_per_family_rendered_with_tables_and_plot(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    write(results, "vq-old.json", vq_payload("2026-01-01T00:00:00+00:00", unimm_ms=5.0))
    write(results, "vq-new.json", vq_payload("2026-03-01T00:00:00+00:00", unimm_ms=2.0))
    write(results, "attention.json", attention_payload())
    write(results, "vq-smoke.json", dict(vq_payload("2026-04-01T00:00:00+00:00", 1.0), smoke=True))
    write(results, "broken.json", "{not json")
    out, plot = tmp_path / "docs" / "PERFORMANCE.md", tmp_path / "docs" / "performance.png"

    assert render.main(["--results", str(results), "--out", str(out), "--plot", str(plot)]) == 0
    page = out.read_text()
    assert "## attention" in page and "## vq" in page
    assert "vq-new.json" in page and "vq-old.json" not in page  # newest non-smoke file only
    assert "vq-smoke.json: a smoke run" in page and "broken.json: not readable JSON" in page
    assert "![unimm's speedup over each anchor](performance.png)" in page

    def table(header_start):
        lines = page.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
        rows = []
        for line in lines[start:]:
            if not line.startswith("|"):
                break
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        return [dict(zip(rows[0], row)) for row in rows[2:]]

    [vq] = table("| shape | unimm ms")
    assert vq["unimm ms"] == "2.000" and vq["einsum+argmin ms"] == "10.000" and vq["unimm[cuda] ms"] == "n/a"
    assert vq["unimm vs einsum+argmin"] == "5.00x"
    assert vq["unimm TFLOP/s"] == "35" and vq["unimm % matmul peak"] == "4.7"
    forward, backward = table("| layout | shape | direction")
    assert (forward["direction"], forward["unimm ms"], forward["unimm vs sdpa[flash]"]) == ("forward", "2.000", "1.50x")
    assert (backward["direction"], backward["unimm vs sdpa[flash]"]) == ("backward", "0.80x")
    assert forward["flex_attention ms"] == "n/a" and "flex_attention at causal h16-d128: no flex" in page
    assert "**met**" in page and "**not judged** (causal forward: met; causal backward: not judged)" in page
    assert "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)" in page and "bf16 matmul 750 TFLOP/s" in page

    with Image.open(plot) as image:
        assert image.size[0] > 400 and image.size[1] > 100


def test_no_results_says_so_and_how_to_measure(tmp_path):
    out, plot = tmp_path / "PERFORMANCE.md", tmp_path / "performance.png"
    render.main(["--results", str(tmp_path / "empty"), "--out", str(out), "--plot", str(plot)])
    page = out.read_text()
    assert "No kernel has been measured on a GPU yet" in page
    assert "unimm bench --quick" in page
    assert not plot.exists()


@pytest.mark.parametrize("payload", [[1, 2], {"family": "vq"}])
def test_files_that_are_not_results_are_noted(tmp_path, payload):
    write(tmp_path, "odd.json", payload)
    latest, notes = render.load_latest(tmp_path)
    assert latest == {} and notes == ["odd.json: not a benchmark result (no family / environment / results)"]


def test_committed_page_is_current():
    """docs/PERFORMANCE.md is what the script renders from the committed results."""
    root = pathlib.Path(render.ROOT)
    latest, notes = render.load_latest(root / "benchmarks" / "results")
    plot = root / "docs" / "performance.png"
    expected = render.render_page(latest, notes, plot if latest else None, root / "docs" / "PERFORMANCE.md",
                                  root / "benchmarks" / "results")
    assert (root / "docs" / "PERFORMANCE.md").read_text() == expected, \
        "docs/PERFORMANCE.md is stale: run python -m unimm.bench.render"


def test_summary_of_a_run_leads_the_page(tmp_path):
    """unimm bench's summary file is shown first, as its table, and is not a family of its own."""
    write(tmp_path, "vq.json", vq_payload("2026-03-01T00:00:00+00:00", unimm_ms=2.0))
    rows = [dict(family="vq", case="emu3", unimm_ms=2.0, best_anchor="einsum+argmin", anchor_ms=10.0, speedup=5.0,
                 pct_peak=4.7, peak="matmul", agrees=True),
            dict(family="attention", case="-", note="FAILED: RuntimeError: boom | x")]
    write(tmp_path, "summary.json", dict(family="summary", mode="quick", smoke=False,
                                         environment=environment("2026-03-01T00:00:00+00:00"), rows=rows))
    out = tmp_path / "PERFORMANCE.md"
    render.main(["--results", str(tmp_path), "--out", str(out)])
    page = out.read_text()
    assert "## Summary of the latest `unimm bench --quick`" in page and "## summary" not in page
    assert page.index("## Summary") < page.index("## vq")
    assert "| vq | emu3 | 2 | einsum+argmin | 10 | 5.00x | 4.7% matmul | yes |  |" in page
    assert "| attention | - | - | - | - | - | - | - | FAILED: RuntimeError: boom / x |" in page
    assert "not a benchmark result" not in page
