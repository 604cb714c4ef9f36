"""The generation family's parts ``discrete`` and ``continuous`` (``unimm.bench.generate``): whole
image generation calls on backbones with random weights (Llama-3.2-1B-shaped, and LlamaGen's GPT-XL
for class-conditional images), over image codes against transformers' ``generate`` and over
continuous tokens with a diffusion head. Every result reports seconds per image and generated
tokens per second (images x tokens per image span / call time).
"""

from __future__ import annotations

import torch

from unimm.bench._harness import add_unimm_speedups, show
from unimm.bench._llama import llama_config, llama_for_causal_lm
from unimm.models import Decoder, DiffusionHead, DiscreteImage, ImageSpec, Text, UnifiedModel, VocabLayout, pack
from unimm.models.sequence import DEFAULT_SPECIAL_TOKENS, EMU3_FORMAT, UNIFLUID_FORMAT
from unimm.models.vocab import ImageFormat

# backbone shapes; the vocabulary comes with the part's shape
GEN_MODELS = {
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192),
    # LlamaGen's GPT-XL (775M): width 1280, 36 layers, 20 heads, SwiGLU of 3584
    "llamagen-gpt-xl": dict(hidden=1280, layers=36, heads=20, kv_heads=20, head_dim=64, intermediate=3584),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128),
}
GEN_TIMING = dict(warmup=1, repeat=3)  # one call is a whole generation: seconds
GEN_SMOKE_TIMING = dict(warmup=0, repeat=1)
GEN_ANCHOR_TIMING = dict(warmup=1, repeat=2)  # transformers' generate: tens of seconds a call
# --quick: the first (checked) call has compiled and warmed everything already
GEN_QUICK_TIMING, GEN_ANCHOR_QUICK_TIMING = dict(warmup=0, repeat=2), dict(warmup=0, repeat=1)
BOS = 1  # the prompts' first token; the unconditional prompt is BOS alone (caption dropout)

DISCRETE_TARGET = ("discrete: unimm (CUDA graphs) above transformers generate with CFG and above unimm without "
                   "CUDA graphs in images/s")
# The token layout of an image span: Emu3's structure tokens (size, image token, end of each row and
# of the frame), or LlamaGen's bare codes (the class token is the prompt).
IMAGE_FORMATS = {"emu3": EMU3_FORMAT, "llamagen": ImageFormat(begin=None, end=None)}
LLAMAGEN_CLASSES, LLAMAGEN_CODES = 1000, 16384  # ImageNet classes; VQ-16 codebook
LLAMAGEN_VOCAB = LLAMAGEN_CLASSES + len(DEFAULT_SPECIAL_TOKENS) + LLAMAGEN_CODES


def emu3_shape(images: int, side: int) -> dict:
    """Emu3-style text-to-image: a 161,280-entry vocabulary whose last 32,768 are codes, side x side
    codes with Emu3's structure tokens, 32-token prompts, CFG 4, top-k 2000."""
    return dict(model="llama-3.2-1b", vocab=161280, image_codes=32768, images=images, grid=(side, side),
                prompt_len=32, cfg_scale=4.0, top_k=2000, format="emu3")


def llamagen_shape(images: int) -> dict:
    """LlamaGen-style class-conditional ImageNet 256: GPT-XL, BOS + a class token as the prompt, 16 x 16
    codes of a 16,384-entry codebook (256 tokens, no structure tokens), CFG 4, top-k 2000."""
    return dict(model="llamagen-gpt-xl", vocab=LLAMAGEN_VOCAB, image_codes=LLAMAGEN_CODES, images=images,
                grid=(16, 16), prompt_len=2, cfg_scale=4.0, top_k=2000, format="llamagen")


DISCRETE_SHAPES = {"llama-3.2-1b-v161k-16x24x24": emu3_shape(16, 24),  # 609 tokens per span
                   # a quarter of the tokens: what --quick runs, transformers' generate taking tens of seconds
                   "llama-3.2-1b-v161k-8x16x16": emu3_shape(8, 16),
                   "llama-3.2-1b-v161k-1x32x32": emu3_shape(1, 32),  # one Emu3-shaped 1.1k-token image
                   **{f"llamagen-xl-b{images}-16x16": llamagen_shape(images) for images in (1, 8, 64)}}
DISCRETE_SMOKE_SHAPES = {"tiny-2x3x3": dict(model="tiny", vocab=301, image_codes=100, images=2, grid=(3, 3),
                                            prompt_len=5, cfg_scale=4.0, top_k=20, format="emu3"),
                         "tiny-llamagen-3x4x4": dict(model="tiny", vocab=150, image_codes=64, images=3, grid=(4, 4),
                                                     prompt_len=2, cfg_scale=4.0, top_k=20, format="llamagen")}
DISCRETE_ANCHORS = ("transformers", "unimm[eager]")

