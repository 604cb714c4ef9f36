"""The generation entry points: ``generate_ids`` (``Decoder.generate``: token ids in, token ids out)
and ``generate_segments`` (``UnifiedModel.generate``: segments in, segments out). Each checks its
arguments once per call on the host, runs the ``Engine`` and decodes what it produced. The two
``generate`` methods forward their options here unchanged, so an option is documented and added
in one place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from unimm.kernels._common import is_int
from unimm.models.config import DecoderConfig
from unimm.models.generation.engine import ContinuousToken, Engine, ImageCode, Row, TextToken
from unimm.models.generation.planning import pack_prompts, unconditional_prompt
from unimm.models.generation.spec import ImageSpec, check_flag, check_sampling
from unimm.models.kv_cache import KVCache
from unimm.models.sequence import ContinuousImage, DiscreteImage, Text


def _check_common(vocab_size: int, device: torch.device, max_new_tokens, temperature, top_k, top_p, stop_tokens,
                  generator, pad_id) -> frozenset[int]:
    if not (is_int(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling("", temperature, top_k, top_p)
    if stop_tokens is None:
        stop_tokens = ()
    elif is_int(stop_tokens):
        stop_tokens = (stop_tokens,)
    stop_tokens = tuple(stop_tokens)
    if not all(is_int(t) and 0 <= t < vocab_size for t in stop_tokens):
        raise ValueError(f"stop_tokens must be token ids in [0, {vocab_size}), got {stop_tokens!r}")
    if not (is_int(pad_id) and 0 <= pad_id < vocab_size):
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
                all(map(is_int, prompt_lens)):
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
def generate_ids(decoder, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop_tokens=None,
                 generator: torch.Generator | None = None, prompt_lens=None, attention_mask=None, pad_id: int = 0,
                 vocab_range: tuple[int, int] | None = None, max_len: int | None = None,
                 cuda_graphs: bool = True, return_timings: bool = False):
    """Token ids ``[B, S + n]``: the prompts followed by up to ``max_new_tokens`` new tokens
    (``n`` steps were run: fewer when every row stopped early), as transformers' ``generate``.

    Prefill writes a static ``KVCache``; each decode step is one ``[B, 1]`` forward captured
    in a CUDA graph on GPU (``cuda_graphs=False``: eager; CPU is always eager), then
    ``sample_tokens`` (``unimm.models.generation.engine``).

    Args:
        input_ids: int ``[B, S]`` prompts, right-padded when ragged (padding ids are ignored);
            prompt ids must be in ``[0, vocab_size)`` (checked once per call, on any device).
        max_new_tokens: tokens to generate per row (>= 0).
        temperature: 0 is greedy (argmax, lowest id on ties); otherwise sampling, with
        top_k, top_p: the usual truncations (``sample_tokens``).
        stop_tokens: an id or ids; a row that samples one stops (the stop token is kept) and
            is padded with ``pad_id`` after it.
        generator: a ``torch.Generator`` on the model's device: equal seeds, equal tokens.
        prompt_lens: int ``[B]`` lengths of right-padded prompts; or
        attention_mask: ``[B, S]`` of 1 (prompt) then 0 (padding), transformers style.
        pad_id: written after a row's last token.
        vocab_range: ``(lo, hi)``: sample ids in ``[lo, hi)`` only (e.g. an image-code block).
        max_len: the cache length; default (and minimum) ``S + max_new_tokens``.
        cuda_graphs: capture the decode step in a CUDA graph when on a GPU.
        return_timings: also return ``{phase: seconds}`` (``unimm.models.generation.timing``):
            ``(ids, timings)``.

    Row b holds its prompt (``prompt_lens[b]`` tokens), its new tokens right after it, then
    ``pad_id``; the result is on the model's device.
    """
    if not isinstance(getattr(decoder, "config", None), DecoderConfig):
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
    elif not (isinstance(vocab_range, Sequence) and len(vocab_range) == 2 and all(map(is_int, vocab_range))
              and 0 <= vocab_range[0] < vocab_range[1] <= vocab):
        raise ValueError(f"vocab_range must be (lo, hi) with 0 <= lo < hi <= vocab_size = {vocab}, got {vocab_range!r}")
    check_flag("cuda_graphs", cuda_graphs)
    check_flag("return_timings", return_timings)
    batch, seq = input_ids.shape
    lens = _prompt_lengths(input_ids, prompt_lens, attention_mask).to(device)
    ids = input_ids.to(device=device, dtype=torch.long)
    ids = torch.where(torch.arange(seq, device=device) < lens[:, None], ids, pad_id)
    low, high = torch.stack(torch.aminmax(ids)).tolist()  # once per call (the forward reads nothing on a GPU)
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids must be in [0, {vocab}) (the vocabulary size is {vocab}) at prompt positions, "
                         f"got values in [{low}, {high}]")

    engine = Engine(decoder, None, prompt_lens=lens, text_range=(int(vocab_range[0]), int(vocab_range[1])),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     stop_tokens=stop, image=None, start_image=False, generator=generator, pad_id=pad_id,
                     cuda_graphs=cuda_graphs, max_len=max_len, timings=return_timings)
    engine.run(lambda cache: decoder(ids, cache=cache))
    steps = len(engine.step_ids)
    out = torch.full((batch, seq + steps), pad_id, dtype=torch.long, device=device)
    out[:, :seq] = ids
    if steps:  # row b's tokens follow its prompt; rows that stopped produced pad ids since
        columns = lens[:, None].long() + torch.arange(steps, device=device)
        out.scatter_(1, columns, torch.stack(engine.step_ids, 1))
    return (out, engine.timer.seconds()) if return_timings else out


@torch.no_grad()
def generate_segments(model, prompts: Sequence[Sequence], *, max_new_tokens: int, stop_tokens=None,
                      temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                      image: ImageSpec | None = None, start_image: bool = False, uncond_prompts=None,
                      generator: torch.Generator | None = None, pad_id: int = 0, max_len: int | None = None,
                      cuda_graphs: bool = True, return_timings: bool = False):
    """Continues each prompt with text and images; returns the continuation of each, as segments.

    Prompts are packed as in training (one per row, bidirectional spans and image spans
    included) and prefilled into a static KV cache; then every step produces one token per
    row (``unimm.models.generation.engine``):

    * text: ``sample_tokens`` over text and special tokens (never image codes) with
      ``temperature`` / ``top_k`` / ``top_p``, until ``max_new_tokens`` text tokens or a stop token;
    * images, of the one kind ``image`` (an ``unimm.models.ImageSpec``) describes:
      the engine writes the structure tokens of ``image.format`` itself (BOI, size, EOL after
      each row, EOF, EOI), samples codes over the code block alone (discrete), or continuous
      tokens with the ``DiffusionHead`` / ``RegressionHead`` (fed back through the input
      projector ``image.encoder``), with classifier-free guidance at ``image.cfg_scale``.
      2D and next-position embeddings are added as in training; with ``image.random_order``
      each image's order is drawn from ``generator`` and its begin token carries the
      next-position embedding of its first token.
    * interleaving: a text step that samples the format's begin token starts an image (up
      to ``image.max_images`` per row; after that the begin token is never sampled); after
      the image, text resumes. ``start_image=True`` starts an image right after the prompt
      (text-to-image); with ``max_new_tokens=0`` the row ends with the image.

    Args:
        prompts: a list of prompts, each a list of ``Text`` / ``DiscreteImage`` /
            ``ContinuousImage`` / ``HybridImage`` segments (their ``loss`` flags are ignored;
            continuous targets are read as inputs).
        max_new_tokens: text tokens per row (a sampled begin token counts; image tokens do not).
        stop_tokens: an id or ids that end a row's generation (kept in its last ``Text``).
        temperature, top_k, top_p: text sampling; temperature 0 is greedy.
        image: an ``ImageSpec`` or None (text only).
        start_image: begin with an image (needs ``image``).
        uncond_prompts: guidance's unconditional prompts: one per prompt, or a callable
            ``prompt -> prompt``; default ``unimm.models.generation.unconditional_prompt`` (the
            prompt's text reduced to its first token, BOS; images kept), i.e. what caption
            dropout leaves in training. Guided rows run as ``[cond; uncond]``; the uncond
            rows are fed the tokens chosen for their cond row.
        generator: a ``torch.Generator`` on the model's device: same seed, same result.
        pad_id: the id fed to rows that finished while others go on.
        max_len: the KV-cache length; default (and minimum) the longest prompt plus what the
            call may generate (``max_new_tokens`` + ``max_images`` full image spans).
        cuda_graphs: capture the decode step in a CUDA graph on a GPU (CPU: always eager).
        return_timings: also return ``{phase: seconds}`` (``unimm.models.generation.timing``):
            ``(segments, timings)``.

    Returns:
        One list of segments per prompt: ``Text(ids)`` runs, ``DiscreteImage(codes [h, w])``
        and ``ContinuousImage(features [L, F])`` (raster order; ``order`` holds the generation
        order of a random-order image, so ``pack(prompt + continuation)`` is the sequence
        the model produced).
    """
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
        image.check_model(model)
    check_flag("start_image", start_image)
    check_flag("cuda_graphs", cuda_graphs)
    check_flag("return_timings", return_timings)
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
    batch, lens = pack_prompts(model, rows, names, device)
    model.check_batch(batch)

    engine = Engine(model.decoder, model, prompt_lens=lens, text_range=(0, vocab.image_codes[0]),
                     max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                     stop_tokens=stop, image=image, start_image=start_image, generator=generator, pad_id=pad_id,
                     cuda_graphs=cuda_graphs, max_len=max_len, timings=return_timings)

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

    segments = _segments(engine, engine.run(prefill))
    return (segments, engine.timer.seconds()) if return_timings else segments


def _segments(engine: Engine, rows: list[Row]) -> list[list]:
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
            if isinstance(event, TextToken):
                text.append(int(ids[b, event.step]))
                continue
            image = event.image
            if image not in images:
                if text:
                    segments.append(Text(text))
                    text = []
                images[image] = len(segments)
                segments.append({})
            if isinstance(event, ImageCode):
                segments[images[image]][event.token] = int(ids[b, event.step]) - engine.model.vocab.image_codes[0]
            elif isinstance(event, ContinuousToken):
                segments[images[image]][event.token] = features[event.feature]
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
