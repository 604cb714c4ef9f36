"""Prompt planning: prompts packed one per row exactly as ``pack`` packs training documents, the
default unconditional prompt of classifier-free guidance, and the plan of a generated image's
tokens, read off ``pack`` so the layout is the one training sees."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from unimm.kernels import AttentionMask
from unimm.models.generation.spec import ImageSpec
from unimm.models.sequence import (
    Batch,
    ContinuousImage,
    DiscreteImage,
    Features,
    HybridImage,
    Text,
    document_length,
    pack,
)


def _as_prompt(segment):
    """The segment as pure context: no loss, no continuous target (so nothing is permuted)."""
    if isinstance(segment, (Text, DiscreteImage, HybridImage)):
        return dataclasses.replace(segment, loss=False)
    if isinstance(segment, ContinuousImage):
        return dataclasses.replace(segment, role="input")
    return segment  # pack names what is wrong with it


@contextlib.contextmanager
def _named(what: str):
    """Errors raised inside name ``what`` (the prompt they come from) first."""
    try:
        yield
    except (ValueError, TypeError) as error:
        raise type(error)(f"{what}: {error}") from None


def _as_context(segments, vocab, what: str) -> tuple[list, int]:
    """The prompt ``segments`` as a document of pure context, and its length (``document_length``,
    which checks it as ``pack`` does); errors name ``what``."""
    if isinstance(segments, (Text, DiscreteImage, ContinuousImage, HybridImage, str, bytes)) or \
            not isinstance(segments, Sequence):
        raise ValueError(f"{what} must be a list of segments, got {type(segments).__name__}")
    document = [_as_prompt(segment) for segment in segments]
    with _named(what):
        return document, document_length(document, vocab=vocab)


def pack_prompts(model, prompts: list, names: list[str], device) -> tuple[Batch, torch.Tensor]:
    """One prompt per row, right-padded to the longest: the packed batch (on ``device``) and the
    int32 prompt lengths."""
    documents, lengths = zip(*(_as_context(prompt, model.vocab, name) for prompt, name in zip(prompts, names)))
    seq = max(lengths)
    packed = []
    for document, name in zip(documents, names):
        with _named(name):
            packed.append(pack([document], seq, vocab=model.vocab))

    def stack(field: str) -> torch.Tensor:
        return torch.cat([getattr(batch, field) for batch in packed])

    def features(field: str) -> dict[str, Features]:
        parts: dict[str, list[Features]] = {}
        for row, batch in enumerate(packed):
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
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
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


class ImagePlan:
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
        document, length = _as_context([image], vocab, "image")
        batch = pack([document], length, vocab=vocab)
        ids = batch.input_ids[0]
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