CONTINUOUS_TARGET = "continuous: report only, s/image beside LlamaGen on vLLM's published 0.6 s/image"
LLAMAGEN_VLLM = "LlamaGen GPT-XL (775M) on vLLM, A100, published: 0.6 s/image"
# UniFluid-style: 16 x 16 continuous tokens per image (BOI then the tokens, random order, next-position
# embeddings), a MAR-B-sized diffusion head (width 1024, depth 6) on 16-channel tokens, 100 steps, CFG
CONTINUOUS_SHAPES = {f"llama-3.2-1b-{images}x16x16-mar-b": dict(model="llama-3.2-1b", text_vocab=128256,
                                                                  images=images, grid=(16, 16), token_dim=16,
                                                                  head=(1024, 6), diffusion_steps=100, prompt_len=32,
                                                                  cfg_scale=3.0)
                     for images in (16, 1)}
CONTINUOUS_SMOKE_SHAPES = {"tiny-2x2x3": dict(model="tiny", text_vocab=150, images=2, grid=(2, 3), token_dim=4,
                                              head=(32, 2), diffusion_steps=5, prompt_len=5, cfg_scale=3.0)}
# an untrained head's clean-token estimates are unbounded (DiffusionHead.sample): keep what is fed back finite
CLIP_DENOISED = 5.0


def gen_hf_config(model: str, vocab: int):
    return llama_config(GEN_MODELS[model], vocab, pad_token_id=0, bos_token_id=BOS, eos_token_id=None)


def gen_decoder(model: str, vocab: int, run) -> Decoder:
    """A randomly initialised Llama-shaped unimm decoder (transformers' config, so the anchor matches)."""
    torch.manual_seed(0)
    with torch.device(run.device):
        return Decoder.from_config(gen_hf_config(model, vocab)).to(run.dtype).eval()


