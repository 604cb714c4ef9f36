"""AttentionMask: one interval of visible keys per query row (docs/ARCHITECTURE.md, "Attention masks").

Row ``i`` of batch ``b`` sees keys ``[kv_start[b, i], kv_end[b, i])``. Causal, prefix-LM,
bidirectional image spans inside packed documents and sliding windows all have this form, at
8 bytes per token instead of an N x N mask. Builders are a few tensor ops on the input's device
(no Python loop over tokens) and check their input once (one device read).

Every way unimm turns what a caller holds into intervals lives here, so the decoder, generation
and the transformers integration build masks one way: packed documents and spans
(``from_spans``, with ``span_ids_of_runs`` and ``packed_documents`` to derive their ids), 2-D
padding masks (``from_padding``, ``within_padding``), 4-D dense masks (``from_dense``), chunks
after cached keys (``causal_after``, ``continued``), sliding windows (``windowed``) and caches that
dropped their oldest keys (``dropping``).

A hand-built mask (``AttentionMask(kv_start, kv_end, num_keys)``) is checked for types, shapes
and devices only (reading its values would sync with the device). Where it meets the keys,
``attention`` and ``to_dense`` clamp its bounds to ``[0, Skv]``; a row with ``kv_end <= kv_start``
sees nothing.
"""

from __future__ import annotations

import torch

from unimm.kernels._intervals import (
    as_int32,
    check_int,
    check_pair,
    check_size,
    dense_runs,
    first_bad_row,
    image_blocks,
    kept_run,
    normal_pair,
    shared_prompt,
    sinks_and_window,
    split_runs,
)

_LAYOUTS = (None, "causal", "documents")



