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

Part ``discrete`` (issue 7, benchmark a): Emu3-style text-to-image on a Llama-3.2-1B-shaped model
with random weights (``Decoder.from_config``; hidden 2048, 16 layers, 32 / 8 heads of 64, tied
embeddings) and a 161,280-entry vocabulary whose last 32,768 are image codes: 16 prompts of 32 text
tokens, one 24 x 24 image each (609 tokens with Emu3's structure tokens), CFG 4.0 against the
prompt BOS alone, top-k 2000 at temperature 1. One timed call generates all 16 images, prefill
included:
  * unimm: ``UnifiedModel.generate`` (static KV cache, decode step in a CUDA graph, codes sampled
    over the code block by ``sample_tokens``, [cond; uncond] rows in one batch);
  * unimm[eager]: the same with ``cuda_graphs=False``; its codes must equal unimm's (same
    generator), recorded as ``same_codes_as_eager``;
  * transformers: ``LlamaForCausalLM.generate`` on the same weights with ``guidance_scale`` and
    ``negative_prompt_ids`` (its UnbatchedClassifierFreeGuidanceLogitsProcessor, one more forward
    per step over the unconditional prompts) and Emu3's layout as a logits processor (structure
    tokens forced, codes elsewhere, as Emu3's PrefixConstrainedLogitsProcessor), SDPA attention,
    its default dynamic cache; n/a when transformers does not import.
Reported: seconds per call, images/s, ms per step (call time / 609), speedup of unimm over each.

Part ``continuous`` (issue 7, benchmark b): UniFluid-style text-to-image on the same backbone
(text vocabulary only) with a MAR-B-sized ``DiffusionHead`` (width 1024, depth 6, 16-channel
tokens): 16 images of 16 x 16 continuous tokens in a random order with next-position embeddings,
100 diffusion steps per token, CFG 3.0, with and without CUDA graphs. Reported: seconds per image
and ms per step beside LlamaGen on vLLM's published 0.6 s/image (GPT-XL, A100; a printed reference,
not run here). The untrained head's clean-token estimates are clipped (``clip_denoised``) so that
the tokens fed back stay finite; that costs one clamp per step.

