"""The ``unimm demo`` pipeline: train a small unified model from scratch on procedural shapes,
then measure what it learned.

1. Data (``unimm.demo.data``): coloured shapes at positions with captions; a training pool and a
   held-out set drawn from another stream of the same seed.
2. Image tokenizers (``unimm.demo.tokenizer``), fitted on the training pool: 4 x 4 patches as
   k-means VQ codes (``VectorQuantizer``; an 8 x 8 grid per image) and 8 x 8 patches as
   PCA-whitened continuous tokens (a 4 x 4 grid). Coarser continuous tokens keep the diffusion
   head's per-token choices easy: with 4 x 4 patches the first patch of a shape is a rare event
   at every position (where exactly the shape starts), and a small diffusion head samples such
   minority modes far less often than their probability (measured: ~19% against the code
   softmax's ~67% at the same positions), so shapes started late and drifted.
3. A ``UnifiedModel`` (a Llama-style ``Decoder``, text vocabulary = the caption words, plus
   special tokens and the image codes; an input projector and a ``DiffusionHead`` for the
   continuous tokens; learnable 2D image positions) trained on three tasks mixed in every packed
   batch (``unimm.models.sequence.pack``):
     * captioning: ``[BOS] <image_start> features <image_end> describe the image`` as one
       bidirectional prefix, then the caption, causal, with its loss;
     * text-to-image over codes: ``[BOS] draw <caption> <boi> codes <eoi>``;
     * text-to-image over continuous tokens: ``[BOS] draw <caption> <image_start> tokens
       <image_end>``, each token predicted by the diffusion head from the state before it.
   The begin token names the output modality. The caption of a text-to-image example is dropped
   (``[BOS] draw`` alone) with probability ``caption_dropout``, which trains the unconditional
   model that classifier-free guidance needs.
4. Evaluation on held-out images and captions: greedy captions scored per attribute;
   generated images from both paths (with CFG) read back by the rule-based ``judge``.
5. Outputs under ``out``: ``samples.png`` (generated images with their prompts), ``loss.png``,
   ``metrics.json``; a summary table on stdout.

Generation is ``UnifiedModel.generate`` (``unimm.models.generation``): prompts prefilled into a
static KV cache, one token per step, the image's structure tokens written by the engine, codes
sampled over the code block and continuous tokens by the diffusion head, ``[cond; uncond]``
rows for classifier-free guidance, the decode step in a CUDA graph on a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import tempfile
import time

import numpy as np
import torch

from unimm.demo import data, report
from unimm.demo.documents import CODE_FORMAT, ENCODER, FEATURE_FORMAT, SPECIAL_TOKENS, Documents
from unimm.demo.tokenizer import PatchFeatureTokenizer, PatchVQTokenizer, psnr, to_uint8
from unimm.models import (
    ContinuousImage,
    Decoder,
    DecoderConfig,
    DiffusionHead,
    DiscreteImage,
    ImageSpec,
    Text,
    UnifiedModel,
    pack,
)

TASKS = ("caption", "codes", "features")
# bound on each diffusion step's estimate of a clean token: the tokens are standardised (|x| of a
# few units), and an imperfect head's first steps would otherwise throw samples far off
CLIP_DENOISED = 5.0
MAX_SEED = 2**63 - 2  # torch generators take 64-bit seeds; evaluation uses seed + 1


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything a demo run depends on besides the seed and the device.

    Data: ``train_images`` in the pool, ``eval_images`` held out (each task is scored on all of
    them). Tokenizers: ``num_codes`` VQ codes of 4 x 4 patches; continuous tokens of
    ``feature_patch``-sized patches with ``feature_dims`` PCA dimensions. Model: decoder sizes,
    diffusion head ``head_width`` / ``head_depth`` / ``diffusion_batch_mul``. Training: each step
    packs ``rows * docs_per_row`` documents, the tasks in turn, into rows of ``max_tokens`` (the
    default fits two documents of each task in a row). Generation: CFG scales, code sampling
    temperature / top-k, diffusion steps and temperature.
    """

    steps: int = 1500
    train_images: int = 6000
    eval_images: int = 300
    grid_images: int = 16
    num_codes: int = 256
    feature_patch: int = 8
    feature_dims: int = 32
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
    intermediate_size: int = 384
    head_width: int = 256
    head_depth: int = 2
    diffusion_batch_mul: int = 4
    rows: int = 8
    docs_per_row: int = 6
    max_tokens: int = 264
    learning_rate: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    caption_dropout: float = 0.1
    code_cfg_scale: float = 2.0
    code_temperature: float = 0.7
    code_top_k: int | None = 40
    feature_cfg_scale: float = 3.0
    diffusion_steps: int = 50
    diffusion_temperature: float = 1.0
    eval_batch: int = 100
    log_every: int = 10

    def __post_init__(self):
        for name in ("steps", "train_images", "eval_images", "num_codes", "feature_dims", "rows", "docs_per_row",
                     "max_tokens", "eval_batch", "log_every", "diffusion_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig.{name} must be a positive int, got {value!r}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"DemoConfig.caption_dropout must be in [0, 1), got {self.caption_dropout!r}")

    def replace(self, **changes) -> DemoConfig:
        return dataclasses.replace(self, **changes)


PRESETS = {
    # 2 CPU cores, <= 10 minutes end to end
    "default": DemoConfig(),
    # a larger model and longer run for a GPU (minutes on an H100)
    "gpu": DemoConfig(steps=3000, train_images=20000, eval_images=1000, num_codes=512, hidden_size=256, num_layers=6,
                      num_heads=8, head_dim=32, intermediate_size=768, head_width=512, head_depth=3, rows=32,
                      learning_rate=1e-3, warmup_steps=200, eval_batch=500, diffusion_steps=100),
    # seconds on a CPU: checks the pipeline end to end (CI), learns little
    "smoke": DemoConfig(steps=30, train_images=300, eval_images=8, grid_images=4, num_codes=64, feature_dims=16,
                        hidden_size=32, num_layers=2, num_heads=2, head_dim=16, intermediate_size=64, head_width=32,
                        head_depth=1, rows=2, learning_rate=3e-3, warmup_steps=5, eval_batch=8, diffusion_steps=5,
                        log_every=1),
}


# ---------------------------------------------------------------------------------------------
# Generation (UnifiedModel.generate: KV cache, CUDA graphs on a GPU, CFG rows)
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_captions(model: UnifiedModel, docs: Documents, features: torch.Tensor, max_words: int = 12) -> list[str]:
    """Greedy captions of images given as continuous tokens ``[N, L, F]``."""
    rows = model.generate([docs.caption_prefix(f) for f in features], max_new_tokens=max_words,
                          stop_tokens=docs.words.eos_id, temperature=0.0)
    return [docs.words.decode([i for segment in row if isinstance(segment, Text) for i in segment.ids])
            for row in rows]


@torch.no_grad()
def generate_codes(model: UnifiedModel, docs: Documents, captions: list[str], config: DemoConfig,
                   generator: torch.Generator) -> torch.Tensor:
    """Codes ``[N, grid, grid]``: ``[BOS] draw <caption>``, then ``<boi>`` and one code per step
    from the code block, guided against ``[BOS] draw``."""
    spec = ImageSpec("discrete", shape=(docs.code_grid,) * 2, format=CODE_FORMAT, cfg_scale=config.code_cfg_scale,
                     temperature=config.code_temperature, top_k=config.code_top_k)
    prompts, uncond = docs.draw_prompts(captions)
    rows = model.generate(prompts, max_new_tokens=0, image=spec, start_image=True, uncond_prompts=uncond,
                          generator=generator)
    return torch.stack([next(s.codes for s in row if isinstance(s, DiscreteImage)) for row in rows])


@torch.no_grad()
def generate_features(model: UnifiedModel, docs: Documents, captions: list[str], config: DemoConfig,
                      generator: torch.Generator) -> torch.Tensor:
    """Continuous tokens ``[N, grid * grid, F]``: after ``<image_start>`` each token is sampled
    by the diffusion head from the last hidden state (guided against ``[BOS] draw``) and fed
    back through the input projector."""
    spec = ImageSpec("continuous", shape=(docs.feature_grid,) * 2, format=FEATURE_FORMAT,
                     cfg_scale=config.feature_cfg_scale, diffusion_steps=config.diffusion_steps,
                     diffusion_temperature=config.diffusion_temperature, clip_denoised=CLIP_DENOISED, encoder=ENCODER)
    prompts, uncond = docs.draw_prompts(captions)
    rows = model.generate(prompts, max_new_tokens=0, image=spec, start_image=True, uncond_prompts=uncond,
                          generator=generator)
    return torch.stack([next(s.features for s in row if isinstance(s, ContinuousImage)) for row in rows])


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def build_model(config: DemoConfig, words: data.WordTokenizer, grid: int) -> UnifiedModel:
    """A Llama-style decoder over the caption words, expanded with the special tokens and the image
    codes, with the continuous tokens' input projector and diffusion head, and learnable 2D
    positions for image grids up to ``grid`` x ``grid``."""
    decoder = Decoder(DecoderConfig(
        family="llama", vocab_size=words.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_layers=config.num_layers, num_heads=config.num_heads,
        num_kv_heads=config.num_heads, head_dim=config.head_dim, max_position_embeddings=config.max_tokens))
    head = DiffusionHead(config.feature_dims, config.hidden_size, config.head_width, config.head_depth)
    return UnifiedModel.from_decoder(decoder, num_image_codes=config.num_codes, special_tokens=SPECIAL_TOKENS,
                                     feature_dims={ENCODER: config.feature_dims}, continuous_head=head,
                                     image_grid=(grid, grid), image_vocab_range=True,
                                     diffusion_batch_mul=config.diffusion_batch_mul)


def _learning_rate(config: DemoConfig, step_index: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step_index < config.warmup_steps:
        return config.learning_rate * (step_index + 1) / config.warmup_steps
    progress = (step_index - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclasses.dataclass
class Prepared:
    """The data and the fitted tokenizers of a run, with the training pool pre-tokenized."""

    train: data.ShapeSet
    test: data.ShapeSet
    vq: PatchVQTokenizer
    continuous: PatchFeatureTokenizer
    train_codes: torch.Tensor  # int64 [N, grid, grid], CPU
    train_features: torch.Tensor  # [N, grid * grid, feature_dims], CPU
    test_features: torch.Tensor
    metrics: dict  # reconstruction PSNR and what the judge reads from reconstructions (the ceilings)

    @property
    def expected(self) -> list[tuple[str, str, str]]:
        return [self.test.labels(i) for i in range(len(self.test))]


def prepare(config: DemoConfig, seed: int, device: torch.device) -> Prepared:
    """Draws the data, fits both tokenizers on the training pool and tokenizes it."""
    train = data.make_shapes(config.train_images, seed, split="train")
    test = data.make_shapes(config.eval_images, seed, split="test")
    vq = PatchVQTokenizer(config.num_codes).to(device)
    kmeans_errors = vq.fit(train.images, generator=torch.Generator().manual_seed(seed))
    continuous = PatchFeatureTokenizer(patch_size=config.feature_patch, dims=config.feature_dims).to(device)
    variance_kept = continuous.fit(train.images)
    test_features = continuous.encode(test.images)
    expected = [test.labels(i) for i in range(len(test))]
    metrics = {}
    for name, images in (("vq", to_uint8(vq.decode(vq.encode(test.images)))),
                         ("continuous", to_uint8(continuous.decode(test_features)))):
        metrics[name] = dict(psnr_db=psnr(images, test.images),
                             judged=data.attribute_accuracy([tuple(data.judge(i)) for i in images], expected))
    metrics["vq"].update(num_codes=config.num_codes, kmeans_mse=kmeans_errors)
    metrics["continuous"].update(patch_size=config.feature_patch, dims=config.feature_dims,
                                 variance_kept=variance_kept)
    return Prepared(train, test, vq, continuous, vq.encode(train.images).cpu(), continuous.encode(train.images).cpu(),
                    test_features.cpu(), metrics)


LOSSES = {"loss": "total", "text_loss": "text (captions, structure tokens)", "image_code_loss": "image codes",
          "continuous_loss": "continuous tokens (diffusion)"}


def train(config: DemoConfig, model: UnifiedModel, prepared: Prepared, seed: int, *, quiet: bool = False) -> dict:
    """Trains ``model`` on the three tasks; returns the loss history (``steps`` and, per loss,
    its mean over each ``log_every`` steps)."""
    device = model.decoder.embed_tokens.weight.device
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    docs = Documents(data.WordTokenizer(), prepared.vq.grid, prepared.continuous.grid)
    pool = prepared.train
    matrices = [p for name, p in model.named_parameters() if p.dim() >= 2 and "embed" not in name]
    others = [p for name, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in name)]
    optimizer = torch.optim.AdamW([dict(params=matrices, weight_decay=config.weight_decay),
                                   dict(params=others, weight_decay=0.0)], lr=config.learning_rate, betas=(0.9, 0.95),
                                  foreach=True)
    history = dict(steps=[], **{name: [] for name in LOSSES})
    pending = {name: [] for name in LOSSES}
    model.train()
    bar = report.progress(range(config.steps), desc="train", disable=quiet)
    for step_index in bar:
        documents = []
        for i in range(config.rows * config.docs_per_row):
            index = int(rng.integers(len(pool)))
            task = TASKS[i % len(TASKS)]
            caption = pool.captions[index]
            if task == "caption":
                documents.append(docs.caption(prepared.train_features[index], caption))
            else:
                kept = None if rng.random() < config.caption_dropout else caption
                documents.append(docs.codes(prepared.train_codes[index], kept) if task == "codes"
                                 else docs.features(prepared.train_features[index], kept))
        batch = pack(documents, config.max_tokens, vocab=model.vocab)
        batch = batch.to(device)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(config, step_index)
        losses = model(batch, generator=generator)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for name in LOSSES:
            pending[name].append(losses[name].detach())
        if (step_index + 1) % config.log_every == 0 or step_index + 1 == config.steps:
            for name in LOSSES:
                history[name].append(torch.stack(pending[name]).float().mean().item())
                pending[name] = []
            history["steps"].append(step_index + 1)
            bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", text=f"{history['text_loss'][-1]:.3f}",
                            codes=f"{history['image_code_loss'][-1]:.3f}",
                            diffusion=f"{history['continuous_loss'][-1]:.3f}")
    bar.close()
    model.eval()
    return history


def evaluate(config: DemoConfig, model: UnifiedModel, prepared: Prepared, seed: int, *, quiet: bool = False) -> dict:
    """Held-out captions and images from both paths, judged: ``accuracy`` per task, and the
    generated ``captions``, ``code_images``, ``feature_images`` and their ``judged`` attributes."""
    device = model.decoder.embed_tokens.weight.device
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    docs = Documents(data.WordTokenizer(), prepared.vq.grid, prepared.continuous.grid)
    test, expected = prepared.test, prepared.expected
    batches = list(_batches(list(range(len(test))), config.eval_batch))
    captions, code_images, feature_images = [], [], []
    for indices in report.progress(batches, desc="eval: captions", disable=quiet):
        captions += generate_captions(model, docs, prepared.test_features[indices].to(device))
    for indices in report.progress(batches, desc="eval: images from codes", disable=quiet):
        codes = generate_codes(model, docs, [test.captions[i] for i in indices], config, generator)
        code_images.append(to_uint8(prepared.vq.decode(codes)))
    for indices in report.progress(batches, desc="eval: images from continuous tokens", disable=quiet):
        features = generate_features(model, docs, [test.captions[i] for i in indices], config, generator)
        feature_images.append(to_uint8(prepared.continuous.decode(features)))
    code_images, feature_images = np.concatenate(code_images), np.concatenate(feature_images)
    judged = dict(codes=[tuple(data.judge(image)) for image in code_images],
                  continuous=[tuple(data.judge(image)) for image in feature_images])
    accuracy = dict(captions=data.attribute_accuracy([data.parse_caption(c) for c in captions], expected),
                    images_from_codes=data.attribute_accuracy(judged["codes"], expected),
                    images_from_continuous=data.attribute_accuracy(judged["continuous"], expected))
    return dict(accuracy=accuracy, captions=captions, code_images=code_images, feature_images=feature_images,
                judged=judged)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device a run uses: ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``),
    by default CUDA when available, else the CPU. A ValueError says why a device cannot run
    here (not a device name, CUDA absent, no such GPU), before anything is computed."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, str | torch.device):
        raise TypeError(f"device must be a str or a torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{device!r} is not a torch device (try cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{device} asked for, but CUDA is not available here (torch {torch.__version__}, CUDA "
                             f"{torch.version.cuda or 'none'}); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{device} asked for, but this machine has {count} CUDA device(s)")
        return device
    if device.type == "meta":
        raise ValueError("meta tensors hold no data: the demo cannot train on the meta device")
    try:  # another accelerator type: usable if it can hold a tensor
        torch.empty(1, device=device)
    except Exception as err:
        reason = (str(err).strip().strip("'\"").split(". ")[0].splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{device} is not usable here: {reason[:160]}") from None
    return device


def output_dir(out: str | os.PathLike) -> pathlib.Path:
    """``out`` as a directory the run can write its files to: created with its parents if
    missing, then probed with a temporary file. A ValueError names the path and the reason (an
    existing file, a parent that is a file, a read-only or virtual file system)."""
    if not isinstance(out, str | os.PathLike):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    if not os.fspath(out):
        raise ValueError("the output directory must be a non-empty path")
    path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"cannot create or write the output directory {path}: {err.strerror or err}") from None
    return path


