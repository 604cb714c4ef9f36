"""Generation: prefill into a static ``KVCache``, then one token per step, text and images alike.

``Decoder.generate`` (token ids in, token ids out) and ``UnifiedModel.generate`` (segments in,
segments out) both run :class:`_Engine`:

1. Prefill: every prompt row at once through ``attention`` with the prompt's ``AttentionMask``
   (causal for ids; ``pack``'s spans for segments, so bidirectional prefixes and image spans
   mean what they mean in training), writing the static cache ``[R, max_len, Hkv, D]``; each
   row's cache length is its own prompt length (ragged prompts need no left padding).
2. Decode: per step, every row produces one token from the hidden state of its last token:
   a text token (``sample_tokens`` over text and special tokens), a structure token the engine
   writes itself (BOI, size, image token, EOL, EOF, EOI from the image's ``ImageFormat``, laid
   out exactly as ``pack`` lays them out), an image code
   (``sample_tokens`` over the code block, with classifier-free guidance), or a continuous token
   (``DiffusionHead.sample`` / ``RegressionHead.sample``). That token's input embedding
   (token embedding or projected features, plus 2D and next-position embeddings inside images,
   as ``UnifiedModel.embed`` builds them in training) goes through one decoder step.
3. The decoder step (all layers over a ``[R, 1]`` input; full-attention layers run
   ``decode_attention`` over the cache, the cache length advanced inside the step) has static
   shapes and reads nothing back, so on a GPU it is captured once per call in a CUDA graph
   (warmed up on a side stream) and replayed; on the CPU it runs eagerly.

Classifier-free guidance doubles the rows: ``[cond; uncond]``. Only the cond rows carry state;
the uncond rows are fed exactly the tokens chosen for their cond row (text included), so both
halves stay aligned token for token while their prompts differ.

Host work per step is a few Python operations per row. The host reads the device back only to
see text tokens (stop tokens, the image-begin token): a step in which every row is inside an
image, or a text step with nothing to watch for, makes no device read.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from unimm.kernels import AttentionMask, sample_tokens
from unimm.kernels.diffusion import check_sampling_options
from unimm.models.decoder import Decoder, KVCache
from unimm.models.heads import DiffusionHead, RegressionHead
from unimm.models.sequence import (
    EMU3_FORMAT, METAMORPH_FORMAT, PLAIN_FORMAT, Batch, ContinuousImage, DiscreteImage, Features, HybridImage,
    ImageFormat, Text, pack,
)

IMAGE_KINDS = ("discrete", "continuous", "regression")
# the segment defaults: DiscreteImage's (Emu3), ContinuousImage's (BOI ... EOI), MetaMorph's for regression
_DEFAULT_FORMATS = {"discrete": EMU3_FORMAT, "continuous": PLAIN_FORMAT, "regression": METAMORPH_FORMAT}
_TEXT, _IMAGE, _DONE = 0, 1, 2


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _check_sampling(prefix: str, temperature, top_k, top_p) -> None:
    if not (_is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{prefix}temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"{prefix}top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (_is_real(top_p) and 0 < top_p <= 1):
        raise ValueError(f"{prefix}top_p must be in (0, 1] or None, got {top_p!r}")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What an image made by ``UnifiedModel.generate`` looks like and how it is sampled.

    Args:
        kind: ``"discrete"``: VQ codes sampled from the code block of the vocabulary;
            ``"continuous"``: tokens sampled by the model's ``DiffusionHead`` (UniFluid, MAR);
            ``"regression"``: tokens predicted by its ``RegressionHead`` (MetaMorph).
        shape: ``(h, w)``, the token grid. Required for discrete images, for size and
            end-of-line tokens, for 2D position embeddings and for random order.
        num_tokens: the token count of a continuous image without a grid (default ``h * w``).
        format: the structure tokens (``ImageFormat``). None: the segment default of the kind:
            Emu3's (BOI, size, image token, EOL after each row, EOF, EOI) for discrete images,
            BOI ... EOI for continuous ones, ``<image_start>`` ... ``<image_end>`` for regression.
        cfg_scale: classifier-free guidance scale; 1 turns guidance off (no uncond rows).
        temperature, top_k, top_p: sampling of image codes (discrete).
        diffusion_steps, diffusion_temperature, clip_denoised: ``DiffusionHead.sample``'s
            ``num_steps``, ``temperature`` and ``clip_denoised`` (continuous).
        random_order: continuous tokens in a random order, one permutation per image drawn from
            the generator (UniFluid): needs ``shape`` and a model with next-position embeddings.
            Results are still in raster order (with the order in ``ContinuousImage.order``).
        encoder: the input projector that feeds generated continuous tokens back.
        max_images: how many images one row may generate.
    """

    kind: str
    shape: tuple[int, int] | None = None
    num_tokens: int | None = None
    format: ImageFormat | None = None
    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    diffusion_steps: int = 100
    diffusion_temperature: float = 1.0
    clip_denoised: float | None = None
    random_order: bool = False
    encoder: str = "image"
    max_images: int = 1

    def __post_init__(self):
        if self.kind not in IMAGE_KINDS:
            raise ValueError(f"ImageSpec.kind must be one of {IMAGE_KINDS}, got {self.kind!r}")
        if self.shape is not None:
            if not (isinstance(self.shape, Sequence) and len(self.shape) == 2
                    and all(_is_int(s) and s >= 1 for s in self.shape)):
                raise ValueError(f"ImageSpec.shape must be (h, w) positive ints, got {self.shape!r}")
            object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        if self.kind == "discrete" and self.shape is None:
            raise ValueError("ImageSpec.shape (h, w) is required for discrete images: it sets the code grid")
        if self.num_tokens is not None:
            if not (_is_int(self.num_tokens) and self.num_tokens >= 1):
                raise ValueError(f"ImageSpec.num_tokens must be a positive int, got {self.num_tokens!r}")
            if self.shape is not None and self.num_tokens != self.shape[0] * self.shape[1]:
                raise ValueError(f"ImageSpec.num_tokens ({self.num_tokens}) must be h * w of shape {self.shape}")
        elif self.shape is None:
            raise ValueError("ImageSpec needs shape=(h, w) or num_tokens")
        if self.format is None:
            object.__setattr__(self, "format", _DEFAULT_FORMATS[self.kind])
        elif not isinstance(self.format, ImageFormat):
            raise TypeError(f"ImageSpec.format must be an ImageFormat or None, got {type(self.format).__name__}")
        check_sampling_options(self.cfg_scale, self.diffusion_temperature, self.clip_denoised,
                               names=("ImageSpec.cfg_scale", "ImageSpec.diffusion_temperature",
                                      "ImageSpec.clip_denoised"))
        _check_sampling("ImageSpec.", self.temperature, self.top_k, self.top_p)
        if not (_is_int(self.diffusion_steps) and self.diffusion_steps >= 1):
            raise ValueError(f"ImageSpec.diffusion_steps must be a positive int, got {self.diffusion_steps!r}")
        if self.random_order:
            if self.kind == "discrete":
                raise ValueError("ImageSpec.random_order applies to continuous images only")
            if self.shape is None:
                raise ValueError("ImageSpec.random_order needs shape=(h, w): an order means grid cells")
            if self.format.end_of_line is not None:
                raise ValueError("ImageSpec.random_order cannot use a format with end-of-line tokens "
                                 "(rows are not contiguous in a random order)")
        if not (_is_int(self.max_images) and self.max_images >= 1):
            raise ValueError(f"ImageSpec.max_images must be a positive int, got {self.max_images!r}")

    @property
    def tokens(self) -> int:
        """Image tokens per image (codes or continuous tokens)."""
        return self.num_tokens if self.num_tokens is not None else self.shape[0] * self.shape[1]

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