With ``--quick`` (what ``unimm bench --quick`` runs): decode_attention at llama-3-8b-b16-4k and
discrete at llama-3.2-1b-v161k-8x16x16 (8 images of 16 x 16 codes), each generation timed twice
after its first call (transformers' once); continuous is left out (it has no anchor to beat).

    python -m unimm.bench.generate [--parts decode_attention,discrete,continuous]
        [--shapes decode_attention/llama-3-8b-b16-4k,discrete/llama-3.2-1b-v161k-16x24x24] [--quick] [--out DIR]
    python -m unimm.bench.generate --smoke --out DIR   # tiny shapes on the CPU: checks the family
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from unimm.bench._common import add_unimm_speedups, markdown_table, parse_run, print_outcome, save, start_run, verdict
from unimm.kernels import BackendUnavailable, decode_attention
from unimm.kernels.reference.decode import decode_attention as reference_decode_attention
from unimm.models import Decoder, DiffusionHead, DiscreteImage, ImageSpec, Text, UnifiedModel, VocabLayout, pack
from unimm.models.sequence import DEFAULT_SPECIAL_TOKENS, EMU3_FORMAT, UNIFLUID_FORMAT

try:
    import flashinfer
    _flashinfer_error = None
except Exception as error:  # not installed, or a torch / CUDA it does not support
    flashinfer = None
    _flashinfer_error = f"flashinfer is not importable ({type(error).__name__}: {error})"

WARMUP, REPEAT = 10, 50
SMOKE_WARMUP, SMOKE_REPEAT = 1, 3  # the smoke run checks the script, it measures nothing


@dataclass
class Run:
    """What every part gets: the run's dtype, device, timer and measured peaks."""
    dtype: torch.dtype
    device: torch.device
    timer: Callable
    peaks: dict | None
    smoke: bool
    quick: bool = False

    def time(self, fn, rotate=None) -> dict:
        warmup, repeat = (SMOKE_WARMUP, SMOKE_REPEAT) if self.smoke else (WARMUP, REPEAT)
        return self.timer(fn, warmup=warmup, repeat=repeat, rotate=rotate)


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


def set_backend(backend: str | None) -> None:
    """unimm reads UNIMM_BACKEND on every call, so one process can time every backend."""
    if backend is None:
        os.environ.pop("UNIMM_BACKEND", None)
    else:
        os.environ["UNIMM_BACKEND"] = backend


def rotation(args: tuple, device: torch.device, repeat: int) -> list[tuple]:
    """``args`` plus copies of its tensors, enough that together they span twice the L2 cache
    (none on the CPU, or when one set is already that large)."""
    if device.type != "cuda":
        return [args]
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    input_bytes = sum(t.numel() * t.element_size() for t in args if isinstance(t, torch.Tensor))
    copies = min(repeat, -(-2 * l2_bytes // input_bytes))
    return [args] + [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in args) for _ in range(copies - 1)]


def show(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


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
                 for model in ("llama-3.2-1b", "llama-3-8b") for batch in (1, 16, 64) for max_len in (1024, 4096, 16384)}
DECODE_SMOKE_SHAPES = {"tiny-b3-300": ("tiny", 3, 300), "tiny-b1-64": ("tiny", 1, 64)}
DECODE_CASES = ("ragged", "full")
# (name, UNIMM_BACKEND while it runs; None = auto dispatch)
DECODE_UNIMM = (("unimm", None), ("unimm[triton]", "triton"), ("unimm[cuda]", "cuda"))
DECODE_ANCHOR = "sdpa"
DECODE_ANCHORS = (DECODE_ANCHOR, "flashinfer")
FLASHINFER_WORKSPACE_BYTES = 128 * 2**20
# Relative-norm error against the fp32 reference (docs/ARCHITECTURE.md, Numerics).
DECODE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


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


def bench_decode_attention(name: str, spec: tuple, run: Run) -> list[dict]:
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
        rotate = rotation((q, k_cache, v_cache), device, REPEAT)
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
            set_backend(backend)
            try:
                if fn == "flashinfer":
                    fn = flashinfer_decode(lens, max_len, q_heads, kv_heads, head_dim, dtype, device)
                out = fn(q, k_cache, v_cache)
                timing = run.time(fn, rotate=rotate)
            except not_here as error:
                result.update(available=False, reason=f"{type(error).__name__}: {error}".splitlines()[0])
                print(f"{name:>22} {case:>6} {impl:>14}  n/a: {result['reason']}")
                continue
            finally:
                set_backend(None)
            gbps = kv_bytes / (timing["median_ms"] * 1e-3) / 1e9
            error = ((out.float() - expected).norm() / expected.norm()).item()
            result.update(available=True, **timing, gbps=gbps, rel_error=error,
                          within_tolerance=error <= DECODE_TOLERANCE[dtype])
            if run.peaks is not None:
                result["pct_copy_peak"] = 100 * gbps / run.peaks["copy_gbps"]
            print(f"{name:>22} {case:>6} {impl:>14}  {timing['median_ms']:9.4f} ms  {gbps:8.1f} GB/s  "
                  f"rel err {error:.1e}")
        add_unimm_speedups(case_results, DECODE_ANCHORS)
        results += case_results
    return results


def judge_decode_attention(results: list[dict], shapes: dict, run: Run) -> bool | None:
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
        "median ms": show(result.get("median_ms"), ".4f") if available else "n/a",
        "GB/s": show(result.get("gbps"), ".0f"),
        "% copy": show(result.get("pct_copy_peak"), ".1f"),
        **{f"speedup vs {anchor}": show(result.get("speedup", {}).get(anchor), ".2f") for anchor in DECODE_ANCHORS},
        "rel err": show(result.get("rel_error"), ".1e"),
    }


# ---------------------------------------------------------------------------------------------
# Parts discrete and continuous: whole generation calls
# ---------------------------------------------------------------------------------------------

# backbone shapes; the vocabulary comes with the part's shape
GEN_MODELS = {
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128),
}
LLAMA3_ROPE = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)
GEN_TIMING = dict(warmup=1, repeat=3)  # one call is a whole generation: seconds
GEN_SMOKE_TIMING = dict(warmup=0, repeat=1)
GEN_ANCHOR_TIMING = dict(warmup=1, repeat=2)  # transformers' generate: tens of seconds a call
# --quick: the first (checked) call has compiled and warmed everything already
GEN_QUICK_TIMING, GEN_ANCHOR_QUICK_TIMING = dict(warmup=0, repeat=2), dict(warmup=0, repeat=1)
BOS = 1  # the prompts' first token; the unconditional prompt is BOS alone (caption dropout)

