"""unimm.bench.vq runs end to end on the CPU (in the device check's `unimm bench --smoke`) and
writes what later runs compare."""


def test_bench_vq_smoke(bench_smoke):
    payload, stdout = bench_smoke("vq")
    assert {"family", "target", "environment", "peaks", "shapes", "results"} <= payload.keys()
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
    table = stdout.rstrip().splitlines()[-(len(payload["results"]) + 2):]
    assert all(line.startswith("|") and line.endswith("|") for line in table)
    assert "median ms" in table[0] and set(table[1]) <= set("|-")
