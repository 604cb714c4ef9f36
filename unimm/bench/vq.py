"""VQ nearest-code search: unimm.kernels.vq_quantize against the code tokenizers ship with.

Anchors, run in this process on the same inputs:
  * einsum+argmin: taming-transformers' VectorQuantizer, kept by LlamaGen; forms the whole
    N x K distance matrix ``|z|^2 + |e|^2 - 2 z.e`` and takes its argmin (LlamaGen normalises
    both sides first for its cosine codebook).
  * cdist+argmin: ``torch.cdist(z, e).argmin(1)``.
unimm runs with auto dispatch and with each backend forced through UNIMM_BACKEND; a backend
that cannot serve a shape (the CUDA kernel takes code_dim <= 32 only) shows as n/a.

Target (issue): >= 5x faster than einsum+argmin at every shape on H100.

    python -m unimm.bench.vq [--dtype fp32] [--shapes llamagen,emu3] [--quick] [--out DIR]
    python -m unimm.bench.vq --smoke --out DIR   # tiny shapes on the CPU: checks the family
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from unimm.bench._harness import forced_backend, parse_run, show, verdict
from unimm.kernels import BackendUnavailable, vq_quantize
from unimm.kernels.reference.vq import pair_distances
from unimm.testing import BENCH_TOLERANCE

TARGET = ">= 5x faster than einsum+argmin at every shape on H100"
TARGET_SPEEDUP = 5.0
COUNTS = dict(repeat=50)

# name: (batch, tokens per image, num_codes K, code_dim d, metric)
SHAPES = {
    "llamagen": (32, 576, 16384, 8, "cosine"),
    "emu3": (4, 8100, 32768, 4, "l2"),
    "chameleon": (16, 1024, 8192, 256, "l2"),
    "ibq": (16, 256, 262144, 256, "l2"),
}
QUICK_SHAPES = ("llamagen",)  # --quick: LlamaGen's tokenizer, the most used of these
# --smoke: small enough for a CPU; d=4 is in the CUDA kernel's range, d=40 is not
SMOKE_SHAPES = {
    "tiny-d4": (1, 64, 100, 4, "cosine"),
    "tiny-d40": (1, 64, 100, 40, "l2"),
}


def einsum_argmin(z, codebook, metric):
    if metric == "cosine":
        z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    d = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * torch.einsum("bd,dn->bn", z, codebook.t())
    return d.argmin(1)


def cdist_argmin(z, codebook, metric):
    if metric == "cosine":
        z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    return torch.cdist(z, codebook).argmin(1)


def unimm_quantize(z, codebook, metric):
    return vq_quantize(z, codebook, metric=metric)


ANCHORS = ("einsum+argmin", "cdist+argmin")
# (name, function, UNIMM_BACKEND while it runs; None = auto dispatch)
IMPLEMENTATIONS = [
    ("einsum+argmin", einsum_argmin, None),
    ("cdist+argmin", cdist_argmin, None),
    ("unimm", unimm_quantize, None),
    ("unimm[triton]", unimm_quantize, "triton"),
    ("unimm[cuda]", unimm_quantize, "cuda"),
]


def compare(indices, expected, z, codebook, metric):
    """(fraction of rows where ``indices`` equals ``expected``, largest gap between the fp64
    distances of the two picks over the disagreeing rows). The gap is relative to |z|^2 + |e|^2
    (4 for cosine): the terms the expanded form ``|z|^2 + |e|^2 - 2 z.e`` cancels set its rounding."""
    differ = (indices != expected).nonzero().squeeze(1)
    match = 1.0 - differ.numel() / indices.numel()
    if differ.numel() == 0:
        return match, 0.0
    rows, picked, best = z[differ].double(), codebook[indices[differ]].double(), codebook[expected[differ]].double()
    gap = (pair_distances(rows, picked, metric) - pair_distances(rows, best, metric)).abs()
    scale = 4.0 if metric == "cosine" else rows.square().sum(-1) + best.square().sum(-1)
    return match, (gap / scale).max().item()


def bench_shape(name, spec, run):
    """One result dict per implementation, all on the same random inputs."""
    batch, tokens, num_codes, code_dim, metric = spec
    n = batch * tokens
    z = torch.randn(n, code_dim, device=run.device, dtype=run.dtype)
    codebook = torch.randn(num_codes, code_dim, device=run.device, dtype=run.dtype)
    rotate = run.rotation((z, codebook), COUNTS["repeat"])
    flops = 2 * n * num_codes * code_dim
    input_bytes = (n + num_codes) * code_dim * z.element_size()

    results, expected = [], None
    for impl, fn, backend in IMPLEMENTATIONS:
        call = functools.partial(fn, metric=metric)
        result = dict(shape=name, impl=impl)
        results.append(result)
        with forced_backend(backend):
            try:
                indices = call(z, codebook)
            except BackendUnavailable as error:
                result.update(available=False, reason=str(error))
                print(f"{name:>10} {impl:>14}  n/a: {error}")
                continue
            timing = run.time(call, rotate=rotate)
            tflops = flops / (timing["median_ms"] * 1e-3) / 1e12
            result.update(available=True, **timing, tflops=tflops)
            if run.peaks is not None:
                result["pct_bf16_peak"] = 100 * tflops / run.peaks["bf16_matmul_tflops"]
            if run.device.type == "cuda":
                extra = run.peak_memory(lambda: call(z, codebook))
                result.update(extra_peak_bytes=extra, extra_peak_vs_inputs=extra / input_bytes)
        if impl == "einsum+argmin":
            expected = indices
        else:
            result["match_fraction"], result["max_rel_gap"] = compare(indices, expected, z, codebook, metric)
            result["within_tolerance"] = result["max_rel_gap"] <= BENCH_TOLERANCE[run.dtype]
        print(f"{name:>10} {impl:>14}  {timing['median_ms']:9.3f} ms  {tflops:7.2f} TFLOP/s")

    anchor_ms = {r["impl"]: r["median_ms"] for r in results if r["impl"] in ANCHORS}
    for result in results:
        if result["available"]:
            result["speedup"] = {anchor: ms / result["median_ms"] for anchor, ms in anchor_ms.items()}
    return results


def table_row(result, shapes):
    """The printed form of one result: short numbers, '-' where a column does not apply."""
    batch, tokens, num_codes, code_dim, metric = shapes[result["shape"]]
    row = {
        "shape": f"{result['shape']} N={batch * tokens} K={num_codes} d={code_dim} {metric}",
        "impl": result["impl"],
        "median ms": show(result, "median_ms", ".3f") if result["available"] else "n/a",
        "TFLOP/s": show(result, "tflops", ".2f"),
        "% bf16 peak": show(result, "pct_bf16_peak", ".1f"),
        "extra MiB": show(result, "extra_peak_bytes", ".1f", 2**-20),
        "extra / inputs": show(result, "extra_peak_vs_inputs", ".2f"),
        "match": show(result, "match_fraction", ".4f"),
        "max rel gap": show(result, "max_rel_gap", ".1e"),
    }
    for anchor in ANCHORS:
        row[f"speedup vs {anchor}"] = show(result.get("speedup"), anchor, ".2f")
    return row


def main(argv: list[str] | None = None) -> int:
    run = parse_run(__doc__, "vq", SHAPES, SMOKE_SHAPES, default_dtype="fp32", counts=COUNTS,
                     quick_shapes=QUICK_SHAPES, dtype_help=": tokenizers run in fp32", argv=argv)
    shapes, names = run.shape_table, run.names
    run.start()

    results = []
    for name in names:
        torch.manual_seed(0)
        results += bench_shape(name, shapes[name], run)

    unimm_speedups = [r["speedup"]["einsum+argmin"] for r in results if r["impl"] == "unimm"]
    target_met = all(s >= TARGET_SPEEDUP for s in unimm_speedups)
    payload = dict(
        target=TARGET,
        target_met=target_met,
        **run.fields(),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        timing=dict(timer=run.timer.__name__, **COUNTS),
        shapes={name: dict(zip(("batch", "tokens", "num_codes", "code_dim", "metric"), shapes[name]))
                for name in names},
        results=results,
    )
    run.report(payload, f"unimm is {min(unimm_speedups):.2f}x einsum+argmin at its slowest shape, "
               f"target {verdict(target_met)}", case=("shape",),
               agreement=f"picks vs einsum+argmin (distance gap tolerance {BENCH_TOLERANCE[run.dtype]:g} "
                         "of |z|^2 + |e|^2)",
               tables=[("speedup vs X = X's median time / this row's median time",
                        [table_row(result, shapes) for result in results])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