DISCRETE_TARGET = ("discrete: unimm (CUDA graphs) above transformers generate with CFG and above unimm without "
                   "CUDA graphs in images/s")
# Emu3-style text-to-image: a 161,280-entry vocabulary whose last 32,768 are codes, 24 x 24 codes per
# image with Emu3's structure tokens (609 tokens per span), CFG 4, top-k 2000
DISCRETE_SHAPES = {"llama-3.2-1b-v161k-16x24x24": dict(model="llama-3.2-1b", vocab=161280, image_codes=32768,
                                                        images=16, grid=(24, 24), prompt_len=32, cfg_scale=4.0,
                                                        top_k=2000),
                   # a quarter of the tokens: what --quick runs, transformers' generate taking tens of seconds
                   "llama-3.2-1b-v161k-8x16x16": dict(model="llama-3.2-1b", vocab=161280, image_codes=32768,
                                                       images=8, grid=(16, 16), prompt_len=32, cfg_scale=4.0,
                                                       top_k=2000)}
DISCRETE_SMOKE_SHAPES = {"tiny-2x3x3": dict(model="tiny", vocab=301, image_codes=100, images=2, grid=(3, 3),
                                            prompt_len=5, cfg_scale=4.0, top_k=20)}
DISCRETE_ANCHORS = ("transformers", "unimm[eager]")

CONTINUOUS_TARGET = "continuous: report only, s/image beside LlamaGen on vLLM's published 0.6 s/image"
LLAMAGEN_VLLM = "LlamaGen GPT-XL (775M) on vLLM, A100, published: 0.6 s/image"
# UniFluid-style: 16 x 16 continuous tokens per image (BOI then the tokens, random order, next-position
# embeddings), a MAR-B-sized diffusion head (width 1024, depth 6) on 16-channel tokens, 100 steps, CFG
CONTINUOUS_SHAPES = {"llama-3.2-1b-16x16x16-mar-b": dict(model="llama-3.2-1b", text_vocab=128256, images=16,
                                                          grid=(16, 16), token_dim=16, head=(1024, 6),
                                                          diffusion_steps=100, prompt_len=32, cfg_scale=3.0)}
CONTINUOUS_SMOKE_SHAPES = {"tiny-2x2x3": dict(model="tiny", text_vocab=150, images=2, grid=(2, 3), token_dim=4,
                                              head=(32, 2), diffusion_steps=5, prompt_len=5, cfg_scale=3.0)}
# an untrained head's clean-token estimates are unbounded (DiffusionHead.sample): keep what is fed back finite
CLIP_DENOISED = 5.0


def gen_hf_config(model: str, vocab: int):
    import transformers

    shape = GEN_MODELS[model]
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE),
        pad_token_id=0, bos_token_id=BOS, eos_token_id=None)


def gen_decoder(model: str, vocab: int, run: Run) -> Decoder:
    """A randomly initialised Llama-shaped unimm decoder (transformers' config, so the anchor matches)."""
    torch.manual_seed(0)
    with torch.device(run.device):
        return Decoder.from_config(gen_hf_config(model, vocab)).to(run.dtype).eval()


