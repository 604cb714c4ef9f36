"""unimm.bench.diffusion_head runs end to end on the CPU (in the device check's `unimm bench --smoke`) and
writes what later runs compare."""

IMPLS = ("unimm", "eager reference", "torch.compile")


def test_bench_diffusion_head_smoke(bench_smoke):
    payload, stdout = bench_smoke("diffusion_head")
    assert {"family", "target", "target_met", "target_parts", "environment", "peaks", "shapes", "rows",
            "num_steps", "cfg_scale", "timing", "results"} <= payload.keys()
    assert payload["dtype"] == "fp32"
    # CPU times are not judged against the H100 target
    assert payload["target_met"] is None and set(payload["target_parts"].values()) == {None}
    assert payload["rows"] == [4, 8] and payload["num_steps"] == 5 and payload["cfg_scale"] == 4.0
    assert payload["shapes"] == {"tiny": dict(token_dim=4, cond_dim=32, width=32, depth=2)}

    expected = {(shape, rows, impl) for shape in payload["shapes"] for rows in payload["rows"] for impl in IMPLS}
    results = payload["results"]
    assert {(r["shape"], r["rows"], r["impl"]) for r in results} == expected
    assert len(results) == len(expected)
    for r in results:
        assert r["tokens"] == r["rows"] // 2
        if r["impl"] == "torch.compile":  # not run on the CPU
            assert not r["available"] and "CPU smoke" in r["reason"]
            continue
        assert r["available"], r
        assert r["median_ms"] > 0 and r["ms_per_step"] > 0 and r["tflops"] > 0 and r["weight_gbps"] > 0
        assert "pct_bf16_peak" not in r and "extra_peak_bytes" not in r  # no peaks or memory on the CPU
        if r["impl"] == "unimm":
            # the same noise through the same head: the reference's sample to rounding
            assert r["within_tolerance"] and r["max_abs_diff_rel"] <= 1e-4, r
            assert set(r["speedup"]) == {"eager reference"}

    # the markdown table comes last: header, separator, one line per result
    table = stdout.rstrip().splitlines()[-(len(results) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert len({line.count("|") for line in table}) == 1  # no stray "|" inside a cell
    assert "median ms" in table[0] and "max abs diff" in table[0] and set(table[1]) <= set("|-")
