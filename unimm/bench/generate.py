"""Generation: a decode step's kernels and whole generation calls, against what a generation loop would otherwise use.

The script is a set of parts (``--parts``, default all), each with its own shapes, named
``<part>/<shape>`` in ``--shapes``. A part is an entry of ``PARTS``: its shapes, its smoke shapes,
the function that benchmarks one shape, its target and how to judge it, and how a result prints.

Part ``decode_attention`` (issue 7, item c): ``unimm.kernels.decode_attention`` over a KV cache
``[B, max_len, Hkv, D]`` in unimm's layout against ``F.scaled_dot_product_attention`` on the same
cache (``[B, Hkv, max_len, D]`` transposed views, no copy; ``enable_gqa=True``), in this process on
the same inputs, for Llama-3.2-1B-shaped attention (Hq 32, Hkv 8, D 64) and Llama-3-8B-shaped
attention (Hq 32, Hkv 8, D 128), batches 1 / 16 / 64 and caches of 1k / 4k / 16k rows, bf16.
Two cases per shape:
  * ragged: row lengths spread over [max_len / 2, max_len] (fixed seed; max_len at batch 1). SDPA
    runs on the padded cache with a boolean mask ``[B, 1, 1, max_len]`` of each row's valid keys,
    built once outside the timing (a generation loop keeps it up to date);
  * full: every row of length max_len; SDPA with no mask (its flash path).
flashinfer's ``BatchDecodeWithPagedKVCacheWrapper`` runs on the same caches (one page of max_len
slots per row, planned outside the timing); n/a when flashinfer is not installed.
unimm runs with auto dispatch and with each backend forced through UNIMM_BACKEND; a backend that
cannot serve the call shows as n/a. GB/s counts the bytes of K and V the call has to read (sum of
row lengths x Hkv x D x 2 tensors x element size), the same count for every implementation (SDPA on
the padded cache reads more: that is part of its time). "% copy" is that rate over the device's
measured copy bandwidth (large device-to-device copy, read + write bytes). Every output is checked
against the fp32 reference (relative-norm error). Inputs smaller than twice the L2 cache are
rotated through copies so that every call reads them from HBM, as a decode step does.

Target (issue): decode_attention at >= 85% of the measured copy bandwidth for caches of >= 4k rows.

Part ``sampling`` (issue 18): ``sample_tokens`` on ``[cond; uncond]`` bf16 logits (N(0, 3)) with
LlamaGen's image options (CFG 4, top-k 2000, temperature 1) at 161,280 (Emu3) and 262,144 (Gemma)
entries, batches 1, 2 and 64: auto dispatch, each backend forced, and replayed from CUDA graphs
(as the decode engine runs it: few rows spread over several CTAs each is a chain of launches, which
a graph launches at once). Anchors: LlamaGen's ``sample()`` in torch (guidance, ``torch.topk`` mask,
softmax, ``torch.multinomial``) and flashinfer's ``top_k_sampling_from_probs`` on the guided softmax
(n/a when flashinfer is not installed). unimm's tokens are checked against the reference with the
same uniforms (``tokens off reference``, at most one: exp may round apart at a CDF edge), every
implementation's against the guided top-k. Inputs are rotated as for decode attention.
Target (issue): <= 40 us at 161k and batch 2 (the better of eager and graphed unimm).

Part ``discrete`` (issue 7, benchmark a; issue 18): Emu3-style text-to-image on a Llama-3.2-1B-shaped model
with random weights (``Decoder.from_config``; hidden 2048, 16 layers, 32 / 8 heads of 64, tied
embeddings) and a 161,280-entry vocabulary whose last 32,768 are image codes: 16 prompts of 32 text
tokens, one 24 x 24 image each (609 tokens with Emu3's structure tokens), CFG 4.0 against the
prompt BOS alone, top-k 2000 at temperature 1; one Emu3-shaped 32 x 32 image (1,065 tokens) at batch
1; and LlamaGen-style class-conditional ImageNet generation on GPT-XL (1280 wide, 36 layers): BOS and
a class token, 256 codes of a 16,384-entry codebook with no structure tokens, CFG 4, top-k 2000, at
batch 1, 8 and 64. One timed call generates all the images of its batch, prefill included:
  * unimm: ``UnifiedModel.generate`` (static KV cache, decode step in a CUDA graph, codes sampled
    over the code block by ``sample_tokens``, [cond; uncond] rows in one batch);
  * unimm[eager]: the same with ``cuda_graphs=False``; its codes must equal unimm's (same
    generator), recorded as ``same_codes_as_eager``;
  * transformers: ``LlamaForCausalLM.generate`` on the same weights with ``guidance_scale`` and
    ``negative_prompt_ids`` (its UnbatchedClassifierFreeGuidanceLogitsProcessor, one more forward
    per step over the unconditional prompts) and the span's layout as a logits processor (structure
    tokens forced, codes elsewhere, as Emu3's PrefixConstrainedLogitsProcessor), SDPA attention,
    its default dynamic cache; n/a when transformers does not import.
Reported: seconds per call, seconds per image, tokens/s (images x span / call time), images/s, ms per
step (call time / span), speedup of unimm over each.

Part ``continuous`` (issue 7, benchmark b): UniFluid-style text-to-image on the same backbone
(text vocabulary only) with a MAR-B-sized ``DiffusionHead`` (width 1024, depth 6, 16-channel
tokens): 16 images of 16 x 16 continuous tokens in a random order with next-position embeddings,
100 diffusion steps per token, CFG 3.0, with and without CUDA graphs, and the same at batch 1.
Reported: seconds per image, tokens/s and ms per step beside LlamaGen on vLLM's published 0.6
s/image (GPT-XL, A100; a printed reference, not run here). The untrained head's clean-token
estimates are clipped (``clip_denoised``) so that the tokens fed back stay finite; that costs one
clamp per step. transformers has no diffusion head: no anchor runs.

With ``--quick`` (what ``unimm bench --quick`` runs): decode_attention at llama-3-8b-b16-4k,
sampling at v161k-b2 and discrete at llama-3.2-1b-v161k-8x16x16 (8 images of 16 x 16 codes), each
generation timed twice after its first call (transformers' once); continuous is left out (it has
no anchor to beat).

    python -m unimm.bench.generate [--parts decode_attention,sampling,discrete,continuous]
        [--shapes decode_attention/llama-3-8b-b16-4k,discrete/llama-3.2-1b-v161k-16x24x24] [--quick] [--out DIR]
    python -m unimm.bench.generate --smoke --out DIR   # tiny shapes on the CPU: checks the family
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from unimm.bench import _generation as generation
from unimm.bench._harness import add_unimm_speedups, forced_backend, mark_na, optional_import, parse_run, show, verdict
from unimm.kernels import BackendUnavailable, decode_attention, sample_tokens
from unimm.kernels._common import capture_cuda_graph
from unimm.kernels.reference import sampling as reference_sampling
from unimm.kernels.reference.decode import decode_attention as reference_decode_attention
from unimm.testing import BENCH_DECODE_TOLERANCE, rel_err

flashinfer, _flashinfer_error = optional_import("flashinfer", "flashinfer")

COUNTS = dict(warmup=10, repeat=50)
SMOKE_COUNTS = dict(warmup=1, repeat=3)  # the smoke run checks the script, it measures nothing


@dataclass
class Part:
    """One benchmark of the script. ``bench(name, spec, run)`` returns result dicts (each with
    ``shape``, ``impl`` and ``available``, plus ``reason`` when not available);
    ``judge(results, shapes, run)`` says whether the target is met (None: not judged);
    ``describe(spec)`` is the shape's JSON record; ``row(result, spec)`` its table row;
    ``legend`` says what the table's columns mean."""
    shapes: dict
    smoke_shapes: dict
    bench: Callable
    target: str
    judge: Callable
    describe: Callable
    row: Callable
    legend: str


