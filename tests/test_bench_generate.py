"""benchmarks/bench_generate.py --smoke runs end to end on the CPU and writes what later runs compare."""

from conftest import run_bench_smoke

IMPLS = ("unimm", "unimm[triton]", "unimm[cuda]", "sdpa")


def test_bench_generate_smoke(tmp_path):
    payload, stdout = run_bench_smoke("bench_generate.py", "generate", tmp_path)
    assert {"family", "target", "target_met", "parts", "environment", "peaks", "shapes", "timing", "results"} \
        <= payload.keys()
    assert {"device", "torch", "triton", "cuda", "unimm", "git_sha", "date"} <= payload["environment"].keys()
    assert payload["family"] == "generate" and payload["smoke"] and payload["dtype"] == "fp32"
    assert payload["peaks"] is None and payload["target_met"] is None  # CPU times are not judged
    assert set(payload["parts"]) == {"decode_attention"}
    part = payload["parts"]["decode_attention"]
    assert part["target_met"] is None and "85%" in part["target"]
    assert set(payload["shapes"]) == {f"decode_attention/{shape}" for shape in part["shapes"]}

    results = payload["results"]
    expected = {(shape, case, impl) for shape in part["shapes"] for case in ("ragged", "full") for impl in IMPLS}
    assert {(r["shape"], r["case"], r["impl"]) for r in results} == expected and len(results) == len(expected)
    for r in results:
        assert r["part"] == "decode_attention" and r["kv_bytes"] > 0
        if r["impl"] in ("unimm[triton]", "unimm[cuda]"):  # no GPU, no interpreter in a bench run
            assert not r["available"] and "BackendUnavailable" in r["reason"]
            continue
        assert r["available"], r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["within_tolerance"], r
        assert "pct_copy_peak" not in r  # no peaks on the CPU
        if r["impl"] == "unimm":
            assert set(r["speedup"]) == {"sdpa"}

    # the markdown table comes last: header, separator, one line per result
    table = stdout.rstrip().splitlines()[-(len(results) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert len({line.count("|") for line in table}) == 1
    assert "median ms" in table[0] and "GB/s" in table[0] and set(table[1]) <= set("|-")
