"""benchmarks/bench_vq.py --smoke runs end to end on the CPU and writes what later runs compare."""

import json
import os
import pathlib
import subprocess
import sys

BENCH_VQ = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_vq.py"


def test_bench_vq_smoke(tmp_path):
    # No Triton interpreter (slow) and no forced backend: the script sets UNIMM_BACKEND itself.
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "UNIMM_BACKEND")}
    run = subprocess.run([sys.executable, str(BENCH_VQ), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr

    [path] = tmp_path.glob("vq-*.json")
    payload = json.loads(path.read_text())
    assert {"family", "target", "environment", "peaks", "shapes", "results"} <= payload.keys()
    assert {"device", "torch", "triton", "cuda", "unimm", "git_sha", "date"} <= payload["environment"].keys()
    assert payload["family"] == "vq" and payload["smoke"]
    impls = {(result["shape"], result["impl"]) for result in payload["results"]}
    assert impls == {(shape, impl) for shape in payload["shapes"]
                     for impl in ("einsum+argmin", "cdist+argmin", "unimm", "unimm[triton]", "unimm[cuda]")}
    for result in payload["results"]:
        if result["impl"] == "unimm":
            assert result["median_ms"] > 0
            assert set(result["speedup"]) == {"einsum+argmin", "cdist+argmin"}
            assert result["within_tolerance"], result
        if not result["available"]:
            assert result["reason"]

    # the markdown table comes last: header, separator, one line per result
    table = run.stdout.rstrip().splitlines()[-(len(payload["results"]) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert "median ms" in table[0] and set(table[1]) <= set("|-")