# ---------------------------------------------------------------------------------------------
# Part decode_attention
# ---------------------------------------------------------------------------------------------

DECODE_TARGET = "decode_attention at >= 85% of the measured copy bandwidth for caches of >= 4k rows (H100)"
DECODE_TARGET_PCT = 85.0
DECODE_TARGET_MIN_LEN = 4096
# model: (query heads Hq, kv heads Hkv, head dim D)
DECODE_MODELS = {"llama-3.2-1b": (32, 8, 64), "llama-3-8b": (32, 8, 128), "tiny": (4, 2, 64)}
# name: (model, batch B, cache rows max_len)
DECODE_SHAPES = {f"{model}-b{batch}-{max_len // 1024}k": (model, batch, max_len)
                 for model in ("llama-3.2-1b", "llama-3-8b") for batch in (1, 16, 64)
                 for max_len in (1024, 4096, 16384)}
DECODE_SMOKE_SHAPES = {"tiny-b3-300": ("tiny", 3, 300), "tiny-b1-64": ("tiny", 1, 64)}
DECODE_CASES = ("ragged", "full")
# (name, UNIMM_BACKEND while it runs; None = auto dispatch)
DECODE_UNIMM = (("unimm", None), ("unimm[triton]", "triton"), ("unimm[cuda]", "cuda"))
DECODE_ANCHOR = "sdpa"
DECODE_ANCHORS = (DECODE_ANCHOR, "flashinfer")
FLASHINFER_WORKSPACE_BYTES = 128 * 2**20


