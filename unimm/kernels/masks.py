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

import numbers

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_LAYOUTS = (None, "causal", "documents")


def _check_size(name: str, value, low: int) -> int:
    """A Python int argument (not a bool, not a float) >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_int(name: str, value, dims: int) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(value.shape)}")


def _split_runs(run_starts: torch.Tensor, *keys: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: some key (a tuple of ids, e.g. (doc, span)) starts two runs in the row, i.e.
    its tokens are not contiguous. Compares the tuples themselves (stable sorts, least significant
    key first, run starts ahead of the rest), so any int64 ids work."""
    order = torch.arange(run_starts.shape[1], device=run_starts.device).expand_as(run_starts)
    for key in (*reversed(keys), (~run_starts).to(torch.int8)):
        order = order.gather(1, key.gather(1, order).sort(dim=1, stable=True).indices)
    starts = run_starts.gather(1, order)
    repeated = starts[:, 1:] & starts[:, :-1]
    for key in keys:
        key = key.gather(1, order)
        repeated &= key[:, 1:] == key[:, :-1]
    return repeated.any(1)


def _as_int32(bounds: torch.Tensor) -> torch.Tensor:
    """int32, contiguous (what the kernels read); other integer dtypes saturate, not wrap."""
    if bounds.dtype != torch.int32:
        info = torch.iinfo(torch.int32)
        bounds = bounds.to(torch.int64).clamp(info.min, info.max).to(torch.int32)
    return bounds.contiguous()


def _first_bad_row(bad: torch.Tensor) -> int | None:
    """Index of the first batch row where ``bad [B, ...]`` holds, or None (one device read)."""
    rows = bad.reshape(bad.shape[0], -1).any(-1)
    if not rows.any():
        return None
    return int(rows.nonzero()[0, 0])


