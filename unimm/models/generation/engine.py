"""The generation engine: prefill into a static ``KVCache``, then one token per step, text and images
alike.

``Decoder.generate`` (token ids in, token ids out) and ``UnifiedModel.generate`` (segments in,
segments out) both run :class:`Engine` (through ``unimm.models.generation.api``):

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
   shapes and reads nothing back, so on a GPU it is captured in a CUDA graph (warmed up on a
   side stream) and replayed; on the CPU it runs eagerly. A captured step, with the KV cache it
   reads, is kept per decoder and (rows, cache length, dtype, device, weight addresses) in a
   small LRU (``MAX_CACHED_STEPS``; ``release_decode_steps`` frees them), so later ``generate``
   calls of the same shapes replay the graph the first one captured.

Classifier-free guidance doubles the rows: ``[cond; uncond]``. Only the cond rows carry state;
the uncond rows are fed exactly the tokens chosen for their cond row (text included), so both
halves stay aligned token for token while their prompts differ.

Host work per step is a few Python operations per row. The host reads the device back only to
see text tokens (stop tokens, the image-begin token): a step in which every row is inside an
image, or a text step with nothing to watch for, makes no device read.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable

import torch

from unimm.kernels import sample_tokens
from unimm.kernels._common import capture_cuda_graph, is_int, lru_per_owner
from unimm.models.generation.planning import ImagePlan
from unimm.models.generation.spec import ImageSpec
from unimm.models.generation.timing import PhaseTimer
from unimm.models.kv_cache import KVCache

_TEXT, _IMAGE, _DONE = 0, 1, 2


# ---- events: what each produced token of a row was, read back by the output decoding ----------

@dataclasses.dataclass(frozen=True, slots=True)
class TextToken:
    """A text token: the row's id at decode step ``step``."""

    step: int


@dataclasses.dataclass(frozen=True, slots=True)
class StructureToken:
    """A structure token of image ``image`` (BOI, size, image token, EOL, EOF, EOI), written by the engine."""

    image: int


@dataclasses.dataclass(frozen=True, slots=True)
class ImageCode:
    """Token ``token`` (in generation order) of image ``image``: a code, the row's id at step ``step``."""

    step: int
    image: int
    token: int


@dataclasses.dataclass(frozen=True, slots=True)
class ContinuousToken:
    """Token ``token`` (in generation order) of image ``image``: row ``feature`` of the engine's
    continuous tokens (``torch.cat(Engine.features)``)."""

    feature: int
    image: int
    token: int


Event = TextToken | StructureToken | ImageCode | ContinuousToken


# ---- the decode step --------------------------------------------------------------------------

class DecodeStep:
    """One decoder step for every row: ``hidden = decoder(embeds [R, 1, H], cache)`` and
    ``cache.lens += 1``, from a static input buffer. With ``graphed``, the step is captured in a
    CUDA graph at its first call (after a warm-up on a side stream that compiles and autotunes
    its kernels) and replayed after that."""

    def __init__(self, decoder, cache: KVCache, graphed: bool):
        # weakly: a cached step must not keep its decoder (the key of its cache) alive
        self.decoder, self.cache = weakref.proxy(decoder), cache
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
        lens = self.cache.lens.clone()
        # two warm-ups, each undoing its length update (the real step later rewrites the cache rows they
        # write); the capture records the step, lens included, and runs nothing
        self.graph, self.hidden = capture_cuda_graph(self._forward, self.embeds.device, warmups=2,
                                                     reset=lambda: self.cache.lens.copy_(lens))


MAX_CACHED_STEPS = 4  # captured decode steps kept per decoder; each holds its KV cache's memory
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # decoder -> OrderedDict[key -> DecodeStep]


def graphable(device: torch.device) -> bool:
    """Whether decode steps on ``device`` are captured in CUDA graphs (a function, so that CPU
    tests can turn capture on with a stand-in ``capture_cuda_graph``)."""
    return device.type == "cuda"