def ragged_lengths(batch: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Row lengths spread over [max_len / 2, max_len], the longest first; max_len at batch 1."""
    lengths = torch.randint(max_len // 2, max_len + 1, (batch,), generator=torch.Generator().manual_seed(batch))
    lengths[0] = max_len
    return lengths.to(device, torch.int32)


def sdpa_decode(q, k_cache, v_cache, mask):
    """``[B, Hq, D]`` queries through SDPA over ``[B, Hkv, max_len, D]`` views of the caches."""
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True)
    return out[:, :, 0]


class Unavailable(Exception):
    """An anchor that cannot run here: its row is n/a with this reason."""


def flashinfer_decode(lens: torch.Tensor, max_len: int, q_heads: int, kv_heads: int, head_dim: int,
                      dtype: torch.dtype, device: torch.device):
    """flashinfer's batch decode over the same caches: each row's cache is one page of max_len
    slots (NHD, so the [B, max_len, Hkv, D] tensors are its paged cache as they are), the row's
    length its last page's length; planned once, outside the timing, as a serving loop plans
    once per step for all layers. Tensor cores for GQA groups of 4 or more, as flashinfer advises.
    Its kernels are compiled with nvcc at the first call (about a minute)."""
    if flashinfer is None:
        raise Unavailable(_flashinfer_error)
    if device.type != "cuda":
        raise Unavailable("flashinfer's kernels need a CUDA device")
    batch = lens.numel()
    workspace = torch.empty(FLASHINFER_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, kv_layout="NHD",
                                                            use_tensor_cores=q_heads // kv_heads >= 4)
    pages = torch.arange(batch + 1, dtype=torch.int32, device=device)
    wrapper.plan(pages, pages[:-1], lens, q_heads, kv_heads, head_dim, max_len, q_data_type=dtype,
                 kv_data_type=dtype)
    return lambda q, k, v: wrapper.run(q, (k, v))


def bench_decode_attention(name: str, spec: tuple, run) -> list[dict]:
    model, batch, max_len = spec
    q_heads, kv_heads, head_dim = DECODE_MODELS[model]
    dtype, device = run.dtype, run.device
    q = torch.randn(batch, q_heads, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(batch, max_len, kv_heads, head_dim, device=device, dtype=dtype)
    lengths = {"ragged": ragged_lengths(batch, max_len, device),
               "full": torch.full((batch,), max_len, dtype=torch.int32, device=device)}
    results = []
    for case in DECODE_CASES:
        lens = lengths[case]
        kv_bytes = 2 * int(lens.sum()) * kv_heads * head_dim * k_cache.element_size()
        mask = None
        if case == "ragged":
            mask = (torch.arange(max_len, device=device)[None, :] < lens[:, None])[:, None, None, :]
        # fp32 queries: the reference's fp32 result, not rounded to the input dtype
        expected = reference_decode_attention(q.float(), k_cache, v_cache, lens)
        rotate = run.rotation((q, k_cache, v_cache), COUNTS["repeat"])
        # (impl, UNIMM_BACKEND, call, errors that make the row n/a instead of ending the run)
        calls = [(impl, backend, lambda q, k, v, lens=lens: decode_attention(q, k, v, lens),
                  (BackendUnavailable, torch.OutOfMemoryError)) for impl, backend in DECODE_UNIMM]
        calls.append((DECODE_ANCHOR, None, lambda q, k, v, mask=mask: sdpa_decode(q, k, v, mask),
                      (RuntimeError, TypeError)))  # an SDPA without enable_gqa, or out of memory
        calls.append(("flashinfer", None, "flashinfer", (Exception,)))  # an anchor's own failure is its n/a
        case_results = []
        for impl, backend, fn, not_here in calls:
            result = dict(shape=name, case=case, impl=impl, kv_bytes=kv_bytes)
            case_results.append(result)
            try:
                with forced_backend(backend):
                    if fn == "flashinfer":
                        fn = flashinfer_decode(lens, max_len, q_heads, kv_heads, head_dim, dtype, device)
                    out = fn(q, k_cache, v_cache)
                    timing = run.time(fn, rotate=rotate)
            except not_here as error:
                mark_na(result, f"{type(error).__name__}: {error}".splitlines()[0], tuple(result),
                        f"{name:>22} {case:>6} {impl:>14}")
                continue
            gbps = kv_bytes / (timing["median_ms"] * 1e-3) / 1e9
            error = rel_err(out, expected)
            result.update(available=True, **timing, gbps=gbps, rel_error=error,
                          within_tolerance=error <= BENCH_DECODE_TOLERANCE[dtype])
            if run.peaks is not None:
                result["pct_copy_peak"] = 100 * gbps / run.peaks["copy_gbps"]
            print(f"{name:>22} {case:>6} {impl:>14}  {timing['median_ms']:9.4f} ms  {gbps:8.1f} GB/s  "
                  f"rel err {error:.1e}")
        add_unimm_speedups(case_results, DECODE_ANCHORS)
        results += case_results
    return results


def judge_decode_attention(results: list[dict], shapes: dict, run) -> bool | None:
    if run.peaks is None:
        return None
    judged = [r for r in results if r["impl"] == "unimm" and shapes[r["shape"]][2] >= DECODE_TARGET_MIN_LEN]
    if not judged:
        return None
    return all(r.get("available") and r["pct_copy_peak"] >= DECODE_TARGET_PCT for r in judged)


def describe_decode_shape(spec: tuple) -> dict:
    model, batch, max_len = spec
    q_heads, kv_heads, head_dim = DECODE_MODELS[model]
    return dict(model=model, batch=batch, max_len=max_len, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim)


def decode_table_row(result: dict, spec: tuple) -> dict:
    model, batch, max_len = spec
    q_heads, kv_heads, head_dim = DECODE_MODELS[model]
    available = result["available"]
    return {
        "shape": f"{model} B={batch} L={max_len} Hq={q_heads} Hkv={kv_heads} D={head_dim}",
        "case": result["case"],
        "impl": result["impl"],
        "median ms": show(result, "median_ms", ".4f") if available else "n/a",
        "GB/s": show(result, "gbps", ".0f"),
        "% copy": show(result, "pct_copy_peak", ".1f"),
        **{f"speedup vs {anchor}": show(result.get("speedup"), anchor, ".2f") for anchor in DECODE_ANCHORS},
        "rel err": show(result, "rel_error", ".1e"),
    }


# ---------------------------------------------------------------------------------------------
# Part sampling
# ---------------------------------------------------------------------------------------------

SAMPLING_TARGET = "sampling: sample_tokens <= 40 us for a 161k vocabulary at batch 2 with CFG (H100/H200)"
SAMPLING_TARGET_US, SAMPLING_TARGET_SHAPE = 40.0, "v161k-b2"
# name: (vocab V, output rows B; the logits are [cond; uncond], 2B rows)
SAMPLING_SHAPES = {f"v{vocab // 1000}k-b{batch}": (vocab, batch)
                   for vocab in (161_280, 262_144) for batch in (1, 2, 64)}
SAMPLING_SMOKE_SHAPES = {"v3k-b1": (3001, 1), "v3k-b3": (3001, 3)}
SAMPLING_OPTIONS = dict(temperature=1.0, top_k=2000, cfg_scale=4.0)  # LlamaGen's defaults for images
# unimm eagerly (each backend as for decode attention), and replayed from a CUDA graph as a decode step runs it
SAMPLING_UNIMM = DECODE_UNIMM + (("unimm[graph]", None),)
SAMPLING_ANCHORS = ("torch", "flashinfer")


def torch_sample(logits: torch.Tensor) -> torch.Tensor:
    """LlamaGen's ``sample()`` in torch: guidance, temperature, a top-k mask from ``torch.topk``, softmax,
    ``torch.multinomial``."""
    rows = logits.shape[0] // 2
    cond, uncond = logits[:rows].float(), logits[rows:].float()
    guided = (uncond + SAMPLING_OPTIONS["cfg_scale"] * (cond - uncond)) / SAMPLING_OPTIONS["temperature"]
    kth = torch.topk(guided, SAMPLING_OPTIONS["top_k"], dim=-1).values[:, -1:]
    probs = torch.softmax(guided.masked_fill(guided < kth, float("-inf")), dim=-1)
    return torch.multinomial(probs, 1)[:, 0]


def flashinfer_sample(device: torch.device):
    """flashinfer's top-k rejection sampler on the guided probabilities (guidance and softmax in
    torch: flashinfer has no guidance), as vLLM's sampler calls it."""
    if flashinfer is None:
        raise Unavailable(_flashinfer_error)
    if device.type != "cuda":
        raise Unavailable("flashinfer's kernels need a CUDA device")

    def call(logits):
        rows = logits.shape[0] // 2
        cond, uncond = logits[:rows].float(), logits[rows:].float()
        guided = uncond + SAMPLING_OPTIONS["cfg_scale"] * (cond - uncond)
        probs = torch.softmax(guided / SAMPLING_OPTIONS["temperature"], dim=-1)
        return flashinfer.sampling.top_k_sampling_from_probs(probs, SAMPLING_OPTIONS["top_k"])
    return call


