"""unimm.bench.attention runs end to end on the CPU (in the device check's `unimm bench --smoke`) and
writes what later runs compare."""

LAYOUTS = ("causal", "prefix-lm", "packed-images", "packed-causal", "sinks-window")


def expected_impls(layout):
    sdpa = ("sdpa[flash]", "sdpa[cudnn]") if layout == "causal" else ("sdpa[dense mask]",)
    return ("unimm",) + sdpa + ("flex_attention", "flash-attn-4")


def test_bench_attention_smoke(bench_smoke):
    payload, stdout = bench_smoke("attention")
    assert {"family", "target", "target_met", "target_parts", "environment", "peaks", "shapes", "layouts",
            "timing", "results"} <= payload.keys()
    assert payload["dtype"] == "fp32"
    # CPU times are not judged against the H100 target
    assert payload["target_met"] is None and set(payload["target_parts"].values()) == {None}
    assert tuple(payload["layouts"]) == LAYOUTS
    assert [name for name, spec in payload["layouts"].items() if not spec["mixed"]] == ["causal"]

    expected = {(layout, shape, impl) for layout in LAYOUTS for shape in payload["shapes"]
                for impl in expected_impls(layout)}
    results = payload["results"]
    assert {(r["layout"], r["shape"], r["impl"]) for r in results} == expected
    assert len(results) == len(expected)
    for r in results:
        assert r["visible_pairs"] > 0
        if not r["available"]:
            assert r["reason"]
            assert r["impl"] in ("sdpa[cudnn]", "flex_attention", "flash-attn-4")  # CUDA only, or not installed
            continue
        assert "extra_peak_bytes" not in r  # no memory numbers on the CPU
        assert r["forward"]["median_ms"] > 0 and r["forward"]["tflops"] > 0
        assert "pct_bf16_peak" not in r["forward"]
        if r["impl"] == "flex_attention":  # eager on the CPU, which has no FlexAttention backward
            assert r["backward"] is None and r["backward_reason"]
            assert r["mask_build_ms"] > 0
        else:
            assert r["backward"]["median_ms"] > 0 and r["backward"]["tflops"] > 0
            assert r["backward"]["method"] == "retained graph"
            assert r["within_tolerance"], r  # out, dq, dk, dv against the fp32 reference
        if r["impl"] == "unimm":
            assert r["mask_build_ms"] > 0
            others = {impl for impl in expected_impls(r["layout"]) if impl != "unimm"}
            available = {o["impl"] for o in results if o["available"] and o["layout"] == r["layout"]
                         and o["shape"] == r["shape"] and o["impl"] in others}
            assert set(r["speedup"]["forward"]) == available
        if r["layout"].startswith("packed"):
            # the smoke layouts end in padding: those rows see nothing and give exactly 0
            assert r["empty_rows"] > 0 and r["empty_rows_max_abs"] == 0

    # the markdown table comes last: header, separator, one line per result
    table = stdout.rstrip().splitlines()[-(len(results) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert "fwd ms" in table[0] and "bwd ms" in table[0] and set(table[1]) <= set("|-")