def gen_prompts(spec: dict, vocab_size: int) -> torch.Tensor:
    """``[images, prompt_len]`` text ids: BOS, then random text tokens (below the special tokens)."""
    ids = torch.randint(2, vocab_size, (spec["images"], spec["prompt_len"]), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS
    return ids


def unimm_call(model: UnifiedModel, segments: list, image: ImageSpec, cuda_graphs: bool, device: torch.device):
    """One generation call of unimm: an image for every prompt, guided against the prompt BOS alone
    (what caption dropout trains), sampled with a generator seeded afresh each call."""
    def call():
        generator = torch.Generator(device).manual_seed(0)
        return model.generate(segments, max_new_tokens=0, image=image, start_image=True,
                              uncond_prompts=[[Text([BOS])]] * len(segments), generator=generator,
                              cuda_graphs=cuda_graphs)
    return call


def time_generation(run, fn, timing: dict) -> dict:
    if run.smoke:
        timing = GEN_SMOKE_TIMING
    elif run.quick:
        timing = GEN_ANCHOR_QUICK_TIMING if timing is GEN_ANCHOR_TIMING else GEN_QUICK_TIMING
    return run.time(fn, **timing)


def hf_generate_discrete(decoder: Decoder, vocab: VocabLayout, spec: dict, prompts: torch.Tensor, run):
    """transformers' ``generate`` on the same weights: sampling with top-k, CFG through
    ``guidance_scale`` + ``negative_prompt_ids`` (its UnbatchedClassifierFreeGuidanceLogitsProcessor: a
    second forward per step over the unconditional prompts, with their own cache) and the span's
    layout (structure tokens forced, codes elsewhere) as a logits processor, as Emu3's own generation
    does (LlamaGen's span is codes only)."""
    import transformers

    class SpanLayout(transformers.LogitsProcessor):
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

    model = llama_for_causal_lm(gen_hf_config(spec["model"], vocab.size), run.dtype, run.device)
    state = {name if name == "lm_head.weight" else f"model.{name}": tensor
             for name, tensor in decoder.state_dict().items()}
    model.load_state_dict(state)
    model.eval()
    layout = span_layout(vocab, spec)
    cond = prompts.to(run.device)
    uncond = torch.full((cond.shape[0], 1), BOS, dtype=torch.long, device=run.device)
    processor = SpanLayout(layout, cond.shape[1], vocab.image_codes[0])

    def call():
        with torch.no_grad():
            return model.generate(cond, attention_mask=torch.ones_like(cond), max_new_tokens=len(layout),
                                  min_new_tokens=len(layout), do_sample=True, top_k=spec["top_k"], top_p=1.0,
                                  temperature=1.0, guidance_scale=spec["cfg_scale"], negative_prompt_ids=uncond,
                                  logits_processor=transformers.LogitsProcessorList([processor]),
                                  pad_token_id=0)
    return call, layout


def span_layout(vocab: VocabLayout, spec: dict) -> list[int]:
    """The tokens of one image span of the shape's format as ``pack`` lays them out: structure ids,
    -1 at codes."""
    grid = spec["grid"]
    image = DiscreteImage(torch.zeros(grid, dtype=torch.long), loss=False, format=IMAGE_FORMATS[spec["format"]])
    batch = pack([[image]], 4 * grid[0] * grid[1] + 16, vocab=vocab)
    ids = batch.input_ids[0, :batch.placements[0][2]]
    return torch.where(ids >= vocab.image_codes[0], -1, ids).tolist()


def bench_discrete(name: str, spec: dict, run) -> list[dict]:
    text_size = spec["vocab"] - spec["image_codes"] - len(DEFAULT_SPECIAL_TOKENS)
    vocab = VocabLayout(text_size, DEFAULT_SPECIAL_TOKENS, spec["image_codes"])
    decoder = gen_decoder(spec["model"], vocab.size, run)
    model = UnifiedModel(decoder, vocab)
    prompts = gen_prompts(spec, text_size)
    image = ImageSpec("discrete", shape=spec["grid"], format=IMAGE_FORMATS[spec["format"]],
                      cfg_scale=spec["cfg_scale"], temperature=1.0, top_k=spec["top_k"])
    span = len(span_layout(vocab, spec))
    segments = [[Text(row.tolist())] for row in prompts]

    results, codes = [], {}
    for impl, graphs in (("unimm", True), ("unimm[eager]", False)):
        call = unimm_call(model, segments, image, graphs, run.device)
        out = call()
        codes[impl] = torch.stack([continuation[0].codes for continuation in out])
        timing = time_generation(run, call, GEN_TIMING)
        results.append(generation_result(name, impl, spec, span, timing))
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
        result = generation_result(name, "transformers", spec, span, timing)
        result["layout_ok"] = bool(layout_ok)
    except (ImportError, RuntimeError, TypeError, ValueError) as error:  # not importable, out of memory, API drift
        result.update(available=False, reason=f"{type(error).__name__}: {error}".splitlines()[0])
        print(f"{name:>30} {'transformers':>14}  n/a: {result['reason']}")
    results.append(result)
    add_unimm_speedups(results, DISCRETE_ANCHORS)
    return results


def generation_result(name: str, impl: str, spec: dict, span: int, timing: dict, **extra) -> dict:
    """One timed generation call: per image and per generated token, and what the caller checked."""
    seconds = timing["median_ms"] / 1e3
    result = dict(shape=name, impl=impl, available=True, **timing, tokens_per_image=span,
                  s_per_image=seconds / spec["images"], images_per_s=spec["images"] / seconds,
                  tokens_per_s=spec["images"] * span / seconds, ms_per_step=timing["median_ms"] / span, **extra)
    print(f"{name:>30} {impl:>14}  {seconds:8.3f} s/call  {result['s_per_image']:7.3f} s/image  "
          f"{result['tokens_per_s']:9.1f} tokens/s  {result['ms_per_step']:7.3f} ms/step")
    return result


def judge_discrete(results: list[dict], shapes: dict, run) -> bool | None:
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
                 f"({spec['format']}) CFG {spec['cfg_scale']} top-k {spec['top_k']}",
        "impl": result["impl"],
        "median s/call": show(result, "median_ms", ".3f", 1e-3) if available else "n/a",
        "s/image": show(result, "s_per_image", ".3f"),
        "tokens/s": show(result, "tokens_per_s", ".0f"),
        "images/s": show(result, "images_per_s", ".2f"),
        "ms/step": show(result, "ms_per_step", ".3f"),
        "speedup vs transformers": show(speedup, "transformers", ".2f"),
        "speedup vs unimm[eager]": show(speedup, "unimm[eager]", ".2f"),
    }


def bench_continuous(name: str, spec: dict, run) -> list[dict]:
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
        call = unimm_call(model, segments, image, graphs, run.device)
        out = call()
        finite = all(bool(torch.isfinite(c[0].features).all()) for c in out)
        timing = time_generation(run, call, GEN_TIMING)
        results.append(generation_result(name, impl, spec, span, timing,
                                         features_shape=list(out[0][0].features.shape), finite=finite))
    add_unimm_speedups(results, ("unimm[eager]",))
    print(f"reference: {LLAMAGEN_VLLM} (not run here)")
    return results


def judge_continuous(results: list[dict], shapes: dict, run) -> None:
    """The issue sets no target: latency per image is reported beside LlamaGen on vLLM's."""
    return None


def continuous_table_row(result: dict, spec: dict) -> dict:
    return {
        "shape": f"{spec['model']} {spec['images']} x {spec['grid'][0]}x{spec['grid'][1]} tokens, head "
                 f"{spec['head'][0]}/{spec['head'][1]}, {spec['diffusion_steps']} steps, CFG {spec['cfg_scale']}",
        "impl": result["impl"],
        "median s/call": show(result, "median_ms", ".3f", 1e-3),
        "s/image": show(result, "s_per_image", ".3f"),
        "tokens/s": show(result, "tokens_per_s", ".0f"),
        "ms/step": show(result, "ms_per_step", ".3f"),
        "speedup vs unimm[eager]": show(result.get("speedup"), "unimm[eager]", ".2f"),
    }