def graphed_sample(rotate: list[tuple], device: torch.device):
    """``sample_tokens`` replayed from CUDA graphs, one per rotated input (uniforms drawn inside the
    graph, as the decode engine captures them); returns (call, its rotation)."""
    if device.type != "cuda":
        raise Unavailable("CUDA graphs need a CUDA device")
    graphs = [(capture_cuda_graph(lambda logits=logits: sample_tokens(logits, **SAMPLING_OPTIONS), device)[0],)
              for logits, in rotate]
    return (lambda graph: graph.replay()), graphs


def sampling_call(impl: str, rotate: list[tuple], device: torch.device):
    """(the call to time, the argument tuples it cycles through) for one implementation."""
    if impl == "torch":
        return torch_sample, rotate
    if impl == "flashinfer":
        return flashinfer_sample(device), rotate
    if impl == "unimm[graph]":
        return graphed_sample(rotate, device)
    return (lambda logits: sample_tokens(logits, **SAMPLING_OPTIONS)), rotate


def bench_sampling(name: str, spec: tuple, run) -> list[dict]:
    vocab, batch = spec
    device = run.device
    logits = (torch.randn(2 * batch, vocab, device=device) * 3).to(run.dtype)
    seed = 0
    uniforms = torch.rand(batch, generator=torch.Generator(device).manual_seed(seed), device=device)
    expected = reference_sampling.sample_tokens(logits, uniforms, **SAMPLING_OPTIONS)
    guided = reference_sampling.guided_logits(logits, cfg_scale=SAMPLING_OPTIONS["cfg_scale"])
    kth = torch.topk(guided, SAMPLING_OPTIONS["top_k"], dim=-1).values[:, -1]
    rotate = run.rotation((logits,), COUNTS["repeat"])
    results = []
    for impl, backend in SAMPLING_UNIMM + tuple((anchor, None) for anchor in SAMPLING_ANCHORS):
        result = dict(shape=name, impl=impl, rows=batch, vocab=vocab)
        results.append(result)
        is_unimm = impl.startswith("unimm")
        try:
            with forced_backend(backend):
                fn, rotation = sampling_call(impl, rotate, device)
                # unimm with the reference's uniforms (the same generator state); anchors draw their own
                tokens = (sample_tokens(logits, **SAMPLING_OPTIONS, generator=torch.Generator(device).manual_seed(seed))
                          if is_unimm else fn(logits))
                timing = run.time(fn, rotate=rotation)
        except (BackendUnavailable, Unavailable, torch.OutOfMemoryError) if is_unimm else Exception as error:
            mark_na(result, f"{type(error).__name__}: {error}".splitlines()[0], tuple(result),
                    f"{name:>10} {impl:>14}")
            continue
        tokens = tokens.long().reshape(-1)
        in_top_k = bool(((tokens >= 0) & (tokens < vocab)).all()) and bool(
            (guided.gather(1, tokens.clamp(0, vocab - 1)[:, None])[:, 0] >= kth).all())
        result.update(available=True, **timing, median_us=timing["median_ms"] * 1e3, in_top_k=in_top_k)
        if is_unimm:  # the same uniforms as the reference: the same tokens but where exp rounds at a CDF edge
            mismatches = int((tokens != expected).sum())
            result.update(mismatches=mismatches, within_tolerance=mismatches <= 1)
        print(f"{name:>10} {impl:>14}  {result['median_us']:9.1f} us  top-k ok {in_top_k}")
    add_unimm_speedups(results, SAMPLING_ANCHORS)
    return results


