"""unimm.bench.cross_entropy runs end to end on the CPU (in the device check's `unimm bench --smoke`) and
writes what later runs compare."""

ANCHORS = ("cut-cross-entropy", "cut-cross-entropy (exact)", "liger", "quack", "torch.compile", "torch materialised")


def test_bench_cross_entropy_smoke(bench_smoke):
    payload, stdout = bench_smoke("cross_entropy")
    assert {"family", "target", "target_met", "target_parts", "environment", "peaks", "shapes",
            "results"} <= payload.keys()
    assert payload["dtype"] == "fp32"

    expected = {(shape, impl) for shape in payload["shapes"] for impl in ("unimm", "unimm[filter]") + ANCHORS}
    expected |= {(shape, "unimm[vocab_range]") for shape, spec in payload["shapes"].items() if spec["vocab_range"]}
    assert {(result["shape"], result["impl"]) for result in payload["results"]} == expected
    assert any(spec["softcap"] for spec in payload["shapes"].values())
    assert any(spec["vocab_range"] for spec in payload["shapes"].values())
    for result in payload["results"]:
        if not result["available"]:
            assert result["reason"]
            # GPU-only, or not installed here
            assert result["impl"] in ("cut-cross-entropy", "cut-cross-entropy (exact)", "liger", "quack")
            continue
        assert result["median_ms"] > 0 and result["tflops"] > 0
        assert "extra_peak_bytes" not in result  # no memory numbers on the CPU
        if result["impl"].startswith("unimm"):
            # the unimm rows match the fp32 materialised loss and gradients
            assert result["within_tolerance"], result
        if result["impl"] == "unimm":
            assert set(result["speedup"]) == {"torch.compile", "torch materialised"}
        if result["impl"] == "unimm[filter]":
            assert set(result["speedup"]) == {"unimm"}
        if result["impl"] == "unimm[vocab_range]":
            assert set(result["speedup"]) == {"unimm"}
            assert result["vocab_range"] == payload["shapes"][result["shape"]]["vocab_range"]
        if result["impl"] == "torch.compile":
            assert result["compile_s"] > 0

    # the markdown table comes last: header, separator, one line per result
    table = stdout.rstrip().splitlines()[-(len(payload["results"]) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert "median ms" in table[0] and set(table[1]) <= set("|-")