def decode_step(decoder, rows: int, max_len: int, *, graphed: bool) -> DecodeStep:
    """A decode step with an empty ``KVCache [rows, max_len]``. Graphed steps are reused: one per
    (rows, max_len, dtype, device, weight addresses) of each decoder, least recently used dropped
    beyond ``MAX_CACHED_STEPS``, so a graph is captured once per shape and replayed by every later
    call (the graph reads the weights and the cache at their addresses, hence the key)."""
    weight = decoder.embed_tokens.weight
    if not graphed:
        return DecodeStep(decoder, KVCache(decoder.config, rows, max_len, device=weight.device, dtype=weight.dtype),
                          graphed=False)
    key = (rows, max_len, weight.dtype, weight.device, tuple(p.data_ptr() for p in decoder.parameters()))
    step = lru_per_owner(_STEPS, decoder, key, MAX_CACHED_STEPS, lambda: DecodeStep(
        decoder, KVCache(decoder.config, rows, max_len, device=weight.device, dtype=weight.dtype), graphed=True))
    step.cache.reset()
    return step


def release_decode_steps(decoder=None) -> None:
    """Frees the captured decode steps (graphs and KV caches) of ``decoder``, or of every decoder."""
    if decoder is None:
        _STEPS.clear()
    else:
        _STEPS.pop(decoder, None)


# ---- the engine -----------------------------------------------------------------------------

class Row:
    """Host state of one (cond) row."""

    __slots__ = ("mode", "entry", "text_left", "images_left", "image", "events", "orders")

    def __init__(self, text_left: int, images_left: int):
        self.mode = _TEXT if text_left > 0 else _DONE
        self.entry = 0  # the plan entry produced next (image mode)
        self.text_left = text_left
        self.images_left = images_left
        self.image = -1  # index of the current image
        self.events: list[Event] = []  # one per produced token, in order
        self.orders: list[torch.Tensor | None] = []  # per image: its random order (raster cell of token t)