def judge_sampling(results: list[dict], shapes: dict, run) -> bool | None:
    if run.peaks is None:
        return None
    judged = [r for r in results if r["impl"] in ("unimm", "unimm[graph]") and r["shape"] == SAMPLING_TARGET_SHAPE]
    if not any(r.get("available") for r in judged):
        return None
    return min(r["median_us"] for r in judged if r.get("available")) <= SAMPLING_TARGET_US


def sampling_table_row(result: dict, spec: tuple) -> dict:
    vocab, batch = spec
    return {
        "shape": f"V={vocab} B={batch} (CFG: {2 * batch} logit rows) top-k {SAMPLING_OPTIONS['top_k']}",
        "impl": result["impl"],
        "median us": show(result, "median_us", ".1f") if result["available"] else "n/a",
        **{f"speedup vs {anchor}": show(result.get("speedup"), anchor, ".2f") for anchor in SAMPLING_ANCHORS},
        "in top-k": {True: "yes", False: "NO"}.get(result.get("in_top_k"), "-"),
        "tokens off reference": show(result, "mismatches", ".0f"),
    }


# ---------------------------------------------------------------------------------------------
# Parts and the run
# ---------------------------------------------------------------------------------------------

PARTS = {
    "decode_attention": Part(shapes=DECODE_SHAPES, smoke_shapes=DECODE_SMOKE_SHAPES, bench=bench_decode_attention,
                             target=DECODE_TARGET, judge=judge_decode_attention, describe=describe_decode_shape,
                             row=decode_table_row,
                             legend="speedup vs X = X's median time / this row's; GB/s = K and V bytes the call "
                                    "must read / median time"),
    "sampling": Part(shapes=SAMPLING_SHAPES, smoke_shapes=SAMPLING_SMOKE_SHAPES, bench=bench_sampling,
                     target=SAMPLING_TARGET, judge=judge_sampling, describe=lambda spec: dict(vocab=spec[0],
                                                                                              rows=spec[1]),
                     row=sampling_table_row,
                     legend=f"sample_tokens with {SAMPLING_OPTIONS} on [cond; uncond] logits; speedup vs X = X's "
                            "median time / this row's; in top-k: every token among the guided top-k; tokens off "
                            "reference: unimm's tokens that differ from the reference's with the same uniforms"),
    "discrete": Part(shapes=generation.DISCRETE_SHAPES, smoke_shapes=generation.DISCRETE_SMOKE_SHAPES,
                     bench=generation.bench_discrete, target=generation.DISCRETE_TARGET,
                     judge=generation.judge_discrete, describe=generation.describe_generation_shape,
                     row=generation.discrete_table_row,
                     legend="one call generates every image of the batch (prefill included); ms/step = call time / "
                            "tokens per image span; speedup vs X = X's median time / this row's"),
    "continuous": Part(shapes=generation.CONTINUOUS_SHAPES, smoke_shapes=generation.CONTINUOUS_SMOKE_SHAPES,
                       bench=generation.bench_continuous, target=generation.CONTINUOUS_TARGET,
                       judge=generation.judge_continuous, describe=generation.describe_generation_shape,
                       row=generation.continuous_table_row,
                       legend="one call generates every image of the batch (prefill included); ms/step = call time "
                              f"/ tokens per image span; reference: {generation.LLAMAGEN_VLLM}"),
}
SHAPES = {f"{part}/{name}": spec for part, entry in PARTS.items() for name, spec in entry.shapes.items()}
QUICK_SHAPES = ("decode_attention/llama-3-8b-b16-4k", f"sampling/{SAMPLING_TARGET_SHAPE}",
                "discrete/llama-3.2-1b-v161k-8x16x16")
