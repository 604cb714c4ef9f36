"""`unimm bench` (unimm.bench.suite) and the device check (benchmarks/gpu_check.sh) on the CPU."""

import json
import subprocess
import sys
import textwrap

import pytest

from unimm.bench import FAMILIES, suite
from unimm.cli import main as cli
from unimm.testing import clean_env

STAGES = ("install", "info", "tests", "bench")


def test_device_check_smoke_runs_every_stage(device_check_smoke):
    out = device_check_smoke
    stages = json.loads((out / "stages.json").read_text())
    assert [s["stage"] for s in stages] == list(STAGES)
    assert all(s["rc"] == 0 for s in stages), stages
    for stage in STAGES:
        assert (out / f"{stage}.log").stat().st_size > 0
    check = (out / "check.log").read_text()
    assert all(f"== {stage}: exit code 0 in " in check for stage in STAGES) and "== done in " in check
    assert "installed 0.1.0" in (out / "install.log").read_text()  # the scratch install imported
    assert "backends for cpu tensors" in (out / "info.log").read_text()
    assert "skipped" in (out / "tests.log").read_text() or "deselected" in (out / "tests.log").read_text()
    assert (out / "gpu-tests.xml").exists() and (out / "bundle.tar.gz").stat().st_size > 0


def test_bench_smoke_writes_every_family_and_the_summary(device_check_smoke):
    bench = device_check_smoke / "bench"
    for family in FAMILIES:
        [path] = bench.glob(f"{family}-cpu-*.json")
        assert json.loads(path.read_text())["smoke"]
        [log] = (bench / "logs").glob(f"{family}-cpu-*.log")
        assert log.stat().st_size > 0
    [path] = bench.glob("summary-cpu-*.json")
    summary = json.loads(path.read_text())
    assert summary["mode"] == "smoke" and summary["family"] == "summary" and summary["peaks"] is None
    assert {f: r["status"] for f, r in summary["families"].items()} == {f: "ok" for f in FAMILIES}
    rows = summary["rows"]
    assert {row["family"].split("/")[0] for row in rows} == set(FAMILIES)
    for row in rows:
        assert row["unimm_ms"] > 0, row
        assert row["agrees"] is True, row  # unimm matched its reference in every smoke case
        if row["family"] != "generate/continuous":  # the only one with no anchor
            assert row["best_anchor"] and row["speedup"] > 0, row
    assert {row["family"] for row in rows if row["family"].startswith("generate/")} == {
        "generate/decode_attention", "generate/sampling", "generate/discrete", "generate/continuous"}
    assert any(row["case"].endswith("backward") for row in rows if row["family"] == "attention")

    # the summary table is printed last, one line per row
    log = (device_check_smoke / "bench.log").read_text().rstrip().splitlines()
    table = log[-(len(rows) + 2):]
    assert table[0].startswith("| family | case | unimm ms | best anchor | anchor ms | speedup | % of peak | agrees")
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    page = (bench / "PERFORMANCE.md").read_text()
    assert "## Summary of the latest `unimm bench --smoke`" in page
    assert all(f"## {family}" in page for family in FAMILIES)


FAKE_FAMILY = textwrap.dedent("""
    import json, sys, time
    family, json_path = sys.argv[1], sys.argv[2]
    if family == "attention":
        raise RuntimeError("boom in attention")
    if family == "generate":
        time.sleep(60)
    env = dict(device="cpu", date="2026-01-01T00:00:00+00:00", git_sha="0" * 12)
    results = [dict(shape="s", impl="unimm", available=True, median_ms=2.0, within_tolerance=True),
               dict(shape="s", impl="anchor-a", available=True, median_ms=3.0),
               dict(shape="s", impl="anchor-b", available=True, median_ms=5.0),
               dict(shape="s", impl="anchor-c", available=False, reason="not installed")]
    json.dump(dict(family=family, smoke=True, environment=env, results=results), open(json_path, "w"))
    print("done")
""")


def test_a_failing_family_never_stops_the_others(tmp_path, monkeypatch, capsys):
    """An exception in one family, another stopped at the time budget, a third never started:
    each says so in its row, and the family before them still has its numbers."""
    script = tmp_path / "fake_family.py"
    script.write_text(FAKE_FAMILY)
    monkeypatch.setattr(suite.Suite, "command",
                        lambda self, family, json_path, peaks: [sys.executable, str(script), family, str(json_path)])
    monkeypatch.setattr(suite, "FAMILIES", ("vq", "attention", "generate", "train_step"))
    out = tmp_path / "out"
    rc = cli(["bench", "--smoke", "--out", str(out), "--budget-s", "8",
              "--families", "vq,attention,generate,train_step"])
    printed = capsys.readouterr().out
    assert rc == 1
    [path] = out.glob("summary-cpu-*.json")
    summary = json.loads(path.read_text())
    status = {family: record["status"] for family, record in summary["families"].items()}
    assert status == {"vq": "ok", "attention": "failed", "generate": "stopped", "train_step": "not run"}
    assert "RuntimeError: boom in attention" in summary["families"]["attention"]["error"]
    vq, attention, generate, train = summary["rows"]
    assert (vq["best_anchor"], vq["anchor_ms"], vq["speedup"], vq["agrees"]) == ("anchor-a", 3.0, 1.5, True)
    assert attention["note"].startswith("FAILED: RuntimeError: boom in attention")
    assert generate["note"].startswith("STOPPED") and train["note"].startswith("NOT RUN")
    assert "| vq | s | 2 | anchor-a | 3 | 1.50x | - | yes |  |" in printed
    assert (out / "logs").is_dir() and (out / "PERFORMANCE.md").exists()