class Engine:
    """Prefill, then the decode loop over rows ``[cond; uncond]`` (see the module docstring).

    ``decoder`` is the ``Decoder``, ``model`` the ``UnifiedModel`` around it (None for plain token
    generation); ``text_range`` is the block text tokens are sampled from."""

    def __init__(self, decoder, model, *, prompt_lens: torch.Tensor, text_range: tuple[int, int],
                 max_new_tokens: int, temperature, top_k, top_p, stop_tokens: frozenset[int],
                 image: ImageSpec | None, start_image: bool, generator, pad_id: int, cuda_graphs: bool,
                 max_len: int | None, timings: bool = False):
        self.decoder, self.model = decoder, model
        self.device = decoder.embed_tokens.weight.device
        self.timer = PhaseTimer(self.device, timings)
        self.text_range = text_range
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.stop_tokens = stop_tokens
        self.image = image
        self.plan = ImagePlan(image, model) if image is not None else None
        self.guided = image is not None and image.guided
        self.batch = prompt_lens.shape[0] // 2 if self.guided else prompt_lens.shape[0]
        self.generator = generator
        self.pad_id = pad_id

        images = image.max_images if image is not None else 0
        budget = max_new_tokens + images * (len(self.plan) if self.plan is not None else 0)
        longest = int(prompt_lens.max())
        if max_len is None:
            max_len = longest + budget
        elif not (is_int(max_len) and max_len >= longest + budget):
            raise ValueError(f"max_len={max_len!r} is too small: the longest prompt ({longest} tokens) plus what "
                             f"this call may generate ({budget}) needs {longest + budget}")
        self.step = decode_step(decoder, prompt_lens.shape[0], max_len,
                                graphed=cuda_graphs and graphable(self.device))
        self.cache = self.step.cache
        # prompt lengths were checked on the host and max_len holds the longest prompt plus the whole
        # budget, so every decode step's lengths are in range: the graphed step needs no range guard
        self.cache._lens_in_range = True
        self.prompt_lens = prompt_lens

        self.rows = [Row(max_new_tokens, images) for _ in range(self.batch)]
        # the current image's order of every row: orders[b, t] is the raster cell of its token t
        self.orders = None if image is None else \
            torch.arange(image.tokens, device=self.device).repeat(self.batch, 1)
        if start_image:
            for b, row in enumerate(self.rows):
                self._start_image(row, b)
        self.step_ids: list[torch.Tensor] = []  # [B] per step
        self.features: list[torch.Tensor] = []  # continuous tokens, in the order of their ContinuousToken events
        self.num_features = 0
        self._constants: dict[int, torch.Tensor] = {}

    # ---- bookkeeping -------------------------------------------------------------------------

    def _start_image(self, row: Row, b: int) -> None:
        """Row ``b`` produces its image's first plan entry next (a sampled begin token is that entry)."""
        row.mode, row.entry = _IMAGE, 0
        row.images_left -= 1
        row.image += 1
        if self.image.random_order:
            self.orders[b] = torch.randperm(self.image.tokens, generator=self.generator, device=self.device)
        row.orders.append(self.orders[b].clone() if self.image.random_order else None)

    def _advance(self, row: Row, b: int, own: list[int], nxt: list[int]) -> None:
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
        return (self.decoder if self.model is None else self.model).logits(hidden, (lo, hi))

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

    def run(self, prefill: Callable[[KVCache], torch.Tensor]) -> list[Row]:
        """``prefill(cache)`` writes the prompts into the empty cache and returns their hidden
        states ``[R, S, H]``; then tokens are produced until every row is done."""
        with self.timer.phase("prefill"):
            hidden = prefill(self.cache)
        hidden = hidden[torch.arange(hidden.shape[0], device=self.device), self.prompt_lens.long() - 1]
        self.cache.lens.copy_(self.prompt_lens)
        step = 0
        while any(row.mode != _DONE for row in self.rows):
            ids, features, feature_rows, own, nxt = self._produce(hidden, step)
            self.step_ids.append(ids)
            if all(row.mode == _DONE for row in self.rows):
                break
            with self.timer.phase("inputs"):
                x = self._inputs(ids, features, feature_rows, own, nxt)
            with self.timer.phase("decode_steps"):
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
                with self.timer.phase("structure_tokens"):
                    chosen.append((members, self._constant(key[1], len(members))))
                    if key[0] == "forced":
                        for b in members:
                            self.rows[b].events.append(StructureToken(self.rows[b].image))
                            self._advance(self.rows[b], b, own, nxt)
                continue
            if key[0] == "text":
                with self.timer.phase("sampling"):
                    chosen.append((members, self._text(hidden[:batch] if everyone else hidden[index], members,
                                                       step, own, nxt)))
                continue
            rows = hidden if everyone else hidden[torch.cat([index, index + batch]) if self.guided else index]
            if self.image.kind == "discrete":
                lo, hi = self.model.vocab.image_codes
                with self.timer.phase("sampling"):
                    codes = sample_tokens(self._logits(rows, lo, hi), temperature=self.image.temperature,
                                          top_k=self.image.top_k, top_p=self.image.top_p,
                                          cfg_scale=self.image.cfg_scale if self.guided else None,
                                          generator=self.generator)
                chosen.append((members, codes + lo))
                for b in members:
                    row = self.rows[b]
                    row.events.append(ImageCode(step, row.image, plan.token[row.entry]))
            else:
                with self.timer.phase("diffusion_head"):
                    features, feature_rows = self._continuous(rows), index
                self.features.append(features)
                chosen.append((members, self._constant(self.pad_id, len(members))))
                for j, b in enumerate(members):
                    row = self.rows[b]
                    row.events.append(ContinuousToken(self.num_features + j, row.image, plan.token[row.entry]))
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
                row.events.append(StructureToken(row.image))
                self._advance(row, b, own, nxt)
                continue
            row.events.append(TextToken(step))
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