QUICK_PARTS = ("decode_attention", "sampling", "discrete")  # continuous has no anchor to beat
SMOKE_SHAPES = {f"{part}/{name}": spec for part, entry in PARTS.items() for name, spec in entry.smoke_shapes.items()}


def add_arguments(parser) -> None:
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default all)")


def main(argv: list[str] | None = None) -> int:
    run = parse_run(__doc__, "generate", SHAPES, SMOKE_SHAPES, default_dtype="bf16", counts=COUNTS,
                     smoke_counts=SMOKE_COUNTS, quick_shapes=QUICK_SHAPES, smoke_dtype="fp32",
                     dtype_help="; fp32 with --smoke, CPU bf16 being slow", add_arguments=add_arguments, argv=argv)
    parts = run.choose(run.parts, PARTS, QUICK_PARTS if run.quick else PARTS, "parts")
    names = [name for name in run.names if name.split("/")[0] in parts]
    if not names:
        raise SystemExit(f"--shapes {run.shapes} names no shape of --parts {','.join(parts)}")
    run.start()

    part_results = {}
    for part in parts:
        entry = PARTS[part]
        results = []
        for name in names:
            part_name, _, shape = name.partition("/")
            if part_name == part:
                torch.manual_seed(0)
                results += [dict(part=part, **r) for r in entry.bench(shape, run.shape_table[name], run)]
        part_results[part] = results

    summary, tables = {}, []
    for part, results in part_results.items():
        entry = PARTS[part]
        table = entry.smoke_shapes if run.smoke else entry.shapes
        shapes = {r["shape"]: table[r["shape"]] for r in results}
        summary[part] = dict(target=entry.target, target_met=entry.judge(results, shapes, run),
                             shapes={shape: entry.describe(spec) for shape, spec in shapes.items()})
        tables.append((f"\n{part}: {entry.legend}", [entry.row(r, table[r["shape"]]) for r in results]))
    met = [s["target_met"] for s in summary.values()]
    payload = dict(
        target="; ".join(s["target"] for s in summary.values()),
        target_met=None if None in met else all(met),  # a part not judged leaves the whole unjudged
        parts=summary,
        **run.fields(),
        timing=dict(timer=run.timer.__name__, **run.counts),
        shapes={f"{part}/{shape}": dict(part=part, **record) for part, s in summary.items()
                for shape, record in s["shapes"].items()},
        results=[r for results in part_results.values() for r in results],
    )
    run.report(payload, ", ".join(f"{part}: target {verdict(s['target_met'])}" for part, s in summary.items()),
               case=("part", "shape", "case"), agreement="outputs vs the fp32 reference", tables=tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