# ---- prompts --------------------------------------------------------------------------------

def _token_bound(segment) -> int:
    """More tokens than ``pack`` writes for ``segment`` (the exact count comes from ``pack``)."""
    count = 8  # begin, image token, end, end of frame, separator
    for name in ("ids", "codes", "features"):
        value = getattr(segment, name, None)
        if isinstance(value, torch.Tensor):
            count += 2 * (value.shape[0] if name == "features" and value.dim() else value.numel())  # EOL per code
        elif isinstance(value, Sequence):
            count += len(value)
    fmt = getattr(segment, "format", None)
    if isinstance(fmt, ImageFormat) and fmt.size is not None:
        codes, shape = getattr(segment, "codes", None), getattr(segment, "shape", None)
        h, w = tuple(codes.shape) if isinstance(codes, torch.Tensor) and codes.dim() == 2 else (shape or (0, 0))
        count += len(fmt.size(h, w)) if callable(fmt.size) else len(str(h)) + len(str(w)) + 1
    return count


def _as_prompt(segment):
    """The segment as pure context: no loss, no continuous target (so nothing is permuted)."""
    if isinstance(segment, (Text, DiscreteImage, HybridImage)):
        return dataclasses.replace(segment, loss=False)
    if isinstance(segment, ContinuousImage):
        return dataclasses.replace(segment, role="input")
    return segment  # pack names what is wrong with it


def _pack_one(segments: list, vocab, what: str) -> tuple[Batch, int]:
    """``pack`` of one document alone in one row; returns the batch and the document's length."""
    if isinstance(segments, (Text, DiscreteImage, ContinuousImage, HybridImage, str, bytes)) or \
            not isinstance(segments, Sequence):
        raise ValueError(f"{what} must be a list of segments, got {type(segments).__name__}")
    segments = [_as_prompt(segment) for segment in segments]
    try:
        batch = pack([segments], sum(map(_token_bound, segments)) or 1, vocab=vocab)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{what}: {error}") from None
    return batch, batch.placements[0][2]