def gen_prompts(spec: dict, vocab_size: int) -> torch.Tensor:
    """``[images, prompt_len]`` text ids: BOS, then random text tokens (below the special tokens)."""
    ids = torch.randint(2, vocab_size, (spec["images"], spec["prompt_len"]), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS
    return ids


def time_generation(run: Run, fn, timing: dict) -> dict:
    if run.smoke:
        timing = GEN_SMOKE_TIMING
    elif run.quick:
        timing = GEN_ANCHOR_QUICK_TIMING if timing is GEN_ANCHOR_TIMING else GEN_QUICK_TIMING
    return run.timer(fn, **timing)


def hf_generate_discrete(decoder: Decoder, vocab: VocabLayout, spec: dict, prompts: torch.Tensor, run: Run):
    """transformers' ``generate`` on the same weights: sampling with top-k, CFG through
    ``guidance_scale`` + ``negative_prompt_ids`` (its UnbatchedClassifierFreeGuidanceLogitsProcessor: a
    second forward per step over the unconditional prompts, with their own cache) and Emu3's layout
    (structure tokens forced, codes elsewhere) as a logits processor, as Emu3's own generation does."""
    import transformers

    class Emu3Layout(transformers.LogitsProcessor):
        """Emu3's PrefixConstrainedLogitsProcessor, vectorised over the batch: the token at each
        step of the image span is its structure token, or any image code."""

        def __init__(self, layout: list[int], prompt_len: int, codes_start: int):
            self.layout, self.prompt_len, self.codes_start = layout, prompt_len, codes_start

        def __call__(self, input_ids, scores):
            forced = self.layout[input_ids.shape[1] - self.prompt_len]
            if forced >= 0:
                scores.fill_(float("-inf"))
                scores[:, forced] = 0.0
            else:
                scores[:, :self.codes_start] = float("-inf")
            return scores

    previous = torch.get_default_dtype()
    torch.set_default_dtype(run.dtype)  # as from_pretrained builds it: RoPE's inv_freq stays fp32
    try:
        with torch.device(run.device):
            model = transformers.LlamaForCausalLM(gen_hf_config(spec["model"], vocab.size))
    finally:
        torch.set_default_dtype(previous)
    state = {name if name == "lm_head.weight" else f"model.{name}": tensor
             for name, tensor in decoder.state_dict().items()}
    model.load_state_dict(state)
    model.eval()
    layout = emu3_layout(vocab, spec["grid"])
    cond = prompts.to(run.device)
    uncond = torch.full((cond.shape[0], 1), BOS, dtype=torch.long, device=run.device)
    processor = Emu3Layout(layout, cond.shape[1], vocab.image_codes[0])

    def call():
        with torch.no_grad():
            return model.generate(cond, attention_mask=torch.ones_like(cond), max_new_tokens=len(layout),
                                  min_new_tokens=len(layout), do_sample=True, top_k=spec["top_k"], top_p=1.0,
                                  temperature=1.0, guidance_scale=spec["cfg_scale"], negative_prompt_ids=uncond,
                                  logits_processor=transformers.LogitsProcessorList([processor]),
                                  pad_token_id=0)
    return call, layout


def emu3_layout(vocab: VocabLayout, grid: tuple[int, int]) -> list[int]:
    """The tokens of one image span as ``pack`` lays them out: structure ids, -1 at codes."""
    batch = pack([[DiscreteImage(torch.zeros(grid, dtype=torch.long), loss=False, format=EMU3_FORMAT)]],
                 4 * grid[0] * grid[1] + 16, vocab=vocab)
    ids = batch.input_ids[0, :batch.placements[0][2]]
    return torch.where(ids >= vocab.image_codes[0], -1, ids).tolist()


def bench_discrete(name: str, spec: dict, run: Run) -> list[dict]:
    text_size = spec["vocab"] - spec["image_codes"] - len(DEFAULT_SPECIAL_TOKENS)
    vocab = VocabLayout(text_size, DEFAULT_SPECIAL_TOKENS, spec["image_codes"])
    decoder = gen_decoder(spec["model"], vocab.size, run)
    model = UnifiedModel(decoder, vocab)
    prompts = gen_prompts(spec, text_size)
    image = ImageSpec("discrete", shape=spec["grid"], format=EMU3_FORMAT, cfg_scale=spec["cfg_scale"],
                      temperature=1.0, top_k=spec["top_k"])
    span = len(emu3_layout(vocab, spec["grid"]))
    segments = [[Text(row.tolist())] for row in prompts]

    def unimm(cuda_graphs: bool):
        def call():
            generator = torch.Generator(run.device).manual_seed(0)
            return model.generate(segments, max_new_tokens=0, image=image, start_image=True,
                                  uncond_prompts=[[Text([BOS])]] * len(segments), generator=generator,
                                  cuda_graphs=cuda_graphs)
        return call

    results, codes = [], {}
    for impl, graphs in (("unimm", True), ("unimm[eager]", False)):
        call = unimm(graphs)
        out = call()
        codes[impl] = torch.stack([continuation[0].codes for continuation in out])
        timing = time_generation(run, call, GEN_TIMING)
        results.append(discrete_result(name, impl, spec, span, timing))
    results[0]["same_codes_as_eager"] = bool(torch.equal(codes["unimm"], codes["unimm[eager]"]))
    results[0]["codes_shape"] = list(codes["unimm"].shape)

    result = dict(shape=name, impl="transformers")
    try:
        call, layout = hf_generate_discrete(decoder, vocab, spec, prompts, run)
        out = call()
        generated = out[:, prompts.shape[1]:]
        layout_ok = generated.shape[1] == len(layout) and all(
            (generated[:, i] == token).all() if token >= 0 else (generated[:, i] >= vocab.image_codes[0]).all()
            for i, token in enumerate(layout))
        timing = time_generation(run, call, GEN_ANCHOR_TIMING)
        result = discrete_result(name, "transformers", spec, span, timing)
        result["layout_ok"] = bool(layout_ok)
    except (ImportError, RuntimeError, TypeError, ValueError) as error:  # not importable, out of memory, API drift
        result.update(available=False, reason=f"{type(error).__name__}: {error}".splitlines()[0])
        print(f"{name:>30} {'transformers':>14}  n/a: {result['reason']}")
    results.append(result)
    add_unimm_speedups(results, DISCRETE_ANCHORS)
    return results


def discrete_result(name: str, impl: str, spec: dict, span: int, timing: dict) -> dict:
    seconds = timing["median_ms"] / 1e3
    result = dict(shape=name, impl=impl, available=True, **timing, tokens_per_image=span,
                  images_per_s=spec["images"] / seconds, ms_per_step=timing["median_ms"] / span)
    print(f"{name:>30} {impl:>14}  {seconds:8.3f} s/call  {result['images_per_s']:8.2f} images/s  "
          f"{result['ms_per_step']:7.3f} ms/step")
    return result


def judge_discrete(results: list[dict], shapes: dict, run: Run) -> bool | None:
    if run.peaks is None:
        return None
    by_impl = {r["impl"]: r for r in results if r.get("available")}
    if "unimm" not in by_impl or any(anchor not in by_impl for anchor in DISCRETE_ANCHORS):
        return None
    return all(by_impl["unimm"]["speedup"][anchor] > 1.0 for anchor in DISCRETE_ANCHORS)


def describe_generation_shape(spec: dict) -> dict:
    return dict(spec, **GEN_MODELS[spec["model"]])


def discrete_table_row(result: dict, spec: dict) -> dict:
    available = result["available"]
    speedup = result.get("speedup", {})
    return {
        "shape": f"{spec['model']} V={spec['vocab']} {spec['images']} x {spec['grid'][0]}x{spec['grid'][1]} codes "
                 f"CFG {spec['cfg_scale']} top-k {spec['top_k']}",
        "impl": result["impl"],
        "median s/call": show(result.get("median_ms", 0) / 1e3, ".3f") if available else "n/a",
        "images/s": show(result.get("images_per_s"), ".2f"),
        "ms/step": show(result.get("ms_per_step"), ".3f"),
        "speedup vs transformers": show(speedup.get("transformers"), ".2f"),
        "speedup vs unimm[eager]": show(speedup.get("unimm[eager]"), ".2f"),
    }


def bench_continuous(name: str, spec: dict, run: Run) -> list[dict]:
    vocab = VocabLayout(spec["text_vocab"], DEFAULT_SPECIAL_TOKENS, 0)
    decoder = gen_decoder(spec["model"], vocab.size, run)
    width, depth = spec["head"]
    torch.manual_seed(0)
    with torch.device(run.device):
        head = DiffusionHead(spec["token_dim"], decoder.config.hidden_size, width, depth)
        model = UnifiedModel(decoder, vocab, feature_dims={"image": spec["token_dim"]}, continuous_head=head,
                             image_grid=spec["grid"], next_position_embeddings=True).to(run.dtype)
    tokens = spec["grid"][0] * spec["grid"][1]
    image = ImageSpec("continuous", shape=spec["grid"], format=UNIFLUID_FORMAT, cfg_scale=spec["cfg_scale"],
                      diffusion_steps=spec["diffusion_steps"], random_order=True, clip_denoised=CLIP_DENOISED)
    segments = [[Text(row.tolist())] for row in gen_prompts(spec, vocab.text_size)]
    span = tokens + 1  # BOI, then the tokens

    results = []
    for impl, graphs in (("unimm", True), ("unimm[eager]", False)):
        def call(graphs=graphs):
            generator = torch.Generator(run.device).manual_seed(0)
            return model.generate(segments, max_new_tokens=0, image=image, start_image=True,
                                  uncond_prompts=[[Text([BOS])]] * len(segments), generator=generator,
                                  cuda_graphs=graphs)
        out = call()
        finite = all(bool(torch.isfinite(c[0].features).all()) for c in out)
        timing = time_generation(run, call, GEN_TIMING)
        seconds = timing["median_ms"] / 1e3
        result = dict(shape=name, impl=impl, available=True, **timing, tokens_per_image=span,
                      s_per_image=seconds / spec["images"], ms_per_step=timing["median_ms"] / span,
                      features_shape=list(out[0][0].features.shape), finite=finite)
        print(f"{name:>30} {impl:>14}  {seconds:8.3f} s/call  {result['s_per_image']:7.3f} s/image  "
              f"{result['ms_per_step']:7.3f} ms/step")
        results.append(result)
    add_unimm_speedups(results, ("unimm[eager]",))
    print(f"reference: {LLAMAGEN_VLLM} (not run here)")
    return results


def judge_continuous(results: list[dict], shapes: dict, run: Run) -> None:
    """The issue sets no target: latency per image is reported beside LlamaGen on vLLM's."""
    return None


def continuous_table_row(result: dict, spec: dict) -> dict:
    return {
        "shape": f"{spec['model']} {spec['images']} x {spec['grid'][0]}x{spec['grid'][1]} tokens, head "
                 f"{spec['head'][0]}/{spec['head'][1]}, {spec['diffusion_steps']} steps, CFG {spec['cfg_scale']}",
        "impl": result["impl"],
        "median s/call": show(result["median_ms"] / 1e3, ".3f"),
        "s/image": show(result["s_per_image"], ".3f"),
        "ms/step": show(result["ms_per_step"], ".3f"),
        "speedup vs unimm[eager]": show(result.get("speedup", {}).get("unimm[eager]"), ".2f"),
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
    "discrete": Part(shapes=DISCRETE_SHAPES, smoke_shapes=DISCRETE_SMOKE_SHAPES, bench=bench_discrete,
                     target=DISCRETE_TARGET, judge=judge_discrete, describe=describe_generation_shape,
                     row=discrete_table_row,
                     legend="one call generates every image of the batch (prefill included); ms/step = call time / "
                            "tokens per image span; speedup vs X = X's median time / this row's"),
    "continuous": Part(shapes=CONTINUOUS_SHAPES, smoke_shapes=CONTINUOUS_SMOKE_SHAPES, bench=bench_continuous,
                       target=CONTINUOUS_TARGET, judge=judge_continuous, describe=describe_generation_shape,
                       row=continuous_table_row,
                       legend="one call generates every image of the batch (prefill included); ms/step = call time "
                              f"/ tokens per image span; reference: {LLAMAGEN_VLLM}"),
}
SHAPES = {f"{part}/{name}": spec for part, entry in PARTS.items() for name, spec in entry.shapes.items()}
QUICK_SHAPES = ("decode_attention/llama-3-8b-b16-4k", "discrete/llama-3.2-1b-v161k-8x16x16")
QUICK_PARTS = ("decode_attention", "discrete")  # continuous has no anchor to beat
SMOKE_SHAPES = {f"{part}/{name}": spec for part, entry in PARTS.items() for name, spec in entry.smoke_shapes.items()}


def add_arguments(parser) -> None:
    parser.add_argument("--parts", help=f"comma-separated subset of {','.join(PARTS)} (default all)")


def main(argv: list[str] | None = None) -> int:
    args = parse_run(__doc__, "generate", SHAPES, SMOKE_SHAPES, default_dtype="bf16", quick_shapes=QUICK_SHAPES,
                     smoke_dtype="fp32", dtype_help="; fp32 with --smoke, CPU bf16 being slow",
                     add_arguments=add_arguments, argv=argv)
    parts = args.parts.split(",") if args.parts else list(QUICK_PARTS if args.quick else PARTS)
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise SystemExit(f"unknown parts {unknown}; choose from {','.join(PARTS)}")
    names = [name for name in args.names if name.split("/")[0] in parts]
    if not names:
        raise SystemExit(f"--shapes {args.shapes} names no shape of --parts {','.join(parts)}")
    env, peaks = start_run(args)
    run = Run(dtype=args.dtype, device=args.device, timer=args.timer, peaks=peaks, smoke=args.smoke, quick=args.quick)

    part_results = {}
    for part in parts:
        entry = PARTS[part]
        results = []
        for name in names:
            part_name, _, shape = name.partition("/")
            if part_name == part:
                torch.manual_seed(0)
                results += [dict(part=part, **r) for r in entry.bench(shape, args.shape_table[name], run)]
        part_results[part] = results

    summary = {}
    for part, results in part_results.items():
        entry = PARTS[part]
        table = entry.smoke_shapes if args.smoke else entry.shapes
        shapes = {r["shape"]: table[r["shape"]] for r in results}
        summary[part] = dict(target=entry.target, target_met=entry.judge(results, shapes, run),
                             shapes={shape: entry.describe(spec) for shape, spec in shapes.items()})
    met = [s["target_met"] for s in summary.values()]
    shapes = {f"{part}/{shape}": dict(part=part, **record) for part, s in summary.items()
              for shape, record in s["shapes"].items()}
    warmup, repeat = (SMOKE_WARMUP, SMOKE_REPEAT) if args.smoke else (WARMUP, REPEAT)
    payload = dict(
        target="; ".join(s["target"] for s in summary.values()),
        target_met=None if None in met else all(met),
        parts=summary,
        smoke=args.smoke,
        environment=env,
        peaks=peaks,
        dtype=args.dtype_name,
        timing=dict(timer=args.timer.__name__, warmup=warmup, repeat=repeat),
        shapes=shapes,
        results=[r for results in part_results.values() for r in results],
    )
    path = save(payload, args)

    print_outcome(path, payload["target"], args.smoke, env,
                  ", ".join(f"{part}: target {verdict(s['target_met'])}" for part, s in summary.items()))
    results = payload["results"]
    off = [f"{r['shape']}/{r['case']}/{r['impl']}" for r in results if r.get("within_tolerance") is False]
    print("outputs vs the fp32 reference: " + (f"outside tolerance for {', '.join(off)}" if off else
                                                 f"all {sum('within_tolerance' in r for r in results)} within tolerance"))
    for r in results:
        if not r["available"]:
            print(f"n/a {r['part']}/{r['shape']}/{r.get('case', '')}/{r['impl']}: {r['reason']}")
    for part, results in part_results.items():
        entry = PARTS[part]
        table = entry.smoke_shapes if args.smoke else entry.shapes
        rows = [entry.row(r, table[r["shape"]]) for r in results]
        print(f"\n{part}: {entry.legend}\n")
        print(markdown_table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
