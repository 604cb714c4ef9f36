"""unimm.bench.generate runs end to end on the CPU (in the device check's `unimm bench --smoke`) and
writes what later runs compare."""

IMPLS = ("unimm", "unimm[triton]", "unimm[cuda]", "sdpa", "flashinfer")
SAMPLING_IMPLS = ("unimm", "unimm[triton]", "unimm[cuda]", "unimm[graph]", "torch", "flashinfer")


def test_bench_generate_smoke(bench_smoke):
    payload, stdout = bench_smoke("generate")
    assert {"family", "target", "target_met", "parts", "environment", "peaks", "shapes", "timing", "results"} \
        <= payload.keys()
    assert payload["dtype"] == "fp32" and payload["target_met"] is None  # CPU times are not judged
    assert set(payload["parts"]) == {"decode_attention", "sampling", "discrete", "continuous"}
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

    # sample_tokens against LlamaGen's torch sample() and flashinfer's sampler, eager and graphed
    sampling = payload["parts"]["sampling"]
    assert sampling["target_met"] is None and "40 us" in sampling["target"]
    sampled = [r for r in payload["results"] if r["part"] == "sampling"]
    expected = {(shape, impl) for shape in sampling["shapes"] for impl in SAMPLING_IMPLS}
    assert {(r["shape"], r["impl"]) for r in sampled} == expected and len(sampled) == len(expected)
    for r in sampled:
        if r["impl"] in ("unimm", "torch"):
            assert r["available"] and r["median_us"] > 0 and r["in_top_k"], r
        elif r["impl"] == "unimm[graph]":
            assert not r["available"] and "CUDA graphs need a CUDA device" in r["reason"]
        else:  # a forced GPU backend, or flashinfer: not installed, or no GPU
            assert not r["available"] and ("BackendUnavailable" in r["reason"] or "flashinfer" in r["reason"]), r
        if r["impl"] == "unimm":
            assert r["mismatches"] == 0 and r["within_tolerance"] and set(r["speedup"]) == {"torch"}

    # whole generation calls: unimm with and without CUDA graphs (on the CPU both eager), transformers;
    # an Emu3-style image and a LlamaGen-style class-conditional one
    discrete = {(r["shape"], r["impl"]): r for r in payload["results"] if r["part"] == "discrete"}
    shapes = payload["parts"]["discrete"]["shapes"]
    assert set(shapes) == {"tiny-2x3x3", "tiny-llamagen-3x4x4"}
    assert set(discrete) == {(shape, impl) for shape in shapes for impl in ("unimm", "unimm[eager]", "transformers")}
    assert all(r["available"] and r["images_per_s"] > 0 and r["ms_per_step"] > 0 and r["s_per_image"] > 0
               and r["tokens_per_s"] > 0 for r in discrete.values())
    for shape, codes_shape, span in [("tiny-2x3x3", [2, 3, 3], 19), ("tiny-llamagen-3x4x4", [3, 4, 4], 16)]:
        unimm = discrete[shape, "unimm"]
        assert unimm["same_codes_as_eager"] and unimm["codes_shape"] == codes_shape
        assert discrete[shape, "transformers"]["layout_ok"]  # its logits processor wrote the span's layout
        assert unimm["tokens_per_image"] == span and set(unimm["speedup"]) == {"transformers", "unimm[eager]"}
    assert shapes["tiny-llamagen-3x4x4"]["format"] == "llamagen" and shapes["tiny-2x3x3"]["format"] == "emu3"
    continuous = {r["impl"]: r for r in payload["results"] if r["part"] == "continuous"}
    assert set(continuous) == {"unimm", "unimm[eager]"}
    for r in continuous.values():
        assert r["s_per_image"] > 0 and r["tokens_per_s"] > 0 and r["features_shape"] == [6, 4] and r["finite"]
    assert "LlamaGen" in stdout and "0.6 s/image" in stdout

    # one markdown table per part, the last part's last: header, separator, one line per result
    table = stdout.rstrip().splitlines()[-(len(continuous) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert len({line.count("|") for line in table}) == 1
    assert "s/image" in table[0] and set(table[1]) <= set("|-")
    decode_table = stdout.split("\ndecode_attention: ")[1].split("\n\n")[1].splitlines()
    assert len(decode_table) == len(results) + 2
    assert "median ms" in decode_table[0] and "GB/s" in decode_table[0] and set(decode_table[1]) <= set("|-")