def _pack_prompts(model, prompts: list, names: list[str], device) -> tuple[Batch, torch.Tensor]:
    """One prompt per row, right-padded to the longest: the packed batch (on ``device``) and the
    int32 prompt lengths."""
    packed = [_pack_one(prompt, model.vocab, name) for prompt, name in zip(prompts, names)]
    seq = max(length for _, length in packed)

    def stack(field: str) -> torch.Tensor:
        return torch.cat([getattr(batch, field)[:, :seq] for batch, _ in packed])

    def features(field: str) -> dict[str, Features]:
        parts: dict[str, list[Features]] = {}
        for row, (batch, _) in enumerate(packed):
            for name, given in getattr(batch, field).items():  # flat positions of a 1-row batch are columns
                parts.setdefault(name, []).append(Features(given.values, given.positions + row * seq))
        return {name: Features(torch.cat([p.values for p in items]), torch.cat([p.positions for p in items]))
                for name, items in parts.items()}

    doc_ids, span_ids = stack("doc_ids"), stack("span_ids")
    batch = Batch(
        input_ids=stack("input_ids"), positions=stack("positions"), doc_ids=doc_ids, span_ids=span_ids,
        mask=AttentionMask.from_spans(doc_ids, span_ids), targets=stack("targets"), heads=stack("heads"),
        loss_weights=stack("loss_weights"), image_positions=stack("image_positions"),
        next_image_positions=stack("next_image_positions"), input_features=features("input_features"),
        added_features=features("added_features"), target_features=None, vocab=model.vocab,
    ).to(device)
    lens = torch.tensor([length for _, length in packed], dtype=torch.int32, device=device)
    return batch, lens


def unconditional_prompt(prompt: list) -> list:
    """The default unconditional prompt for classifier-free guidance: the prompt with its text
    replaced by nothing but its first token (BOS) when it starts with text, images kept: what
    caption dropout leaves of a training document."""
    if not isinstance(prompt, Sequence) or not prompt:
        raise ValueError("a prompt must be a non-empty list of segments")
    out = [segment for segment in prompt if not isinstance(segment, Text)]
    first = prompt[0]
    if isinstance(first, Text):  # its first id as given, unconverted: pack checks it
        ids = first.ids
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1)[:1]
        elif isinstance(ids, (list, tuple)):
            ids = list(ids[:1])
        if not (isinstance(ids, (torch.Tensor, list)) and len(ids) == 0):  # anything else goes on: pack names it
            out.insert(0, Text(ids))
    if not out:
        raise ValueError("the default unconditional prompt of this prompt is empty; pass uncond_prompts")
    return out


# ---- image layout ---------------------------------------------------------------------------

class _Plan:
    """The tokens of one generated image in generation order, shared by all its images: per entry
    the structure token id to write, or -1 for an image token; ``token[e]`` is an image token's
    index in generation order (-1 for structure). Read off ``pack`` of a dummy image, so the layout
    is the one training sees."""

    def __init__(self, spec: ImageSpec, model):
        vocab = model.vocab
        if spec.kind == "discrete":
            image = DiscreteImage(torch.zeros(spec.shape, dtype=torch.long), loss=False, format=spec.format)
        else:
            image = ContinuousImage(torch.zeros(spec.tokens, 1), shape=spec.shape, format=spec.format,
                                    encoder=spec.encoder)
        batch, length = _pack_one([image], vocab, "image")
        ids = batch.input_ids[0, :length]
        is_image = torch.zeros(length, dtype=torch.bool)
        if spec.kind == "discrete":
            is_image = ids >= vocab.image_codes[0]
        else:
            is_image[batch.input_features[spec.encoder].positions] = True
        self.ids = torch.where(is_image, -1, ids).tolist()
        self.token = (torch.cumsum(is_image.long(), 0) - 1).masked_fill(~is_image, -1).tolist()
        self.begin_id = vocab.special_id(spec.format.begin) if spec.format.begin is not None else None

    def __len__(self) -> int:
        return len(self.ids)


def _check_image(spec: ImageSpec, model) -> None:
    """What the model must have to make images of ``spec``."""
    vocab = model.vocab
    if spec.kind == "discrete" and vocab.num_image_codes == 0:
        raise ValueError("discrete images need image codes; the model has num_image_codes=0")
    if spec.kind != "discrete":
        want = DiffusionHead if spec.kind == "continuous" else RegressionHead
        if not isinstance(model.continuous_head, want):
            raise ValueError(f"{spec.kind} images need a {want.__name__} as continuous_head, the model has "
                             f"{type(model.continuous_head).__name__}")
        if spec.encoder not in model.input_projectors:
            raise ValueError(f"generated tokens are fed back through input projector {spec.encoder!r}, which the "
                             f"model lacks (it has {sorted(model.input_projectors)})")
        if model.input_projectors[spec.encoder].in_dim != model.continuous_head.token_dim:
            raise ValueError(f"input projector {spec.encoder!r} takes {model.input_projectors[spec.encoder].in_dim} "
                             f"features but the head makes {model.continuous_head.token_dim}")
        if spec.diffusion_steps > getattr(model.continuous_head, "train_steps", spec.diffusion_steps):
            raise ValueError(f"ImageSpec.diffusion_steps must be <= the head's train_steps "
                             f"{model.continuous_head.train_steps}, got {spec.diffusion_steps}")
    if spec.random_order and model.next_position_embed is None:
        raise ValueError("ImageSpec.random_order needs a model with next_position_embeddings: otherwise nothing "
                         "tells it which cell comes next")
    if model.image_grid is not None and spec.shape is not None:
        if spec.shape[0] > model.image_grid[0] or spec.shape[1] > model.image_grid[1]:
            raise ValueError(f"ImageSpec.shape {spec.shape} exceeds the model's image_grid {model.image_grid}")