def _percent_row(task: str, accuracy: dict) -> dict:
    return dict(task=task, **{key: f"{100 * accuracy[key]:.1f}%" for key in ("colour", "shape", "position", "all")})


def run(config: DemoConfig, out: str | pathlib.Path, *, device: str | torch.device | None = None, seed: int = 0,
        quiet: bool = False) -> dict:
    """Prepares, trains and evaluates; writes ``samples.png``, ``loss.png`` and ``metrics.json``
    under ``out`` and returns the metrics. ``device``: default CUDA when available, else CPU (on
    CUDA, fp32 matmuls may then use TF32, process-wide). ``quiet``: no progress bars, no printing.
    A device that cannot run here or an ``out`` that cannot be written is a ValueError before any
    work (``resolve_device``, ``output_dir``)."""
    started = time.perf_counter()
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a DemoConfig, got {type(config).__name__}")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be an int in [0, {MAX_SEED}], got {seed!r}")
    device = resolve_device(device)
    out = output_dir(out)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def say(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    prepared = prepare(config, seed, device)
    tokenizers = prepared.metrics
    say(f"data: {len(prepared.train)} training and {len(prepared.test)} held-out images of {len(data.COLOURS)} "
        f"colours x {len(data.SHAPES)} shapes x {len(data.POSITIONS)} positions")
    say(f"tokenizers: {config.num_codes} VQ codes, PSNR {tokenizers['vq']['psnr_db']:.1f} dB; continuous "
        f"{config.feature_dims} dims ({100 * tokenizers['continuous']['variance_kept']:.1f}% of the variance), "
        f"PSNR {tokenizers['continuous']['psnr_db']:.1f} dB")
    torch.manual_seed(seed)
    model = build_model(config, data.WordTokenizer(), max(prepared.vq.grid, prepared.continuous.grid)).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    say(f"model: {parameters / 1e6:.2f} M parameters, vocabulary {model.vocab.size} = {model.vocab.text_size} words "
        f"+ {len(SPECIAL_TOKENS)} special tokens + {config.num_codes} codes, on {device}")
    train_started = time.perf_counter()
    history = train(config, model, prepared, seed, quiet=quiet)
    train_seconds = time.perf_counter() - train_started
    eval_started = time.perf_counter()
    results = evaluate(config, model, prepared, seed, quiet=quiet)
    eval_seconds = time.perf_counter() - eval_started

    expected, prompts = prepared.expected, prepared.test.captions
    shown = min(config.grid_images, len(prompts))
    tiles, labels = [], []
    for i in range(shown):
        for path, images in (("codes", results["code_images"]), ("continuous", results["feature_images"])):
            judged = results["judged"][path][i]
            tiles.append(images[i])
            verdict = "ok" if judged == expected[i] else "read: " + " ".join(str(v) for v in judged)
            labels.append(f"{prompts[i]}\n[{path}] {verdict}")
    report.image_grid(np.stack(tiles), labels, out / "samples.png", columns=8, label_lines=4)
    report.loss_curves({label: (history["steps"], history[name]) for name, label in LOSSES.items()},
                       out / "loss.png", title="unimm demo: training loss")
    first, last = ({name: history[name][i] for name in LOSSES} for i in (0, -1))
    metrics = dict(
        config=dataclasses.asdict(config), seed=seed, device=str(device), parameters=parameters,
        accuracy=results["accuracy"], tokenizers=tokenizers, loss=dict(first=first, last=last, history=history),
        examples=[dict(prompt=prompts[i], caption=results["captions"][i], from_codes=results["judged"]["codes"][i],
                       from_continuous=results["judged"]["continuous"][i]) for i in range(shown)],
        seconds=dict(total=time.perf_counter() - started, train=train_seconds, eval=eval_seconds,
                     per_step=train_seconds / config.steps))
    report.write_metrics(out / "metrics.json", metrics)
    if not quiet:
        rows = [_percent_row(task, accuracy) for task, accuracy in results["accuracy"].items()]
        rows += [_percent_row(f"tokenizer ceiling: {name}", t["judged"]) for name, t in tokenizers.items()]
        print("\n" + report.summary_table(rows, ["task", "colour", "shape", "position", "all"]))
        print(f"\nloss {first['loss']:.3f} -> {last['loss']:.3f} over {config.steps} steps "
              f"({train_seconds:.0f} s training, {eval_seconds:.0f} s evaluation, "
              f"{metrics['seconds']['total']:.0f} s in all)")
        print(f"wrote {out / 'samples.png'}, {out / 'loss.png'}, {out / 'metrics.json'}")
    return metrics
