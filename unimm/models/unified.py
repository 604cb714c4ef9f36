"""UnifiedModel: one decoder that reads and writes text, image codes and continuous image tokens.

``UnifiedModel.from_decoder(decoder, num_image_codes=..., ...)`` expands the decoder's
embedding and output head to ``[text | special tokens | image codes]`` (docs/ARCHITECTURE.md) and adds
the modality parts the papers need:

- input projectors (``FeatureProjector``, 2-layer GELU MLP) from each continuous encoder's
  feature width to the hidden size: SigLIP features (MetaMorph, UniToken, UniFluid's prefix),
  VAE latents fed back while generating (UniFluid), TokLIP's semantic features;
- a continuous head on the hidden state that precedes each continuous target:
  ``DiffusionHead`` (UniFluid) or ``RegressionHead`` (MetaMorph);
- UniFluid's learnable 2D position embeddings (``image_grid=(max_h, max_w)``), added to every
  image token with a grid position, and next-position embeddings (``next_position_embeddings``)
  for random-order training: each position also adds the embedding of the grid cell it must
  predict. The permutation itself is drawn by ``pack(random_order=..., generator=...)``.

Losses (``model(batch)``): cross-entropy through the fused ``linear_cross_entropy`` on the
rows that need it, as two calls: text and special-token targets over the full vocabulary, and
image-code targets over the full vocabulary or, with ``image_vocab_range=True``, over the code
block alone (V / num_image_codes fewer head FLOPs; the structure tokens stay full-vocabulary
targets, so generation can emit them or force them). Continuous targets go through the
continuous head. Each component is a (weighted) mean over its own tokens and

    loss = L_visual + text_loss_weight * L_text,   L_visual = image_code_loss + continuous_loss

(UniFluid's ``L_visual + lambda L_text``; image tokens of either kind are visual). The returned
token counts let a caller rebuild any other mix, e.g. Emu3's single mean over all tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from unimm.models.decoder import Decoder
from unimm.models.generation import generate_segments
from unimm.models.heads import DiffusionHead, FeatureProjector
from unimm.models.sequence import DEFAULT_SPECIAL_TOKENS, Batch, Features
from unimm.models.vocab import Head, VocabLayout


def _expanded_rows(weight: torch.Tensor, new_rows: int, generator: torch.Generator) -> torch.Tensor:
    """``weight`` with ``new_rows`` rows appended, each drawn from N(mean_d, std_d) with the
    per-dimension mean and standard deviation of the existing rows (a diagonal version of
    transformers' ``mean_resizing``): new tokens start at the scale and offset of the old ones,
    so neither their logits nor their embeddings stand out. Old rows are copied bit for bit."""
    old = weight.detach()
    stats = old.float()
    mean = stats.mean(0)
    std = stats.std(0) if old.shape[0] > 1 else torch.zeros_like(mean)
    noise = torch.randn(new_rows, old.shape[1], generator=generator).to(old.device)
    fresh = (mean + std * noise).to(old.dtype)
    return torch.cat([old, fresh])


class UnifiedModel(nn.Module):
    """A decoder with an expanded vocabulary, continuous-token projectors and heads.

    Build it with :meth:`from_decoder` (expands a text decoder); the constructor takes a
    decoder whose embedding already has ``vocab.size`` rows (e.g. to load a saved state dict).

    Args:
        decoder: a :class:`unimm.models.decoder.Decoder`.
        vocab: its vocabulary layout.
        feature_dims: encoder name -> feature width; one ``FeatureProjector`` each
            (``input_projectors[name]``). Segments choose theirs with ``encoder=``.
        continuous_head: a ``DiffusionHead`` / ``RegressionHead`` (or any module with
            ``token_dim``, ``cond_dim == hidden_size`` and ``loss(cond, target, *, mask)``), or None.
        text_loss_weight: lambda in ``loss = L_visual + lambda L_text``.
        image_vocab_range: image-code targets use a softmax over the code block alone.
        image_grid: ``(max_h, max_w)``: learnable 2D position embeddings for image tokens.
        next_position_embeddings: also add the embedding of the cell each position predicts
            (random-order training); needs ``image_grid``.
        diffusion_batch_mul: timesteps drawn per continuous target for a ``DiffusionHead``.
    """

    def __init__(self, decoder: Decoder, vocab: VocabLayout, *, feature_dims: Mapping[str, int] | None = None,
                 continuous_head: nn.Module | None = None, text_loss_weight: float = 1.0,
                 image_vocab_range: bool = False, image_grid: tuple[int, int] | None = None,
                 next_position_embeddings: bool = False, diffusion_batch_mul: int = 4):
        super().__init__()
        if not isinstance(decoder, Decoder):
            raise TypeError(f"decoder must be a unimm Decoder, got {type(decoder).__name__}")
        if not isinstance(vocab, VocabLayout):
            raise TypeError(f"vocab must be a VocabLayout, got {type(vocab).__name__}")
        rows = decoder.embed_tokens.weight.shape[0]
        if rows != vocab.size or decoder.lm_head.weight.shape[0] != vocab.size:
            raise ValueError(f"the decoder's embedding ({rows} rows) and head ({decoder.lm_head.weight.shape[0]}) "
                             f"must have vocab.size = {vocab.size} rows; use UnifiedModel.from_decoder to expand")
        hidden = decoder.config.hidden_size
        if not (isinstance(text_loss_weight, int | float) and text_loss_weight >= 0):
            raise ValueError(f"text_loss_weight must be a number >= 0, got {text_loss_weight!r}")
        if not isinstance(diffusion_batch_mul, int) or diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be a positive int, got {diffusion_batch_mul!r}")
        if image_vocab_range and vocab.num_image_codes == 0:
            raise ValueError("image_vocab_range needs image codes (num_image_codes > 0)")
        if continuous_head is not None:
            if not isinstance(continuous_head, nn.Module) or not callable(getattr(continuous_head, "loss", None)):
                raise TypeError(f"continuous_head must be an nn.Module with a loss method (DiffusionHead, "
                                f"RegressionHead), got {type(continuous_head).__name__}")
            if getattr(continuous_head, "cond_dim", None) != hidden:
                raise ValueError(f"continuous_head.cond_dim must be the decoder's hidden size {hidden}, got "
                                 f"{getattr(continuous_head, 'cond_dim', None)!r}")
        if image_grid is not None:
            if len(image_grid) != 2 or not all(isinstance(s, int) and s >= 1 for s in image_grid):
                raise ValueError(f"image_grid must be (max_h, max_w) positive ints, got {image_grid!r}")
            image_grid = tuple(image_grid)
        if next_position_embeddings and image_grid is None:
            raise ValueError("next_position_embeddings needs image_grid=(max_h, max_w)")

        self.decoder = decoder
        self.vocab = vocab
        self.text_loss_weight = float(text_loss_weight)
        self.image_vocab_range = bool(image_vocab_range)
        self.diffusion_batch_mul = diffusion_batch_mul
        self.input_projectors = nn.ModuleDict(
            {name: FeatureProjector(dim, hidden) for name, dim in (feature_dims or {}).items()})
        self.continuous_head = continuous_head
        self.image_grid = image_grid
        std = decoder.config.initializer_range
        self.image_position_embed = None if image_grid is None else \
            nn.Parameter(torch.randn(image_grid[0] * image_grid[1], hidden) * std)
        self.next_position_embed = None if not next_position_embeddings else \
            nn.Parameter(torch.randn(image_grid[0] * image_grid[1], hidden) * std)

    @classmethod
    def from_decoder(cls, decoder: Decoder, *, num_image_codes: int = 0, special_tokens: Sequence[str] | None = None,
                     init_seed: int = 0, **options) -> UnifiedModel:
        """Expands a text decoder (in place; it becomes ``model.decoder``) to
        ``[text | special_tokens | num_image_codes codes]``.

        The text rows of the embedding and the output head are kept bit for bit, so text
        logits are unchanged. New rows are drawn per dimension from a normal with the mean and
        standard deviation of the existing rows (embedding and head separately when untied),
        from a generator seeded with ``init_seed``. Tied embeddings stay tied (one tensor).
        ``special_tokens=None`` gives ``DEFAULT_SPECIAL_TOKENS`` (BOI, EOI, EOL, EOF, SEP,
        image_start, image_end, the ``size_*`` digits and Emu3's image token ``img``) when the model
        handles images (codes, ``feature_dims`` or a ``continuous_head``), none otherwise.
        ``options`` go to the constructor.
        """
        if not isinstance(decoder, Decoder):
            raise TypeError(f"decoder must be a unimm Decoder, got {type(decoder).__name__}")
        if special_tokens is None:
            images = num_image_codes or options.get("feature_dims") or options.get("continuous_head") is not None
            special_tokens = DEFAULT_SPECIAL_TOKENS if images else ()
        text_size = decoder.embed_tokens.weight.shape[0]
        vocab = VocabLayout(text_size, tuple(special_tokens), num_image_codes)
        new_rows = vocab.size - text_size
        if new_rows:
            tied = decoder.lm_head.weight is decoder.embed_tokens.weight
            generator = torch.Generator().manual_seed(init_seed)
            embed = decoder.embed_tokens
            embed.weight = nn.Parameter(_expanded_rows(embed.weight, new_rows, generator),
                                        requires_grad=embed.weight.requires_grad)
            embed.num_embeddings = vocab.size
            head = decoder.lm_head
            head.weight = embed.weight if tied else nn.Parameter(_expanded_rows(head.weight, new_rows, generator),
                                                                  requires_grad=head.weight.requires_grad)
            head.out_features = vocab.size
            decoder.config.vocab_size = vocab.size
        return cls(decoder, vocab, **options)

    # ---- vocabulary -------------------------------------------------------------------------

    def special_id(self, name: str) -> int:
        """Token id of a special token (``model.vocab.special_id``)."""
        return self.vocab.special_id(name)

    # ---- inputs -----------------------------------------------------------------------------

    def project_features(self, features: torch.Tensor, encoder: str = "image") -> torch.Tensor:
        """Continuous tokens ``[N, F]`` of ``encoder`` -> ``[N, hidden]`` embeddings (model dtype)."""
        if encoder not in self.input_projectors:
            raise ValueError(f"no input projector for encoder {encoder!r}; the model has "
                             f"{sorted(self.input_projectors)} (set feature_dims={{name: dim}})")
        projector = self.input_projectors[encoder]
        if features.dim() != 2 or features.shape[1] != projector.in_dim:
            raise ValueError(f"features of encoder {encoder!r} must be [N, {projector.in_dim}], got "
                             f"{tuple(features.shape)}")
        out = projector(features.to(projector.net[0].weight.dtype))
        return out.to(self.decoder.embed_tokens.weight.dtype)

    def image_position_embedding(self, grid: torch.Tensor, *, next_position: bool = False) -> torch.Tensor:
        """Embeddings ``[..., hidden]`` of grid cells ``grid [..., 2]`` (row, col); rows < 0 give 0.
        ``next_position=True`` reads the next-position table instead of the 2D one. Cells must lie
        in ``image_grid`` (``forward`` checks its batch; this method reads nothing back from the
        device, so a CUDA-graph decode step can call it)."""
        table = self.next_position_embed if next_position else self.image_position_embed
        if table is None:
            raise ValueError("this model has no " + ("next-position" if next_position else "2D position") +
                             " embeddings (image_grid / next_position_embeddings)")
        rows, cols = grid[..., 0], grid[..., 1]
        valid = rows >= 0
        index = torch.where(valid, rows * self.image_grid[1] + cols, 0)
        return table[index] * valid[..., None].to(table.dtype)

    def embed(self, input_ids: torch.Tensor, *, features: Mapping[str, Features] | None = None,
              added_features: Mapping[str, Features] | None = None, image_positions: torch.Tensor | None = None,
              next_image_positions: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``[B, S, hidden]`` (unscaled: the decoder applies ``embed_scale``).

        Args:
            input_ids: int ``[B, S]`` ids in ``[0, vocab.size)``, continuous positions included (``pack``
                writes ``placeholder_id`` there); see ``Decoder.embed_ids`` for ids out of range.
            features: encoder name -> ``Features``: projected and written over the embedding at
                flat positions ``b * S + s``.
            added_features: encoder name -> ``Features`` projected and added there (TokLIP).
            image_positions: int ``[B, S, >=2]`` (row, col, ...) grid cells, -1 elsewhere: the 2D
                embedding is added (when the model has ``image_grid``).
            next_image_positions: int ``[B, S, 2]``: the cell each position predicts; its
                next-position embedding is added (when the model has them).
        """
        batch, seq = input_ids.shape
        x = self.decoder.embed_ids(input_ids)  # ids out of range: ValueError on the CPU, NaN on a GPU
        if features or added_features:
            flat = x.reshape(batch * seq, -1)
            for name, given in (features or {}).items():
                flat = flat.index_copy(0, given.positions, self.project_features(given.values, name))
            for name, given in (added_features or {}).items():
                flat = flat.index_add(0, given.positions, self.project_features(given.values, name))
            x = flat.view(batch, seq, -1)
        if self.image_position_embed is not None and image_positions is not None:
            x = x + self.image_position_embedding(image_positions[..., :2]).to(x.dtype)
        if self.next_position_embed is not None and next_image_positions is not None:
            x = x + self.image_position_embedding(next_image_positions, next_position=True).to(x.dtype)
        return x

    # ---- outputs ----------------------------------------------------------------------------

    def logits(self, hidden: torch.Tensor, vocab_range: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits of ``hidden [..., hidden]`` over ``vocab_range`` (default: the whole vocabulary),
        final soft-cap included; column j is token ``lo + j``. ``model.vocab.image_codes`` gives
        the code block, ``(0, model.vocab.image_codes[0])`` text and special tokens."""
        lo, hi = vocab_range if vocab_range is not None else (0, self.vocab.size)
        if not 0 <= lo < hi <= self.vocab.size:
            raise ValueError(f"vocab_range must satisfy 0 <= lo < hi <= {self.vocab.size}, got {vocab_range!r}")
        return self.decoder.logits(hidden, (lo, hi))

    # ---- generation -------------------------------------------------------------------------

    def generate(self, prompts, *, max_new_tokens: int, **options) -> list[list]:
        """Continues each prompt (a list of segments) with text and, given ``image=ImageSpec(...)``,
        images; returns the continuation of each, as segments. ``unimm.models.generation.
        generate_segments(self, prompts, max_new_tokens=..., **options)``, which documents the
        options (sampling, images and guidance, stop tokens, cache length, CUDA graphs)."""
        return generate_segments(self, prompts, max_new_tokens=max_new_tokens, **options)

    # ---- training ---------------------------------------------------------------------------

    def forward(self, batch: Batch, *, generator: torch.Generator | None = None) -> dict:
        """Losses of a packed batch (``pack(..., vocab=model.vocab)``): a dict with ``loss``,
        ``text_loss``, ``image_code_loss``, ``continuous_loss``, ``visual_loss`` (0-dim tensors)
        and ``num_text_tokens``, ``num_image_code_tokens``, ``num_continuous_tokens`` (ints).
        ``generator`` drives the diffusion head's timesteps and noise."""
        self.check_batch(batch)
        embeds = self.embed(batch.input_ids, features=batch.input_features, added_features=batch.added_features,
                            image_positions=batch.image_positions, next_image_positions=batch.next_image_positions)
        hidden = self.decoder(inputs_embeds=embeds, positions=batch.positions, mask=batch.mask)
        return self.losses(hidden, batch, generator=generator)

    def losses(self, hidden: torch.Tensor, batch: Batch, *, generator: torch.Generator | None = None) -> dict:
        """The loss dict of ``forward`` from the decoder's hidden states ``[B, S, hidden]``.
        Each loss runs on its own rows only (gathered by ``Batch.heads``; finding them reads the
        row counts back from the device once per head)."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        heads = batch.heads.reshape(-1)
        targets = batch.targets.reshape(-1)
        weights = batch.loss_weights.reshape(-1).to(torch.float32)
        zero = torch.zeros((), device=hidden.device, dtype=torch.float32)
        out = {}
        for name, head, vocab_range in (
                ("text", Head.TEXT, None),
                ("image_code", Head.IMAGE_CODE, self.vocab.image_codes if self.image_vocab_range else None)):
            rows = (heads == head).nonzero().squeeze(1)
            out[f"num_{name}_tokens"] = rows.numel()
            out[f"{name}_loss"] = zero if not rows.numel() else self.decoder.loss(
                flat[rows], targets[rows], token_weights=weights[rows], vocab_range=vocab_range)
        continuous = batch.target_features
        out["num_continuous_tokens"] = 0 if continuous is None else continuous.positions.numel()
        out["continuous_loss"] = zero
        if out["num_continuous_tokens"]:
            head = self.continuous_head
            dtype = next(head.parameters()).dtype
            cond = flat[continuous.positions].to(dtype)
            options = {"batch_mul": self.diffusion_batch_mul, "generator": generator} \
                if isinstance(head, DiffusionHead) else {}
            out["continuous_loss"] = head.loss(cond, continuous.values.to(dtype), mask=weights[continuous.positions],
                                               **options)
        out["visual_loss"] = out["image_code_loss"] + out["continuous_loss"]
        out["loss"] = out["visual_loss"] + self.text_loss_weight * out["text_loss"]
        return out

    def check_batch(self, batch: Batch) -> None:
        """Raises a ValueError (TypeError for a non-Batch) naming what in ``batch`` does not fit this
        model: its vocabulary, device, feature encoders and widths, image grid, continuous targets.
        ``forward`` and generation check every batch with it."""
        if not isinstance(batch, Batch):
            raise TypeError(f"batch must be a Batch from unimm.models.sequence.pack, got {type(batch).__name__}")
        if batch.vocab != self.vocab:
            raise ValueError(f"the batch was packed for {batch.vocab}, but the model's vocabulary is {self.vocab}; "
                             f"pack with vocab=model.vocab")
        device = self.decoder.embed_tokens.weight.device
        if batch.input_ids.device != device:
            raise ValueError(f"the batch is on {batch.input_ids.device} but the model on {device}; "
                             f"use batch.to(device)")
        for kind, given in (("input", batch.input_features), ("added", batch.added_features)):
            for name, features in given.items():
                if name not in self.input_projectors:
                    raise ValueError(f"the batch has {kind} features of encoder {name!r} but the model has no input "
                                     f"projector for it (feature_dims has {sorted(self.input_projectors)})")
                if features.values.shape[1] != self.input_projectors[name].in_dim:
                    raise ValueError(f"{kind} features of encoder {name!r} are {features.values.shape[1]} wide; its "
                                     f"projector takes {self.input_projectors[name].in_dim}")
        if self.image_grid is not None:
            max_h, max_w = self.image_grid
            cells = torch.cat([batch.image_positions[..., :2], batch.next_image_positions]).reshape(-1, 2)
            if ((cells[:, 0] >= max_h) | (cells[:, 1] >= max_w)).any():
                raise ValueError(f"the batch has image grid positions up to row {int(cells[:, 0].max())}, col "
                                 f"{int(cells[:, 1].max())}, outside image_grid = ({max_h}, {max_w})")
        if batch.target_features is not None:
            if self.continuous_head is None:
                raise ValueError("the batch has continuous targets (ContinuousImage role='target') but the model has "
                                 "no continuous_head")
            width, want = batch.target_features.values.shape[1], self.continuous_head.token_dim
            if width != want:
                raise ValueError(f"continuous targets are {width} wide but continuous_head.token_dim is {want}")