# ---- the decode step ------------------------------------------------------------------------

class _DecodeStep:
    """One decoder step for every row: ``hidden = decoder(embeds [R, 1, H], cache)`` and
    ``cache.lens += 1``, from a static input buffer. With ``graphed``, the step is captured in a
    CUDA graph at its first call (after a warm-up on a side stream that compiles and autotunes
    its kernels) and replayed after that."""

    def __init__(self, decoder: Decoder, cache: KVCache, graphed: bool):
        self.decoder, self.cache = decoder, cache
        weight = decoder.embed_tokens.weight
        self.embeds = torch.zeros(cache.batch_size, 1, decoder.config.hidden_size, dtype=weight.dtype,
                                  device=weight.device)
        self.graphed = graphed
        self.graph = None
        self.hidden = None

    def __call__(self, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[R, H]`` of the tokens whose input embeddings are ``embeds [R, H]``."""
        self.embeds.copy_(embeds[:, None])
        if not self.graphed:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.hidden

    def _forward(self) -> torch.Tensor:
        hidden = self.decoder(inputs_embeds=self.embeds, cache=self.cache)[:, 0]
        self.cache.lens += 1
        return hidden

    def _capture(self) -> None:
        device = self.embeds.device
        lens = self.cache.lens.clone()
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # the real step later rewrites the cache rows these write
                self._forward()
                self.cache.lens.copy_(lens)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records, runs nothing: lens is unchanged
            self.hidden = self._forward()


# ---- the engine -----------------------------------------------------------------------------

class _Row:
    """Host state of one (cond) row."""

    __slots__ = ("mode", "entry", "text_left", "images_left", "image", "events", "orders")

    def __init__(self, text_left: int, images_left: int):
        self.mode = _TEXT if text_left > 0 else _DONE
        self.entry = 0  # the plan entry produced next (image mode)
        self.text_left = text_left
        self.images_left = images_left
        self.image = -1  # index of the current image
        # per produced token: ("text", step) | ("struct", image) | ("code", step, image, t)
        #                     | ("cont", feature row, image, t)
        self.events: list[tuple] = []
        self.orders: list[torch.Tensor | None] = []  # per image: its random order (raster cell of token t)


class _Engine:
    """Prefill, then the decode loop over rows ``[cond; uncond]`` (see the module docstring).

    ``model`` is the ``UnifiedModel`` (None for plain token generation with ``decoder``);
    ``text_range`` is the block text tokens are sampled from."""

    def __init__(self, decoder: Decoder, model, *, prompt_lens: torch.Tensor, text_range: tuple[int, int],
                 max_new_tokens: int, temperature, top_k, top_p, stop_tokens: frozenset[int],
                 image: ImageSpec | None, start_image: bool, generator, pad_id: int, cuda_graphs: bool,
                 max_len: int | None):
        self.decoder, self.model = decoder, model
        self.device = decoder.embed_tokens.weight.device
        self.text_range = text_range
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_tokens = stop_tokens
        self.image = image
        self.plan = _Plan(image, model) if image is not None else None
        self.guided = image is not None and image.guided
        self.batch = prompt_lens.shape[0] // 2 if self.guided else prompt_lens.shape[0]
        self.generator = generator
        self.pad_id = pad_id

        images = image.max_images if image is not None else 0
        budget = max_new_tokens + images * (len(self.plan) if self.plan is not None else 0)
        longest = int(prompt_lens.max())
        if max_len is None:
            max_len = longest + budget
        elif not (_is_int(max_len) and max_len >= longest + budget):
            raise ValueError(f"max_len={max_len!r} is too small: the longest prompt ({longest} tokens) plus what "
                             f"this call may generate ({budget}) needs {longest + budget}")
        self.cache = KVCache(decoder.config, prompt_lens.shape[0], max_len, device=self.device,
                             dtype=decoder.embed_tokens.weight.dtype)
        # prompt lengths were checked on the host and max_len holds the longest prompt plus the whole
        # budget, so every decode step's lengths are in range: the graphed step needs no range guard
        self.cache._lens_in_range = True
        self.prompt_lens = prompt_lens
        self.step = _DecodeStep(decoder, self.cache, graphed=cuda_graphs and self.device.type == "cuda")

        self.rows = [_Row(max_new_tokens, images) for _ in range(self.batch)]
        # the current image's order of every row: orders[b, t] is the raster cell of its token t
        self.orders = None if image is None else \
            torch.arange(image.tokens, device=self.device).repeat(self.batch, 1)
        if start_image:
            for b, row in enumerate(self.rows):
                self._start_image(row, b)
        self.step_ids: list[torch.Tensor] = []  # [B] per step
        self.features: list[torch.Tensor] = []  # continuous tokens, in the order of their "cont" events
        self.num_features = 0
        self._constants: dict[int, torch.Tensor] = {}

    # ---- bookkeeping -------------------------------------------------------------------------

    def _start_image(self, row: _Row, b: int) -> None:
        """Row ``b`` produces its image's first plan entry next (a sampled begin token is that entry)."""
        row.mode, row.entry = _IMAGE, 0
        row.images_left -= 1
        row.image += 1
        if self.image.random_order:
            self.orders[b] = torch.randperm(self.image.tokens, generator=self.generator, device=self.device)
        row.orders.append(self.orders[b].clone() if self.image.random_order else None)

    def _advance(self, row: _Row, b: int, own: list[int], nxt: list[int]) -> None:
        """The token at ``row.entry`` was produced: note which image tokens it is and predicts
        (for the 2D / next-position embeddings of its input) and move on."""
        plan = self.plan
        own[b] = plan.token[row.entry]
        nxt[b] = plan.token[row.entry + 1] if row.entry + 1 < len(plan) else -1
        row.entry += 1
        if row.entry == len(plan):
            row.mode = _TEXT if row.text_left > 0 else _DONE

    def _cells(self, token_index: list[int]) -> torch.Tensor | None:
        """``[B, 2]`` (row, col) grid cells of token ``token_index[b]`` (-1: none) of each row's
        current image; None when no row has one."""
        if max(token_index) < 0:
            return None
        if len(set(token_index)) == 1:  # every row at the same token: no transfer
            cells = self.orders[:, token_index[0]]
        else:
            index = torch.tensor(token_index, device=self.device)
            cells = self.orders.gather(1, index.clamp_min(0)[:, None])[:, 0]
            cells = torch.where(index >= 0, cells, -1)
        width = self.image.shape[1]
        return torch.where((cells >= 0)[:, None], torch.stack([cells // width, cells % width], -1), -1)

    def _constant(self, token: int, count: int) -> torch.Tensor:
        if token not in self._constants:
            self._constants[token] = torch.full((self.batch,), token, dtype=torch.long, device=self.device)
        return self._constants[token][:count]

    # ---- model adapters ----------------------------------------------------------------------

    def _logits(self, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if self.model is not None:
            return self.model.logits(hidden, (lo, hi))
        logits = F.linear(hidden, self.decoder.lm_head.weight[lo:hi])
        cap = self.decoder.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _inputs(self, ids, features, feature_rows, own, nxt) -> torch.Tensor:
        """Input embeddings ``[B, H]`` of the produced tokens, built as ``UnifiedModel.embed`` does."""
        x = self.decoder.embed_tokens(ids)
        model = self.model
        if features is not None:
            projected = model.project_features(features, self.image.encoder)
            x = projected if feature_rows is None else x.index_copy(0, feature_rows, projected)
        if model is None or self.image is None or self.image.shape is None:
            return x
        if model.image_position_embed is not None and (cells := self._cells(own)) is not None:
            x = x + model.image_position_embedding(cells).to(x.dtype)
        if model.next_position_embed is not None and (cells := self._cells(nxt)) is not None:
            x = x + model.image_position_embedding(cells, next_position=True).to(x.dtype)
        return x

    # ---- the loop ----------------------------------------------------------------------------

    def run(self, prefill: Callable[[KVCache], torch.Tensor]) -> list[_Row]:
        """``prefill(cache)`` writes the prompts into the empty cache and returns their hidden
        states ``[R, S, H]``; then tokens are produced until every row is done."""
        hidden = prefill(self.cache)
        hidden = hidden[torch.arange(hidden.shape[0], device=self.device), self.prompt_lens.long() - 1]
        self.cache.lens.copy_(self.prompt_lens)
        step = 0
        while any(row.mode != _DONE for row in self.rows):
            ids, features, feature_rows, own, nxt = self._produce(hidden, step)
            self.step_ids.append(ids)
            if all(row.mode == _DONE for row in self.rows):
                break
            x = self._inputs(ids, features, feature_rows, own, nxt)
            hidden = self.step(torch.cat([x, x]) if self.guided else x)
            step += 1
        return self.rows

    def _produce(self, hidden: torch.Tensor, step: int):
        """Chooses every row's next token from the hidden states ``[R, H]`` of its last one and
        updates the rows. Returns the ids ``[B]`` (pad at continuous tokens), the continuous
        tokens and their rows (None: all rows), and per row the image token each produced token
        is and the one it predicts (-1: none)."""
        batch, plan = self.batch, self.plan
        groups: dict[tuple, list[int]] = {}
        for b, row in enumerate(self.rows):
            if row.mode == _DONE:
                key = ("pad", self.pad_id)
            elif row.mode == _TEXT:
                key = ("text",)
            elif plan.ids[row.entry] >= 0:
                key = ("forced", plan.ids[row.entry])
            else:
                key = ("image",)
            groups.setdefault(key, []).append(b)

        own, nxt = [-1] * batch, [-1] * batch
        chosen: list[tuple[list[int], torch.Tensor]] = []
        features, feature_rows = None, None
        for key, members in groups.items():
            everyone = len(members) == batch
            index = None if everyone else torch.tensor(members, device=self.device)
            if key[0] in ("pad", "forced"):
                chosen.append((members, self._constant(key[1], len(members))))
                if key[0] == "forced":
                    for b in members:
                        self.rows[b].events.append(("struct", self.rows[b].image))
                        self._advance(self.rows[b], b, own, nxt)
                continue
            if key[0] == "text":
                chosen.append((members, self._text(hidden[:batch] if everyone else hidden[index], members, step,
                                                   own, nxt)))
                continue
            rows = hidden if everyone else hidden[torch.cat([index, index + batch]) if self.guided else index]
            if self.image.kind == "discrete":
                lo, hi = self.model.vocab.image_codes
                codes = sample_tokens(self._logits(rows, lo, hi), temperature=self.image.temperature,
                                      top_k=self.image.top_k, top_p=self.image.top_p,
                                      cfg_scale=self.image.cfg_scale if self.guided else None,
                                      generator=self.generator)
                chosen.append((members, codes + lo))
                for b in members:
                    row = self.rows[b]
                    row.events.append(("code", step, row.image, plan.token[row.entry]))
            else:
                features, feature_rows = self._continuous(rows), index
                self.features.append(features)
                chosen.append((members, self._constant(self.pad_id, len(members))))
                for j, b in enumerate(members):
                    row = self.rows[b]
                    row.events.append(("cont", self.num_features + j, row.image, plan.token[row.entry]))
                self.num_features += len(members)
            for b in members:
                self._advance(self.rows[b], b, own, nxt)

        if len(chosen) == 1:
            ids = chosen[0][1]
        else:
            ids = torch.full((batch,), self.pad_id, dtype=torch.long, device=self.device)
            for members, tokens in chosen:
                ids[torch.tensor(members, device=self.device)] = tokens
        return ids, features, feature_rows, own, nxt

    def _text(self, hidden: torch.Tensor, members: list[int], step: int, own: list[int], nxt: list[int]):
        """Text tokens for rows ``members``; a sampled image-begin token starts an image."""
        lo, hi = self.text_range
        logits = self._logits(hidden, lo, hi)
        begin = self.plan.begin_id if self.plan is not None else None
        if begin is not None:  # a row out of images may not start one
            banned = [j for j, b in enumerate(members) if self.rows[b].images_left == 0]
            if len(banned) == len(members):
                logits[:, begin - lo] = float("-inf")
            elif banned:
                logits[torch.tensor(banned, device=self.device), begin - lo] = float("-inf")
        tokens = sample_tokens(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                               generator=self.generator) + lo
        watch = bool(self.stop_tokens) or (begin is not None and any(self.rows[b].images_left for b in members))
        values = tokens.tolist() if watch else [None] * len(members)  # the device read, only when needed
        for b, value in zip(members, values):
            row = self.rows[b]
            row.text_left -= 1
            if value is not None and value == begin and row.images_left > 0:
                self._start_image(row, b)
                row.events.append(("struct", row.image))
                self._advance(row, b, own, nxt)
                continue
            row.events.append(("text", step))
            if row.text_left == 0 or (value is not None and value in self.stop_tokens):
                row.mode = _DONE
        return tokens

    def _continuous(self, cond: torch.Tensor) -> torch.Tensor:
        """Continuous tokens ``[n, F]`` from the hidden states (``[cond; uncond]`` when guided)."""
        head, spec = self.model.continuous_head, self.image
        cond = cond.to(next(head.parameters()).dtype)
        scale = spec.cfg_scale if self.guided else 1.0
        if spec.kind == "regression":
            return head.sample(cond, cfg_scale=scale)
        return head.sample(cond, num_steps=spec.diffusion_steps, cfg_scale=scale,
                           temperature=spec.diffusion_temperature, generator=self.generator,
                           clip_denoised=spec.clip_denoised)


# ---- public entry points (Decoder.generate, UnifiedModel.generate) ---------------------------

def _check_common(vocab_size: int, device: torch.device, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                  generator, pad_id) -> frozenset[int]:
    if not (_is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling("", temperature, top_k, top_p)
    if stop_tokens is None:
        stop_tokens = ()
    elif _is_int(stop_tokens):
        stop_tokens = (stop_tokens,)
    stop_tokens = tuple(stop_tokens)
    if not all(_is_int(t) and 0 <= t < vocab_size for t in stop_tokens):
        raise ValueError(f"stop_tokens must be token ids in [0, {vocab_size}), got {stop_tokens!r}")
    if not (_is_int(pad_id) and 0 <= pad_id < vocab_size):
        raise ValueError(f"pad_id must be a token id in [0, {vocab_size}), got {pad_id!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"generator is on {generator.device} but the model on {device}")
    return frozenset(int(t) for t in stop_tokens)


def _prompt_lengths(input_ids: torch.Tensor, prompt_lens, attention_mask) -> torch.Tensor:
    batch, seq = input_ids.shape
    if prompt_lens is not None and attention_mask is not None:
        raise ValueError("pass prompt_lens or attention_mask, not both")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, seq):
            raise ValueError(f"attention_mask must be a [batch, seq] = [{batch}, {seq}] tensor of 0 / 1, got "
                             f"{getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
        mask = attention_mask.detach().cpu()  # one read per call, before any conversion can round a 0.5
        if mask.is_complex() or ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.to(torch.int64)
        if (mask[:, 1:] > mask[:, :-1]).any():
            raise ValueError("attention_mask must be right-padded: ones, then zeros (left padding is not needed: "
                             "every row keeps its own cache length)")
        lens = mask.sum(1)
    elif prompt_lens is not None:
        if isinstance(prompt_lens, torch.Tensor):
            lens = prompt_lens.detach().cpu()
            if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
                raise TypeError(f"prompt_lens must be integer lengths, got a {lens.dtype} tensor")
        elif isinstance(prompt_lens, Sequence) and not isinstance(prompt_lens, (str, bytes)) and \
                all(map(_is_int, prompt_lens)):
            if not all(1 <= n <= seq for n in prompt_lens):  # before a tensor: any Python int is named as given
                raise ValueError(f"prompt lengths must be in [1, {seq}] (input_ids has {seq} columns), got "
                                 f"{[int(n) for n in prompt_lens]}")
            lens = torch.tensor([int(n) for n in prompt_lens], dtype=torch.int64)
        else:
            raise TypeError(f"prompt_lens must be a list of ints or an integer tensor, got {prompt_lens!r}")
        if lens.shape != (batch,):
            raise ValueError(f"prompt_lens must be {batch} lengths (one per row), got shape {tuple(lens.shape)}")
    else:
        return torch.full((batch,), seq, dtype=torch.int32)
    if (lens < 1).any() or (lens > seq).any():
        raise ValueError(f"prompt lengths must be in [1, {seq}] (input_ids has {seq} columns), got {lens.tolist()}")
    return lens.to(torch.int32)


@torch.no_grad()
def generate_ids(decoder: Decoder, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                 generator: torch.Generator | None = None, prompt_lens=None, attention_mask=None, pad_id: int = 0,
                 vocab_range: tuple[int, int] | None = None, max_len: int | None = None,
                 cuda_graphs: bool = True) -> torch.Tensor:
    """``Decoder.generate``: see its docstring."""
    if not isinstance(decoder, Decoder):
        raise TypeError(f"decoder must be a unimm Decoder, got {type(decoder).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2 or input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, seq] with batch, seq >= 1, got shape {tuple(input_ids.shape)}")
    vocab = decoder.config.vocab_size
    device = decoder.embed_tokens.weight.device
    stop = _check_common(vocab, device, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator, pad_id)
    if vocab_range is None:
        vocab_range = (0, vocab)
    elif not (isinstance(vocab_range, Sequence) and len(vocab_range) == 2 and all(map(_is_int, vocab_range))
              and 0 <= vocab_range[0] < vocab_range[1] <= vocab):
        raise ValueError(f"vocab_range must be (lo, hi) with 0 <= lo < hi <= vocab_size = {vocab}, got {vocab_range!r}")
    _check_flag("cuda_graphs", cuda_graphs)
    batch, seq = input_ids.shape
    lens = _prompt_lengths(input_ids, prompt_lens, attention_mask).to(device)
    ids = input_ids.to(device=device, dtype=torch.long)
    ids = torch.where(torch.arange(seq, device=device) < lens[:, None], ids, pad_id)
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # once per call (the forward reads nothing on a GPU)
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must be in [0, {vocab}) (the vocabulary size is {vocab}) at prompt positions, "
                         f"got values in [{low}, {high}]")

    engine = _Engine(decoder, None, prompt_lens=lens, text_range=(int(vocab_range[0]), int(vocab_range[1])),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     stop_tokens=stop, image=None, start_image=False, generator=generator, pad_id=pad_id,
                     cuda_graphs=cuda_graphs, max_len=max_len)
    engine.run(lambda cache: decoder(ids, cache=cache))
    steps = len(engine.step_ids)
    out = torch.full((batch, seq + steps), pad_id, dtype=torch.long, device=device)
    out[:, :seq] = ids
    if steps:  # row b's tokens follow its prompt; rows that stopped produced pad ids since
        columns = lens[:, None].long() + torch.arange(steps, device=device)
        out.scatter_(1, columns, torch.stack(engine.step_ids, 1))
    return out


@torch.no_grad()
def generate_segments(model, prompts: Sequence[Sequence], *, max_new_tokens: int, stop_tokens=None,
                      temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      image: ImageSpec | None = None, start_image: bool = False, uncond_prompts=None,
                      generator: torch.Generator | None = None, pad_id: int = 0, max_len: int | None = None,
                      cuda_graphs: bool = True) -> list[list]:
    """``UnifiedModel.generate``: see its docstring."""
    if isinstance(prompts, torch.Tensor) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts (lists of segments)")
    prompts = list(prompts)
    vocab = model.vocab
    device = model.decoder.embed_tokens.weight.device
    stop = _check_common(vocab.size, device, max_new_tokens, temperature, top_k, top_p, stop_tokens, generator,
                         pad_id)
    if image is not None:
        if not isinstance(image, ImageSpec):
            raise TypeError(f"image must be an ImageSpec or None, got {type(image).__name__}")
        _check_image(image, model)
    _check_flag("start_image", start_image)
    _check_flag("cuda_graphs", cuda_graphs)
    if start_image and image is None:
        raise ValueError("start_image=True needs image=ImageSpec(...): what to generate")
    names = [f"prompts[{i}]" for i in range(len(prompts))]
    rows = prompts
    if image is not None and image.guided:
        if uncond_prompts is None:
            uncond_prompts = unconditional_prompt
        if callable(uncond_prompts):
            uncond_prompts = [uncond_prompts(prompt) for prompt in prompts]
        elif isinstance(uncond_prompts, torch.Tensor) or not isinstance(uncond_prompts, Sequence) or \
                len(uncond_prompts) != len(prompts):
            raise ValueError(f"uncond_prompts must be one prompt per prompt ({len(prompts)}), a callable "
                             f"prompt -> prompt, or None, got {type(uncond_prompts).__name__} "
                             f"of length {len(uncond_prompts) if isinstance(uncond_prompts, Sequence) else '-'}")
        rows = prompts + list(uncond_prompts)
        names += [f"uncond_prompts[{i}]" for i in range(len(prompts))]
    batch, lens = _pack_prompts(model, rows, names, device)
    model._check_batch(batch)

    engine = _Engine(model.decoder, model, prompt_lens=lens, text_range=(0, vocab.image_codes[0]),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     stop_tokens=stop, image=image, start_image=start_image, generator=generator, pad_id=pad_id,
                     cuda_graphs=cuda_graphs, max_len=max_len)

    def prefill(cache: KVCache) -> torch.Tensor:
        next_positions = batch.next_image_positions
        first_is_image = start_image and engine.plan.ids[0] < 0
        if first_is_image and model.next_position_embed is not None and image.shape is not None:
            # no begin token: the prompt's last token predicts the image's first token
            cells = engine.orders[:, 0].repeat(len(rows) // engine.batch)
            grid = torch.stack([cells // image.shape[1], cells % image.shape[1]], -1)
            next_positions = next_positions.clone()
            next_positions[torch.arange(len(rows), device=device), lens.long() - 1] = grid
        embeds = model.embed(batch.input_ids, features=batch.input_features, added_features=batch.added_features,
                             image_positions=batch.image_positions, next_image_positions=next_positions)
        return model.decoder(inputs_embeds=embeds, positions=batch.positions, mask=batch.mask, cache=cache)

    return _segments(engine, engine.run(prefill))


def _segments(engine: _Engine, rows: list[_Row]) -> list[list]:
    """Each row's continuation: Text runs and images, in raster order (one device read)."""
    ids = torch.stack(engine.step_ids, 1).cpu() if engine.step_ids else None
    features = torch.cat(engine.features).cpu() if engine.features else None
    spec = engine.image
    out = []
    for row in rows:
        segments, text, images = [], [], {}
        orders = [None if order is None else order.cpu() for order in row.orders]
        b = len(out)
        for event in row.events:
            if event[0] == "text":
                text.append(int(ids[b, event[1]]))
                continue
            image = event[1] if event[0] == "struct" else event[2]
            if image not in images:
                if text:
                    segments.append(Text(text))
                    text = []
                images[image] = len(segments)
                segments.append({})
            if event[0] == "code":
                segments[images[image]][event[3]] = int(ids[b, event[1]]) - engine.model.vocab.image_codes[0]
            elif event[0] == "cont":
                segments[images[image]][event[3]] = features[event[1]]
        if text:
            segments.append(Text(text))
        for image, position in images.items():
            tokens = segments[position]
            values = [tokens[t] for t in range(spec.tokens)]
            if spec.kind == "discrete":
                segments[position] = DiscreteImage(torch.tensor(values).view(spec.shape), format=spec.format)
                continue
            sequence = torch.stack(values)
            order = orders[image]
            raster = sequence if order is None else torch.empty_like(sequence).index_copy_(0, order, sequence)
            segments[position] = ContinuousImage(raster, shape=spec.shape, format=spec.format, encoder=spec.encoder,
                                                 order=order)
        out.append(segments)
    return out
