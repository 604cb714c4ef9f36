"""unimm.bench.train_step runs end to end on the CPU (in the device check's `unimm bench --smoke`) and
writes what later runs compare."""

IMPLS = ("unimm", "transformers+unimm", "transformers", "transformers+liger")
LAYOUTS = ("bidirectional-images", "causal-images")


def test_bench_train_step_smoke(bench_smoke):
    payload, stdout = bench_smoke("train_step")
    assert {"family", "target", "target_met", "target_parts", "environment", "peaks", "shapes", "layouts",
            "results"} <= payload.keys()
    assert payload["dtype"] == "fp32" and payload["target_met"] is None  # never judged on the CPU
    assert {(r["layout"], r["impl"]) for r in payload["results"]} == {(layout, impl) for layout in LAYOUTS
                                                                      for impl in IMPLS}
    for spec in payload["shapes"].values():
        assert spec["image_fraction"] == 0.8 and spec["matmul_params"] > 0

    for result in payload["results"]:
        if not result["available"]:
            assert result["impl"] == "transformers+liger" and result["reason"]  # GPU-only, or not installed
            continue
        assert result["median_ms"] > 0 and result["tokens_per_s"] > 0 and result["tflops"] > 0
        assert "peak_bytes" not in result  # no memory numbers on the CPU
        if result["impl"] != "transformers":
            # the same weights and batch give transformers' first-step loss
            assert result["within_tolerance"], result
        if result["impl"] in ("unimm", "transformers+unimm"):
            assert set(result["speedup"]) == {"transformers"}

    # the markdown table comes last: header, separator, one line per result
    table = stdout.rstrip().splitlines()[-(len(payload["results"]) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert "tokens/s" in table[0] and set(table[1]) <= set("|-")