class AttentionMask:
    """Visible-key intervals ``kv_start``, ``kv_end``: int32 ``[B, S]``, end exclusive.

    ``num_keys`` is the largest ``kv_end``: ``attention`` needs at least that many keys.

    ``layout`` is what a builder knows about the intervals without reading them back: ``"causal"``
    (``causal`` with no cached keys: row i sees ``[0, i + 1)``), ``"documents"`` (``from_spans``
    without bidirectional spans or padding: causal within each packed document), or None (any
    other mask, hand-built ones included). ``attention`` hands the first two to a vendor kernel
    that computes the same thing (``unimm.kernels._attention_vendor``).
    """

    def __init__(self, kv_start: torch.Tensor, kv_end: torch.Tensor, num_keys: int, *, layout: str | None = None):
        _check_int("kv_start", kv_start, 2)
        _check_int("kv_end", kv_end, 2)
        if kv_end.shape != kv_start.shape or kv_end.device != kv_start.device:
            raise ValueError(f"kv_end must match kv_start in shape and device, got {tuple(kv_end.shape)} on "
                             f"{kv_end.device} and {tuple(kv_start.shape)} on {kv_start.device}")
        self.kv_start = _as_int32(kv_start)
        self.kv_end = _as_int32(kv_end)
        self.num_keys = _check_size("num_keys", num_keys, 0)
        if layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
        self.layout = layout
        self._tile_bounds: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._documents: tuple[torch.Tensor, int] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kv_start.shape)

    @property
    def device(self) -> torch.device:
        return self.kv_start.device

    def __repr__(self) -> str:
        return f"AttentionMask(batch={self.shape[0]}, seq_len={self.shape[1]}, num_keys>={self.num_keys})"

    # ---- builders ---------------------------------------------------------------------------

    @classmethod
    def causal(cls, batch_size: int, seq_len: int, *, past_len: int = 0, device=None) -> AttentionMask:
        """Row i sees ``[0, past_len + i + 1)``: causal attention after ``past_len`` cached keys."""
        batch_size = _check_size("batch_size", batch_size, 1)
        seq_len = _check_size("seq_len", seq_len, 0)
        past_len = _check_size("past_len", past_len, 0)
        end = torch.arange(past_len + 1, past_len + seq_len + 1, dtype=torch.int32, device=device)
        end = end.expand(batch_size, seq_len).contiguous()
        return cls(torch.zeros_like(end), end, past_len + seq_len, layout="causal" if past_len == 0 else None)

    @classmethod
    def prefix_lm(cls, prefix_lens: torch.Tensor, seq_len: int) -> AttentionMask:
        """Row i of batch b sees ``[0, max(i + 1, prefix_lens[b]))``: the prefix (image +
        question) is bidirectional, the rest causal (PaliGemma / UniFluid)."""
        _check_int("prefix_lens", prefix_lens, 1)
        seq_len = _check_size("seq_len", seq_len, 0)
        bad = _first_bad_row(((prefix_lens < 0) | (prefix_lens > seq_len))[:, None])
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
        _check_int("doc_ids", doc_ids, 2)
        _check_int("span_ids", span_ids, 2)
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
            _split_runs(doc_starts & (doc >= 0), doc),
            _split_runs(span_starts & (span != 0) & (doc >= 0), doc, span),  # a span within its doc
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
        """Any other mask of this form (sliding windows, ...): row i sees ``[kv_start, kv_end)``."""
        _check_int("kv_start", kv_start, 2)
        _check_int("kv_end", kv_end, 2)
        if kv_end.shape != kv_start.shape or kv_end.device != kv_start.device:
            raise ValueError(f"kv_end must match kv_start in shape and device, got {tuple(kv_end.shape)} and "
                             f"{tuple(kv_start.shape)}")
        bad = _first_bad_row((kv_start < 0) | (kv_end < kv_start))
        if bad is not None:
            raise ValueError(f"kv_start / kv_end row {bad}: need 0 <= kv_start <= kv_end")
        num_keys = int(kv_end.max()) if kv_end.numel() else 0
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
        keys must be one contiguous run."""
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
        keys = mask.shape[3]
        count = visible.sum(-1)
        first = visible.int().argmax(-1)
        last = keys - visible.flip(-1).int().argmax(-1)
        nonempty = count > 0
        problems = torch.stack([other, (nonempty & (count != last - first)).any(),
                                (nonempty & (last > past_len + seq_len)).any()])
        if problems.any():  # the one device read
            kind = int(problems.nonzero()[0, 0])
            raise ValueError([
                "a float 4-D attention_mask may hold only 0 (visible) and large negative values (masked): "
                "unimm's attention takes no additive biases",
                "a 4-D attention_mask row's visible keys must form one contiguous run (one key interval per row)",
                f"a 4-D attention_mask lets rows see keys at or after position {past_len + seq_len}, which this "
                "call has not written",
            ][kind])
        start = torch.where(nonempty, first, 0).to(torch.int32)
        end = torch.where(nonempty, last, 0).to(torch.int32)
        return cls(start, end, past_len + seq_len)

    @classmethod
    def causal_after(cls, past_lens: torch.Tensor, seq_len: int, num_keys: int) -> AttentionMask:
        """Causal rows after ``past_lens[b]`` cached keys of each row (int ``[B]``, not read back):
        row i of batch b sees ``[0, past_lens[b] + i + 1)`` of ``num_keys`` (the cache's capacity)."""
        rows = torch.arange(1, seq_len + 1, dtype=torch.int32, device=past_lens.device)
        end = rows + past_lens[:, None]
        return cls(torch.zeros_like(end), end.to(torch.int32), num_keys)

    # ---- derived masks ----------------------------------------------------------------------

    def continued(self, past_lens: torch.Tensor, num_keys: int) -> AttentionMask:
        """This chunk's mask after ``past_lens[b]`` cached keys of each row (int ``[B]``, not read
        back), over ``num_keys`` keys: an interval ``[s, e)`` becomes ``[s + past, e + past)``, and
        one that starts at the chunk's first key also sees every cached key, ``[0, e + past)``, so
        a causal or prefix-LM chunk continues the cached sequence. Empty rows stay empty."""
        shift = past_lens[:, None]
        end = self.kv_end + shift
        start = torch.where(self.kv_start > 0, self.kv_start + shift, 0)
        start = torch.where(self.kv_end <= self.kv_start, end, start)
        return AttentionMask(start.to(torch.int32), end.to(torch.int32), num_keys)

    def windowed(self, window: int, positions: torch.Tensor) -> AttentionMask:
        """Each row's interval cut to the ``window`` keys ending at its own key position
        (``positions``, int, broadcast to ``[B, S]``): keys ``j > positions - window``. A row
        left with nothing is empty."""
        start = torch.maximum(self.kv_start, positions - (window - 1))
        return AttentionMask(torch.minimum(start, self.kv_end).to(torch.int32), self.kv_end, self.num_keys)

    def dropping(self, count: int) -> AttentionMask:
        """The mask over the keys left after the first ``count`` are dropped (a sliding-window cache
        that keeps only recent keys): key j becomes ``j - count``, bounds clamped at 0."""
        return AttentionMask((self.kv_start - count).clamp_min(0), (self.kv_end - count).clamp_min(0),
                             max(self.num_keys - count, 0))

    def within_padding(self, padding: torch.Tensor) -> AttentionMask:
        """Each row's interval intersected with its batch row's run of kept keys in a 2-D padding
        mask ``[B, num_keys]`` (1: a real token; the ones must form one contiguous run); rows
        left with nothing become empty."""
        first, last = _kept_run(padding)
        start = torch.maximum(self.kv_start, first[:, None].to(self.kv_start.dtype))
        end = torch.maximum(torch.minimum(self.kv_end, last[:, None].to(self.kv_end.dtype)), start)
        return AttentionMask(start, end, self.num_keys)

    # ---- views ------------------------------------------------------------------------------

    def to_dense(self, num_keys: int) -> torch.Tensor:
        """bool ``[B, S, num_keys]``: True where a query row sees a key (bounds outside
        ``[0, num_keys]`` are so clamped). For debugging, tests and the reference."""
        keys = torch.arange(_check_size("num_keys", num_keys, 0), device=self.device)
        return (keys >= self.kv_start[..., None]) & (keys < self.kv_end[..., None])

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
        ``b`` sees ``kv_idx`` iff ``kv_start[b, q_idx] <= kv_idx < kv_end[b, q_idx]`` (every head
        alike), reading the same interval tensors."""
        start, end = self.kv_start, self.kv_end

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= start[b, q_idx]) & (kv_idx < end[b, q_idx])
        return mask_mod

    def to_flex_block_mask(self, num_keys: int | None = None, *, block_size: int = 128):
        """FlexAttention's ``BlockMask`` of this mask over ``num_keys`` keys (default
        ``self.num_keys``), so the same mask can be handed to ``flex_attention``. Needs torch's
        ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
        from torch.nn.attention.flex_attention import create_block_mask

        num_keys = self.num_keys if num_keys is None else _check_size("num_keys", num_keys, 0)
        batch, seq_len = self.shape
        return create_block_mask(self.mask_mod(), batch, None, seq_len, num_keys, device=self.device,
                                 BLOCK_SIZE=_check_size("block_size", block_size, 1))

    def visible_pairs(self) -> int:
        """Number of visible (query, key) pairs: what attention FLOPs are counted on."""
        return int((self.kv_end - self.kv_start).clamp_min(0).sum())

    def tile_bounds(self, block_m: int, block_n: int, num_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the backward's dK/dV pass: per batch and key tile of ``block_n`` keys, the first
        and one-past-last query tile of ``block_m`` rows whose rows see any key of it
        (int32 ``[B, key tiles]``; first == last when none does). Cached per tile shape."""
        key = (block_m, block_n, num_keys)
        if key not in self._tile_bounds:
            batch, seq_len = self.shape
            q_tiles = -(-seq_len // block_m)
            k_tiles = -(-num_keys // block_n)
            pad = q_tiles * block_m - seq_len
            # bounds clamped to the keys, as the kernels clamp them
            start, end = (torch.nn.functional.pad(bound.clamp(0, num_keys), (0, pad), value=value).reshape(
                batch, q_tiles, block_m) for bound, value in ((self.kv_start, num_keys), (self.kv_end, 0)))
            # a query tile may touch key tile j when its rows' hull [min start, max end) meets it
            empty = end <= start
            lo = torch.where(empty, num_keys, start).min(-1).values
            hi = torch.where(empty, 0, end).max(-1).values
            tile_lo = torch.arange(k_tiles, device=self.device) * block_n
            touches = (lo[:, :, None] < tile_lo + block_n) & (hi[:, :, None] > tile_lo)  # [B, q tiles, k tiles]
            any_touch = touches.any(1)
            first = torch.where(any_touch, touches.int().argmax(1), 0)
            last = torch.where(any_touch, q_tiles - touches.flip(1).int().argmax(1), 0)
            self._tile_bounds[key] = (first.to(torch.int32).contiguous(), last.to(torch.int32).contiguous())
        return self._tile_bounds[key]


def _kept_run(padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[first, last)`` of each row's ones in a 2-D padding mask (``[0, 0)`` for a row of zeros);
    the ones must form one contiguous run."""
    keep = padding.bool()
    total = keep.shape[1]
    count = keep.sum(1)
    first = keep.int().argmax(1)  # 0 for a row of zeros
    last = total - keep.flip(1).int().argmax(1)
    split = (count > 0) & (count != last - first)
    if split.any():
        row = int(split.nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row}: its ones must form one contiguous run (right or left padding)")
    return torch.where(count > 0, first, 0), torch.where(count > 0, last, 0)


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