class AttentionMask:
    """Visible-key intervals: row i of batch b sees ``[kv_start[b, i], kv_end[b, i])`` (int32
    ``[B, S]``, end exclusive) and, for a two-interval mask, also ``[kv_start2, kv_end2)``
    (None for a one-interval mask). Built from ``[B, S, 2]`` bounds, the pair is kept in normal
    form: disjoint (overlapping intervals are merged into the first), a lone non-empty interval
    first, otherwise the earlier one first. A row sees the union; an interval with
    ``end <= start`` is empty.

    ``num_keys`` is the largest end: ``attention`` needs at least that many keys.

    ``layout`` is what a builder knows about the intervals without reading them back: ``"causal"``
    (``causal`` with no cached keys: row i sees ``[0, i + 1)``), ``"documents"`` (``from_spans``
    without bidirectional spans or padding: causal within each packed document), or None (any
    other mask, hand-built ones and every two-interval mask included). ``attention`` hands the
    first two to a vendor kernel that computes the same thing (``unimm.kernels._attention_vendor``).
    """

    def __init__(self, kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int, *, layout: str | None = None):
        check_int("kv_start", kv_start, (2, 3))
        check_int("kv_end", kv_end, (2, 3))
        if kv_end.shape != kv_start.shape or kv_end.device != kv_start.device:
            raise ValueError(f"kv_end must match kv_start in shape and device, got {tuple(kv_end.shape)} on "
                             f"{kv_end.device} and {tuple(kv_start.shape)} on {kv_start.device}")
        self.kv_start2 = self.kv_end2 = None
        if kv_start.dim() == 3:
            check_pair(kv_start)
            if layout is not None:
                raise ValueError(f"layout must be None for a mask of two intervals per row, got {layout!r}")
            kv_start, kv_end, self.kv_start2, self.kv_end2 = normal_pair(as_int32(kv_start), as_int32(kv_end))
        self.kv_start = as_int32(kv_start)
        self.kv_end = as_int32(kv_end)
        self.num_keys = check_size("num_keys", num_keys, 0)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self._tile_bounds: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._documents: tuple[torch.Tensor, int] | None = None
        self._parts: tuple[AttentionMask, ...] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kv_start.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    @property
    def intervals(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """((kv_start, kv_end),) or, for a two-interval mask, both intervals' bounds."""
        if self.kv_start2 is None:
            return ((self.kv_start, self.kv_end),)
        return (self.kv_start, self.kv_end), (self.kv_start2, self.kv_end2)

    def parts(self) -> tuple[AttentionMask, ...]:
        """One one-interval mask per interval (this mask itself when it has one): what the
        kernels run, once each. Cached, so each part keeps its tile bounds."""
        if self._parts is None:
            self._parts = (self,) if self.kv_start2 is None else tuple(
                AttentionMask(start, end, self.num_keys) for start, end in self.intervals)
        return self._parts

    def to(self, device, non_blocking: bool = False) -> AttentionMask:
        """This mask on ``device`` (layout kept)."""
        bounds = [torch.stack(pair, -1) for pair in zip(*self.intervals)] if self.kv_start2 is not None else \
            [self.kv_start, self.kv_end]
        return AttentionMask(*(t.to(device, non_blocking=non_blocking) for t in bounds), self.num_keys,
                             layout=self.layout)

    def _with(self, bounds, num_keys: int | None = None) -> AttentionMask:
        """A mask of this one's form over new bounds: ``bounds(start, end) -> (start, end)`` applied
        to each interval (elementwise ops on ``[B, S]``, or on ``[B, S, 2]`` for both at once)."""
        num_keys = self.num_keys if num_keys is None else num_keys
        if self.kv_start2 is None:
            start, end = bounds(self.kv_start, self.kv_end)
        else:
            start, end = bounds(torch.stack([self.kv_start, self.kv_start2], -1),
                                torch.stack([self.kv_end, self.kv_end2], -1))
        return AttentionMask(start.to(torch.int32), end.to(torch.int32), num_keys)

    def __repr__(self) -> str:
        two = ", two intervals per row" if self.kv_start2 is not None else ""
        return f"AttentionMask(batch={self.shape[0]}, seq_len={self.shape[1]}, num_keys>={self.num_keys}{two})"

    # ---- builders ---------------------------------------------------------------------------

    @classmethod
    def causal(cls, batch_size: int, seq_len: int, *, past_len: int = 0, device=None) -> AttentionMask:
        """Row i sees ``[0, past_len + i + 1)``: causal attention after ``past_len`` cached keys."""
        batch_size = check_size("batch_size", batch_size, 1)
        seq_len = check_size("seq_len", seq_len, 0)
        past_len = check_size("past_len", past_len, 0)
        end = torch.arange(past_len + 1, past_len + seq_len + 1, dtype=torch.int32, device=device)
        end = end.expand(batch_size, seq_len).contiguous()
        return cls(torch.zeros_like(end), end, past_len + seq_len, layout="causal" if past_len == 0 else None)

    @classmethod
    def prefix_lm(cls, prefix_lens: torch.Tensor, seq_len: int) -> AttentionMask:
        """Row i of batch b sees ``[0, max(i + 1, prefix_lens[b]))``: the prefix (image +
        question) is bidirectional, the rest causal (PaliGemma / UniFluid)."""
        check_int("prefix_lens", prefix_lens, 1)
        seq_len = check_size("seq_len", seq_len, 0)
        bad = first_bad_row(((prefix_lens < 0) | (prefix_lens > seq_len))[:, None])
        if bad is not None:
            raise ValueError(f"prefix_lens[{bad}] = {int(prefix_lens[bad])} is outside [0, {seq_len}]")
        rows = torch.arange(1, seq_len + 1, dtype=torch.int32, device=prefix_lens.device)
        end = torch.maximum(rows[None, :], prefix_lens.to(torch.int32)[:, None])
        return cls(torch.zeros_like(end), end, seq_len)

    @classmethod
    def from_spans(cls, doc_ids: torch.Tensor, span_ids: torch.Tensor) -> AttentionMask:
        """Packed documents with bidirectional spans: i sees j iff ``doc[i] == doc[j] >= 0`` and
        (``j <= i`` or ``span[i] == span[j] != 0``). Documents and spans must be contiguous runs;
        ``doc = -1`` marks padding, which sees nothing. Row i sees
        ``[doc_start(i), max(i + 1, span_end(i)))``."""
        check_int("doc_ids", doc_ids, 2)
        check_int("span_ids", span_ids, 2)
        if span_ids.shape != doc_ids.shape or span_ids.device != doc_ids.device:
            raise ValueError(f"span_ids must match doc_ids in shape and device, got {tuple(span_ids.shape)} on "
                             f"{span_ids.device} and {tuple(doc_ids.shape)} on {doc_ids.device}")
        batch, seq_len = doc_ids.shape
        doc = doc_ids.long()
        span = span_ids.long()
        positions = torch.arange(seq_len, device=doc.device).expand(batch, seq_len)
        doc_starts = torch.ones_like(doc, dtype=torch.bool)
        doc_starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
        span_starts = doc_starts.clone()
        span_starts[:, 1:] |= span[:, 1:] != span[:, :-1]
        problems = torch.stack([
            (doc < -1).any(1),
            (span < 0).any(1),
            split_runs(doc_starts & (doc >= 0), doc),
            split_runs(span_starts & (span != 0) & (doc >= 0), doc, span),  # a span within its doc
        ])
        # the one device read: any problem, and whether some row has a bidirectional span or padding
        bad, not_plain = torch.stack([problems.any(), ((span != 0) | (doc < 0)).any()]).tolist()
        if bad:
            kind, row = problems.nonzero()[0].tolist()
            raise ValueError([
                f"doc_ids row {row}: ids must be >= 0, or -1 for padding",
                f"span_ids row {row}: ids must be >= 0 (0: no span)",
                f"doc_ids row {row}: a document appears in two separate runs; documents must be contiguous",
                f"span_ids row {row}: a span appears in two separate runs; spans must be contiguous",
            ][kind])

        doc_start = torch.cummax(torch.where(doc_starts, positions, 0), dim=1).values
        # first span-run start after i (seq_len when none): a reversed running minimum
        next_start = torch.full_like(positions, seq_len)
        next_start[:, :-1] = torch.where(span_starts[:, 1:], positions[:, 1:], seq_len)
        span_end = torch.flip(torch.cummin(torch.flip(next_start, [1]), dim=1).values, [1])
        end = torch.where(span != 0, torch.maximum(positions + 1, span_end), positions + 1)
        padding = doc < 0
        start = torch.where(padding, 0, doc_start).to(torch.int32)
        end = torch.where(padding, 0, end).to(torch.int32)
        return cls(start, end, seq_len, layout=None if not_plain else "documents")

    @classmethod
    def from_intervals(cls, kv_start: torch.Tensor, kv_end: torch.Tensor) -> AttentionMask:
        """Any other mask of this form (sliding windows, ...): row i sees ``[kv_start, kv_end)``,
        int ``[B, S]`` with ``0 <= kv_start <= kv_end``; or two disjoint intervals per row, int
        ``[B, S, 2]`` (16 bytes per token), the first with ``0 <= start <= end``, the second empty
        (``start >= end``) or non-negative and not overlapping the first. Two-interval bounds
        whose second intervals are all empty give a one-interval mask (the kernels then run once)."""
        check_int("kv_start", kv_start, (2, 3))
        check_int("kv_end", kv_end, (2, 3))
        if kv_end.shape != kv_start.shape or kv_end.device != kv_start.device:
            raise ValueError(f"kv_end must match kv_start in shape and device, got {tuple(kv_end.shape)} and "
                             f"{tuple(kv_start.shape)}")
        if kv_start.dim() == 2:
            bad = first_bad_row((kv_start < 0) | (kv_end < kv_start))
            if bad is not None:
                raise ValueError(f"kv_start / kv_end row {bad}: need 0 <= kv_start <= kv_end")
            return cls(kv_start, kv_end, int(kv_end.max()) if kv_end.numel() else 0)
        check_pair(kv_start)
        (s1, s2), (e1, e2) = kv_start.unbind(-1), kv_end.unbind(-1)
        second = e2 > s2
        problems = torch.stack([((s1 < 0) | (e1 < s1)).flatten(1).any(1),
                                (second & (s2 < 0)).flatten(1).any(1),
                                (second & (s2 < e1) & (s1 < e2) & (e1 > s1)).flatten(1).any(1)], 1)
        ends = torch.where(second, e2, e1).maximum(e1).flatten()
        top = ends.max().reshape(1) if ends.numel() else ends.new_zeros(1)
        # the one device read: problems, whether some second interval is not empty, the largest end
        found = torch.cat([problems.any(0).long(), second.any().reshape(1).long(), top.long()]).tolist()
        if any(found[:3]):
            kind = found.index(True)
            row = int(problems[:, kind].nonzero()[0, 0])
            raise ValueError(f"kv_start / kv_end row {row}: " + [
                "the first interval needs 0 <= start <= end",
                "a non-empty second interval needs 0 <= start",
                "the two intervals overlap; they must be disjoint"][kind])
        num_keys = found[4]
        if not found[3]:
            return cls(s1, e1, num_keys)
        return cls(kv_start, kv_end, num_keys)

    @classmethod
    def from_padding(cls, padding: torch.Tensor, seq_len: int, past_len: int = 0) -> AttentionMask:
        """Causal attention under a 2-D padding mask ``[B, past_len + seq_len]`` (1: a real token):
        query row i (absolute position ``past_len + i``) sees the kept keys ``j <= past_len + i``.
        Each row's ones must be one contiguous run (right or left padding); rows before the run see
        nothing."""
        end = torch.arange(past_len + 1, past_len + seq_len + 1, dtype=torch.int32, device=padding.device)
        end = end.expand(padding.shape[0], seq_len)
        return cls(torch.zeros_like(end), end, past_len + seq_len).within_padding(padding)

    @classmethod
    def from_dense(cls, mask: torch.Tensor, seq_len: int, past_len: int = 0) -> AttentionMask:
        """The intervals of a 4-D mask ``[B, 1, S, K]``: bool (True: visible) or additive float (0:
        visible, <= -1e3: masked, as transformers builds them), column j = key position j
        (``K >= past_len + S``; a static cache's unwritten slots must be masked). Each row's visible
        keys must form one contiguous run, or two (then the mask has two intervals per row, e.g.
        attention sinks plus a sliding window)."""
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != seq_len or mask.shape[3] < past_len + seq_len:
            raise ValueError(f"a 4-D attention_mask must be [batch, 1, seq, keys >= past + seq] = [B, 1, {seq_len}, "
                             f">= {past_len + seq_len}], got {list(mask.shape)}")
        if mask.dtype == torch.bool:
            visible = mask[:, 0]
            other = torch.zeros((), dtype=torch.bool, device=mask.device)
        elif mask.is_floating_point():
            visible = mask[:, 0] == 0
            other = ((mask[:, 0] != 0) & (mask[:, 0] > -1e3)).any()
        else:
            raise TypeError(f"a 4-D attention_mask must be bool or floating point, got {mask.dtype}")
        start, end, runs = dense_runs(visible)
        flags = torch.stack([other, (runs > 2).any(), (end.amax(-1) > past_len + seq_len).any(), (runs == 2).any()])
        flags = flags.tolist()  # the one device read
        if any(flags[:3]):
            raise ValueError([
                "a float 4-D attention_mask may hold only 0 (visible) and large negative values (masked): "
                "unimm's attention takes no additive biases",
                f"mask (a 4-D attention_mask) batch row {first_bad_row(runs > 2)}: a query row's visible keys must "
                "form one or two contiguous runs (at most two key intervals per row)",
                f"a 4-D attention_mask lets rows see keys at or after position {past_len + seq_len}, which this "
                "call has not written",
            ][flags.index(True)])
        if not flags[3]:
            return cls(start[..., 0], end[..., 0], past_len + seq_len)
        return cls(start, end, past_len + seq_len)

    @classmethod
    def causal_after(cls, past_lens: torch.Tensor, seq_len: int, num_keys: int) -> AttentionMask:
        """Causal rows after ``past_lens[b]`` cached keys of each row (int ``[B]``, not read back):
        row i of batch b sees ``[0, past_lens[b] + i + 1)`` of ``num_keys`` (the cache's capacity)."""
        rows = torch.arange(1, seq_len + 1, dtype=torch.int32, device=past_lens.device)
        end = rows + past_lens[:, None]
        return cls(torch.zeros_like(end), end.to(torch.int32), num_keys)

    # ---- two intervals per row ----------------------------------------------------------------

    @classmethod
    def sinks_and_window(cls, batch_size: int, seq_len: int, *, sinks: int, window: int, past_len: int = 0,
                         device=None) -> AttentionMask:
        """Attention sinks plus a sliding window (StreamingLLM): row i, at key position
        ``p = past_len + i``, sees the first ``sinks`` keys and the last ``window`` keys up to
        itself, ``[0, min(sinks, p + 1)) + [max(sinks, p + 1 - window), p + 1)``. One interval
        per row when no row's window has left the sinks behind (``causal`` then, without cached
        keys), else two."""
        start, end = sinks_and_window(batch_size, seq_len, sinks, window, past_len, device)
        causal = past_len == 0 and start.dim() == 2 and seq_len <= window + sinks
        return cls(start, end, past_len + seq_len, layout="causal" if causal else None)

    @classmethod
    def shared_prompt(cls, prompt_lens: torch.Tensor, completion_lens: torch.Tensor, seq_len: int) -> AttentionMask:
        """A shared prompt with several completions packed after it (GRPO / DPO): row b holds
        ``prompt_lens[b]`` prompt tokens (int ``[B]``), then completions of ``completion_lens[b]``
        tokens each (int ``[B, C]``, C >= 1, zeros allowed), then padding up to ``seq_len``. Prompt
        rows are causal; a completion's row i sees the whole prompt and its own completion up to
        itself, ``[0, prompt) + [completion start, i + 1)``, never another completion; padding
        rows see nothing. Two intervals per row."""
        start, end = shared_prompt(prompt_lens, completion_lens, seq_len)
        return cls(start, end, seq_len)

    @classmethod
    def image_blocks(cls, image_ids: torch.Tensor) -> AttentionMask:
        """Image blocks that see every earlier image block but not the text between them
        (Molmo-style): ``image_ids [B, S]``, 0 on text, k > 0 on the tokens of image block k
        (contiguous runs; adjacent blocks need distinct ids). A token of block k sees exactly the
        image tokens of block k (bidirectionally) and of every block before it; a text token at
        i sees every key ``j <= i``, text and image. Image tokens form runs (adjacent blocks join
        one run): a block with text between it and both earlier runs would need three intervals,
        which raises ValueError naming the row. One interval per row when every image token lies
        in the first run, else two."""
        start, end = image_blocks(image_ids)
        return cls(start, end, image_ids.shape[1])

    # ---- derived masks ----------------------------------------------------------------------

    def continued(self, past_lens: torch.Tensor, num_keys: int) -> AttentionMask:
        """This chunk's mask after ``past_lens[b]`` cached keys of each row (int ``[B]``, not read
        back), over ``num_keys`` keys: an interval ``[s, e)`` becomes ``[s + past, e + past)``, and
        one that starts at the chunk's first key also sees every cached key, ``[0, e + past)``, so
        a causal or prefix-LM chunk continues the cached sequence. Empty intervals stay empty. Each
        interval of a two-interval mask alike (a pair that then overlaps is merged)."""

        def shifted(start, end):
            shift = _per_batch(past_lens, start)
            new_end = end + shift
            new_start = torch.where(start > 0, start + shift, 0)
            return torch.where(end <= start, new_end, new_start), new_end
        return self._with(shifted, num_keys)

    def windowed(self, window: int, positions: torch.Tensor) -> AttentionMask:
        """Each row's intervals cut to the ``window`` keys ending at its own key position
        (``positions``, int, broadcast to ``[B, S]``): keys ``j > positions - window``. An interval
        left with nothing is empty."""

        def cut(start, end):
            low = positions[..., None] if start.dim() == 3 else positions
            return torch.minimum(torch.maximum(start, low - (window - 1)), end), end
        return self._with(cut)

    def dropping(self, count: int) -> AttentionMask:
        """The mask over the keys left after the first ``count`` are dropped (a sliding-window cache
        that keeps only recent keys): key j becomes ``j - count``, bounds clamped at 0."""
        return self._with(lambda start, end: ((start - count).clamp_min(0), (end - count).clamp_min(0)),
                          max(self.num_keys - count, 0))

    def within_padding(self, padding: torch.Tensor) -> AttentionMask:
        """Each row's intervals intersected with its batch row's run of kept keys in a 2-D padding
        mask ``[B, num_keys]`` (1: a real token; the ones must form one contiguous run); intervals
        left with nothing become empty."""
        first, last = kept_run(padding)

        def intersect(start, end):
            start = torch.maximum(start, _per_batch(first, start).to(start.dtype))
            return start, torch.maximum(torch.minimum(end, _per_batch(last, end).to(end.dtype)), start)
        return self._with(intersect)

    # ---- views ------------------------------------------------------------------------------

    def to_dense(self, num_keys: int) -> torch.Tensor:
        """bool ``[B, S, num_keys]``: True where a query row sees a key (bounds outside
        ``[0, num_keys]`` are so clamped). For debugging, tests and the reference."""
        keys = torch.arange(check_size("num_keys", num_keys, 0), device=self.device)
        dense = None
        for start, end in self.intervals:
            inside = (keys >= start[..., None]) & (keys < end[..., None])
            dense = inside if dense is None else dense | inside
        return dense

    def documents(self) -> tuple[torch.Tensor, int]:
        """For a ``"documents"`` mask: ``cu_seqlens`` (int32 ``[docs + 1]``, the documents' starts
        in the batch's tokens laid end to end, then their total) and the longest document's
        length, as FlashAttention's varlen kernels take them. Read back once, then cached."""
        if self.layout != "documents":
            raise ValueError(f"documents() needs a mask built by from_spans without spans or padding, got layout "
                             f"{self.layout!r}")
        if self._documents is None:
            batch, seq_len = self.shape
            first = (self.kv_start == torch.arange(seq_len, device=self.device)).flatten()  # a document's first token
            tokens = torch.arange(batch * seq_len, device=self.device)
            cu_seqlens = torch.cat([tokens[first], tokens.new_tensor([batch * seq_len])]).to(torch.int32)
            self._documents = (cu_seqlens, int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0)
        return self._documents

    def mask_mod(self):
        """This mask as FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)``: row ``q_idx`` of batch
        ``b`` sees ``kv_idx`` iff ``kv_start[b, q_idx] <= kv_idx < kv_end[b, q_idx]`` (or it lies in
        the second interval; every head alike), reading the same interval tensors."""
        start, end = self.kv_start, self.kv_end
        if self.kv_start2 is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return (kv_idx >= start[b, q_idx]) & (kv_idx < end[b, q_idx])
            return mask_mod
        start2, end2 = self.kv_start2, self.kv_end2

        def mask_mod_two(b, h, q_idx, kv_idx):
            return ((kv_idx >= start[b, q_idx]) & (kv_idx < end[b, q_idx])) | \
                ((kv_idx >= start2[b, q_idx]) & (kv_idx < end2[b, q_idx]))
        return mask_mod_two

    def to_flex_block_mask(self, num_keys: int | None = None, *, block_size: int = 128):
        """FlexAttention's ``BlockMask`` of this mask over ``num_keys`` keys (default
        ``self.num_keys``), so the same mask can be handed to ``flex_attention``. Needs torch's
        ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
        from torch.nn.attention.flex_attention import create_block_mask

        num_keys = self.num_keys if num_keys is None else check_size("num_keys", num_keys, 0)
        batch, seq_len = self.shape
        return create_block_mask(self.mask_mod(), batch, None, seq_len, num_keys, device=self.device,
                                 BLOCK_SIZE=check_size("block_size", block_size, 1))

    def visible_pairs(self) -> int:
        """Number of visible (query, key) pairs: what attention FLOPs are counted on."""
        return sum(int((end - start).clamp_min(0).sum()) for start, end in self.intervals)

    def tile_bounds(self, block_m: int, block_n: int, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the backward's dK/dV pass: per batch and key tile of ``block_n`` keys, the first
        and one-past-last query tile of ``block_m`` rows whose rows see any key of it
        (int32 ``[B, key tiles]``; first == last when none does). For two intervals per row, the
        query tiles either interval touches. Cached per tile shape."""
        key = (block_m, block_n, num_keys)
        if key not in self._tile_bounds:
            batch, seq_len = self.shape
            q_tiles = -(-seq_len // block_m)
            k_tiles = -(-num_keys // block_n)
            pad = q_tiles * block_m - seq_len
            tile_lo = torch.arange(k_tiles, device=self.device) * block_n
            touches = None  # [B, q tiles, k tiles]
            for kv_start, kv_end in self.intervals:
                # bounds clamped to the keys, as the kernels clamp them
                start, end = (torch.nn.functional.pad(bound.clamp(0, num_keys), (0, pad), value=value).reshape(
                    batch, q_tiles, block_m) for bound, value in ((kv_start, num_keys), (kv_end, 0)))
                # a query tile may touch key tile j when its rows' hull [min start, max end) meets it
                empty = end <= start
                lo = torch.where(empty, num_keys, start).min(-1).values
                hi = torch.where(empty, 0, end).max(-1).values
                hit = (lo[:, :, None] < tile_lo + block_n) & (hi[:, :, None] > tile_lo)
                touches = hit if touches is None else touches | hit
            any_touch = touches.any(1)
            first = torch.where(any_touch, touches.int().argmax(1), 0)
            last = torch.where(any_touch, q_tiles - touches.flip(1).int().argmax(1), 0)
            self._tile_bounds[key] = (first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous())
        return self._tile_bounds[key]


def _per_batch(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values [B]`` shaped to broadcast against bounds ``like [B, S]`` or ``[B, S, 2]``."""
    return values.reshape(-1, *[1] * (like.dim() - 1))


def span_ids_of_runs(flags: torch.Tensor) -> torch.Tensor:
    """int64 span ids of per-token flags ``[..., S]`` (bool): ``k`` on the k-th run of True along
    the last dim (counting from 1), 0 elsewhere; the ``span_ids`` of ``from_spans`` when the flags
    mark bidirectional tokens."""
    starts = flags.clone()
    starts[..., 1:] &= ~flags[..., :-1]
    return torch.where(flags, starts.long().cumsum(-1), 0)


def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document ids ``[B, S]`` of sequences packed into one row, found where ``position_ids``
    do not step by one (as transformers finds them); None when every row holds one sequence."""
    steps = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    documents = (steps != 1).cumsum(-1)
    if (documents[:, -1] == 0).all():
        return None
    return documents