def test_bench_refuses_what_it_cannot_do(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["bench", "--smoke"])  # smoke numbers need a folder of their own
    assert "--smoke needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["bench", "--smoke", "--out", str(tmp_path), "--families", "vq,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err
    if not suite.torch.cuda.is_available():
        assert cli(["bench", "--quick", "--out", str(tmp_path)]) == 2
        assert "no CUDA device is visible" in capsys.readouterr().err


def test_a_family_runs_on_its_own_as_python_dash_m(tmp_path):
    """The command `unimm bench` gives each family is one a user can type."""
    run = subprocess.run([sys.executable, "-m", "unimm.bench.vq", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and "--quick" in run.stdout and "--peaks" in run.stdout and "--json" in run.stdout


def test_headline_rows_per_direction_and_part():
    attention = dict(results=[
        dict(layout="causal", shape="h", impl="unimm", available=True, within_tolerance=False,
             forward=dict(median_ms=1.0, pct_bf16_peak=50.0), backward=dict(median_ms=4.0, pct_bf16_peak=40.0)),
        dict(layout="causal", shape="h", impl="sdpa[flash]", available=True,
             forward=dict(median_ms=2.0), backward=dict(median_ms=2.0)),
        dict(layout="causal", shape="h", impl="transformers+unimm", available=True,
             forward=dict(median_ms=0.1), backward=dict(median_ms=0.1))])
    forward, backward = suite.headline_rows("attention", attention)
    assert forward == dict(family="attention", case="causal h forward", unimm_ms=1.0, best_anchor="sdpa[flash]",
                           anchor_ms=2.0, speedup=2.0, pct_peak=50.0, peak="matmul", agrees=False)
    assert backward["speedup"] == 0.5 and backward["pct_peak"] == 40.0
    decode = dict(results=[
        dict(part="decode_attention", shape="b16", case="ragged", impl="unimm", available=True, median_ms=1.0,
             pct_copy_peak=80.0, within_tolerance=True),
        dict(part="decode_attention", shape="b16", case="ragged", impl="flashinfer", available=False,
             reason="not installed"),
        dict(part="decode_attention", shape="b16", case="full", impl="unimm", available=False, reason="oom")])
    ragged, full = suite.headline_rows("generate", decode)
    assert ragged["family"] == "generate/decode_attention" and ragged["case"] == "b16 ragged"
    assert ragged["peak"] == "copy" and ragged["note"] == "no anchor ran (flashinfer: not installed)"
    assert full["note"] == "unimm n/a: oom" and "unimm_ms" not in full


def test_quick_picks_the_headline_anchors(tmp_path):
    """--quick's choices (layouts, parts, anchors left out), run on the tiny CPU shapes."""
    out = tmp_path / "quick"
    run = subprocess.run([sys.executable, "-m", "unimm", "bench", "--smoke", "--quick", "--out", str(out),
                          "--families", "cross_entropy,attention,generate,diffusion_head,train_step"],
                         env=clean_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    def payload(family):
        [path] = out.glob(f"{family}-cpu-*.json")
        return json.loads(path.read_text())

    def rows(family):
        return {(r.get("part"), r.get("layout"), r["impl"]): r for r in payload(family)["results"]}

    ce = payload("cross_entropy")
    assert ce["quick"] and ce["smoke"]
    assert all(r["reason"].startswith("left out of --quick") for r in ce["results"] if r["impl"] == "torch.compile")
    attention = rows("attention")
    assert {layout for _, layout, _ in attention} == {"causal", "packed-images"}
    assert attention[(None, "packed-images", "sdpa[dense mask]")]["reason"] == "left out of --quick runs"
    assert attention[(None, "causal", "flex_attention")]["reason"] == "left out of --quick runs"
    assert attention[(None, "causal", "sdpa[flash]")]["available"]
    assert {part for part, _, _ in rows("generate")} == {"decode_attention", "sampling", "discrete"}
    assert {r["layout"] for r in payload("train_step")["results"]} == {"bidirectional-images"}
    summary = json.loads(next(out.glob("summary-cpu-*.json")).read_text())
    assert summary["mode"] == "smoke quick" and all(r["status"] == "ok" for r in summary["families"].values())
