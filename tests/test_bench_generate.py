"""unimm.bench.generate runs end to end on the CPU (in the device check's `unimm bench --smoke`) and
writes what later runs compare."""

IMPLS = ("unimm", "unimm[triton]", "unimm[cuda]", "sdpa", "flashinfer")


def test_bench_generate_smoke(bench_smoke):
    payload, stdout = bench_smoke("generate")
    assert {"family", "target", "target_met", "parts", "environment", "peaks", "shapes", "timing", "results"} \
        <= payload.keys()
    assert payload["dtype"] == "fp32" and payload["target_met"] is None  # CPU times are not judged
    assert set(payload["parts"]) == {"decode_attention", "discrete", "continuous"}
    assert all(part["target_met"] is None for part in payload["parts"].values())
    part = payload["parts"]["decode_attention"]
    assert part["target_met"] is None and "85%" in part["target"]
    assert set(payload["shapes"]) == {f"{name}/{shape}" for name, entry in payload["parts"].items()
                                      for shape in entry["shapes"]}

    results = [r for r in payload["results"] if r["part"] == "decode_attention"]
    expected = {(shape, case, impl) for shape in part["shapes"] for case in ("ragged", "full") for impl in IMPLS}
    assert {(r["shape"], r["case"], r["impl"]) for r in results} == expected and len(results) == len(expected)
    for r in results:
        assert r["part"] == "decode_attention" and r["kv_bytes"] > 0
        if r["impl"] in ("unimm[triton]", "unimm[cuda]"):  # no GPU, no interpreter in a bench run
            assert not r["available"] and "BackendUnavailable" in r["reason"]
            continue
        if r["impl"] == "flashinfer":  # not installed, or no GPU
            assert not r["available"] and "flashinfer" in r["reason"]
            continue
        assert r["available"], r
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["within_tolerance"], r
        assert "pct_copy_peak" not in r  # no peaks on the CPU
        if r["impl"] == "unimm":
            assert set(r["speedup"]) == {"sdpa"}

    # whole generation calls: unimm with and without CUDA graphs (on the CPU both eager), transformers
    discrete = {r["impl"]: r for r in payload["results"] if r["part"] == "discrete"}
    assert set(discrete) == {"unimm", "unimm[eager]", "transformers"}
    assert all(r["available"] and r["images_per_s"] > 0 and r["ms_per_step"] > 0 for r in discrete.values())
    assert discrete["unimm"]["same_codes_as_eager"] and discrete["unimm"]["codes_shape"] == [2, 3, 3]
    assert discrete["transformers"]["layout_ok"]  # its logits processor wrote Emu3's structure tokens
    assert set(discrete["unimm"]["speedup"]) == {"transformers", "unimm[eager]"}
    continuous = {r["impl"]: r for r in payload["results"] if r["part"] == "continuous"}
    assert set(continuous) == {"unimm", "unimm[eager]"}
    for r in continuous.values():
        assert r["s_per_image"] > 0 and r["features_shape"] == [6, 4] and r["finite"]
    assert "LlamaGen" in stdout and "0.6 s/image" in stdout

    # one markdown table per part, the last part's last: header, separator, one line per result
    table = stdout.rstrip().splitlines()[-(len(continuous) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert len({line.count("|") for line in table}) == 1
    assert "s/image" in table[0] and set(table[1]) <= set("|-")
    decode_table = stdout.split("\ndecode_attention: ")[1].split("\n\n")[1].splitlines()
    assert len(decode_table) == len(results) + 2
    assert "median ms" in decode_table[0] and "GB/s" in decode_table[0] and set(decode_table[1]) <= set("|-")
