"""Tensor arithmetic behind ``AttentionMask`` (``unimm.kernels.masks``): argument checks, the
normal form of a pair of intervals, the runs of a dense mask's rows, and the bounds of the
two-interval builders. Every function here is a few tensor ops on the input's device (no Python
loop over tokens); none reads a value back from the device.
"""

from __future__ import annotations

import numbers

import torch

INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_size(name: str, value, low: int) -> int:
    """A Python int argument (not a bool, not a float) >= low."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_int(name: str, value, dims: int | tuple[int, ...]) -> None:
    """An integer tensor with ``dims`` dims (one of them, given a tuple)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if value.dim() not in allowed:
        more = f" (or {', '.join(map(str, allowed[1:]))})" if len(allowed) > 1 else ""
        raise ValueError(f"{name} must have {allowed[0]} dims{more}, got shape {tuple(value.shape)}")


def check_pair(kv_start: torch.Tensor) -> None:
    """3-D bounds are two intervals per row: ``[B, S, 2]``."""
    if kv_start.shape[2] != 2:
        raise ValueError(f"kv_start / kv_end of two intervals per row must be [B, S, 2], got {tuple(kv_start.shape)}")


def split_runs(run_starts: torch.Tensor, *keys: torch.Tensor) -> torch.Tensor:
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


def as_int32(bounds: torch.Tensor) -> torch.Tensor:
    """int32, contiguous (what the kernels read); other integer dtypes saturate, not wrap."""
    if bounds.dtype != torch.int32:
        info = torch.iinfo(torch.int32)
        bounds = bounds.to(torch.int64).clamp(info.min, info.max).to(torch.int32)
    return bounds.contiguous()


def first_bad_row(bad: torch.Tensor) -> int | None:
    """Index of the first batch row where ``bad [B, ...]`` holds, or None (one device read)."""
    rows = bad.reshape(bad.shape[0], -1).any(-1)
    if not rows.any():
        return None
    return int(rows.nonzero()[0, 0])


def normal_pair(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Two intervals per row (int32 ``[B, S, 2]`` each bound) in the form the kernels take:
    overlapping ones merged into the first (the kernels would count their common keys twice), a
    lone non-empty one first, and otherwise the earlier one first. Returns (start1, end1, start2,
    end2), each ``[B, S]``; what the pair covers is unchanged (also after clamping to the keys)."""
    s1, s2 = start.unbind(-1)
    e1, e2 = end.unbind(-1)
    full1, full2 = e1 > s1, e2 > s2
    overlap = full1 & full2 & (s1 < e2) & (s2 < e1)
    swap = full2 & (~full1 | (s2 < s1))
    a_start, a_end = torch.where(swap, s2, s1), torch.where(swap, e2, e1)
    b_start, b_end = torch.where(swap, s1, s2), torch.where(swap, e1, e2)
    a_start = torch.where(overlap, torch.minimum(s1, s2), a_start)
    a_end = torch.where(overlap, torch.maximum(e1, e2), a_end)
    b_end = torch.where(overlap, b_start, b_end)
    return (*(t.contiguous() for t in (a_start, a_end, b_start, b_end)),)


def dense_runs(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The runs of True along the last dim of ``visible [B, S, K]``: (start, end) ``[B, S, 2]``
    of the first two (``[0, 0)`` where a row has fewer), and each row's number of runs."""
    starts = visible.clone()
    starts[..., 1:] &= ~visible[..., :-1]
    run = starts.int().cumsum(-1) * visible  # 1 on the first run, 2 on the second, ...
    keys = visible.shape[-1]
    bounds = []
    for index in (1, 2):
        inside = run == index
        present = inside.any(-1)
        first = inside.int().argmax(-1)
        last = keys - inside.flip(-1).int().argmax(-1)
        bounds.append((torch.where(present, first, 0), torch.where(present, last, 0)))
    start = torch.stack([bounds[0][0], bounds[1][0]], -1)
    end = torch.stack([bounds[0][1], bounds[1][1]], -1)
    return start, end, starts.sum(-1)


def kept_run(padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


# ---- the two-interval builders: checked arguments -> bounds, [B, S] when one interval per row
# suffices (the kernels then run once), else [B, S, 2] ----------------------------------------

def sinks_and_window(batch_size, seq_len, sinks, window, past_len, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``AttentionMask.sinks_and_window``: row i, at position p = past_len + i, sees
    ``[0, min(sinks, p + 1))`` and ``[max(sinks, p + 1 - window), p + 1)``."""
    batch_size = check_size("batch_size", batch_size, 1)
    seq_len = check_size("seq_len", seq_len, 0)
    sinks = check_size("sinks", sinks, 0)
    window = check_size("window", window, 1)
    past_len = check_size("past_len", past_len, 0)
    end = torch.arange(past_len + 1, past_len + seq_len + 1, dtype=torch.int32, device=device)
    sink_end = end.clamp_max(sinks)
    window_start = torch.maximum(end - window, sink_end)
    if sinks == 0 or past_len + seq_len <= sinks + window:  # no row's window leaves its sinks behind
        start, end = torch.where(window_start == sink_end, 0, window_start), end
    else:
        start, end = torch.stack([torch.zeros_like(end), window_start], -1), torch.stack([sink_end, end], -1)
    return start.expand(batch_size, *start.shape), end.expand(batch_size, *end.shape)


def shared_prompt(prompt_lens, completion_lens, seq_len) -> tuple[torch.Tensor, torch.Tensor]:
    """``AttentionMask.shared_prompt``: the prompt's rows causal, each completion's rows see the
    prompt and their completion causally, padding rows nothing."""
    check_int("prompt_lens", prompt_lens, 1)
    check_int("completion_lens", completion_lens, 2)
    seq_len = check_size("seq_len", seq_len, 0)
    batch = prompt_lens.shape[0]
    if completion_lens.shape[0] != batch or completion_lens.shape[1] == 0 or \
            completion_lens.device != prompt_lens.device:
        raise ValueError(f"completion_lens must be [batch, completions >= 1] = [{batch}, C] on {prompt_lens.device}, "
                         f"got {tuple(completion_lens.shape)} on {completion_lens.device}")
    prompt = prompt_lens.long()[:, None]
    ends = prompt + completion_lens.long().cumsum(1)  # [B, C]: each completion's end
    bad = first_bad_row(torch.cat([prompt < 0, completion_lens < 0, ends[:, -1:] > seq_len], 1))
    if bad is not None:
        raise ValueError(f"prompt_lens / completion_lens row {bad}: lengths must be >= 0 and the prompt plus its "
                         f"completions must fit in seq_len = {seq_len}")
    positions = torch.arange(seq_len, device=prompt_lens.device).expand(batch, seq_len)
    # which completion holds token i: how many completion ends lie at or before it
    index = (positions[:, :, None] >= ends[:, None, :]).sum(-1).clamp_max(ends.shape[1] - 1)
    own_start = torch.cat([prompt, ends[:, :-1]], 1).gather(1, index)
    in_prompt = positions < prompt
    real = positions < ends[:, -1:]
    first_end = torch.where(real, torch.where(in_prompt, positions + 1, prompt), 0)
    second_start = torch.where(real & ~in_prompt, own_start, 0)
    second_end = torch.where(real & ~in_prompt, positions + 1, 0)
    start = torch.stack([torch.zeros_like(first_end), second_start], -1)
    return start, torch.stack([first_end, second_end], -1)


def image_blocks(image_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """``AttentionMask.image_blocks``: an image row sees the image tokens of its block and of
    every earlier block, a text row every key up to itself."""
    check_int("image_ids", image_ids, 2)
    batch, seq_len = image_ids.shape
    ids = image_ids.long()
    positions = torch.arange(seq_len, device=ids.device).expand(batch, seq_len)
    image = ids > 0
    boundary = torch.ones_like(image)  # a block (or a text run) starts here
    boundary[:, 1:] = ids[:, 1:] != ids[:, :-1]
    # each block's end, as from_spans finds a span's: the first boundary after i
    next_start = torch.full_like(positions, seq_len)
    next_start[:, :-1] = torch.where(boundary[:, 1:], positions[:, 1:], seq_len)
    block_end = torch.flip(torch.cummin(torch.flip(next_start, [1]), dim=1).values, [1])
    # runs of image tokens (adjacent blocks form one run): which run a token is in, where runs start
    run_starts = image.clone()
    run_starts[:, 1:] &= ~image[:, :-1]
    run = run_starts.long().cumsum(1)
    in_first, in_second = image & (run == 1), image & (run == 2)
    problems = torch.stack([(ids < 0).any(1), split_runs(boundary & image, ids), (image & (run > 2)).any(1)])
    flags = torch.cat([problems.any(1), in_second.any().reshape(1)]).tolist()  # the one device read
    if any(flags[:3]):
        kind = flags.index(True)
        row = int(problems[kind].nonzero()[0, 0])
        raise ValueError(f"image_ids row {row}: " + [
            "ids must be >= 0 (0: text, k > 0: image block k)",
            "an image block appears in two separate runs; blocks must be contiguous",
            "an image block has two earlier runs of image tokens with text between them: its rows would need "
            "three key intervals, and an AttentionMask holds at most two per row"][kind])
    first_start = run_starts.int().argmax(1, keepdim=True)
    first_run_end = torch.where(in_first, block_end, 0).amax(1, keepdim=True)
    start1 = torch.where(image, first_start, 0)
    end1 = torch.where(in_first, block_end, torch.where(image, first_run_end, positions + 1))
    if not flags[3]:
        return start1, end1
    run_start = torch.cummax(torch.where(run_starts, positions, 0), dim=1).values
    start2 = torch.where(in_second, run_start, 0)
    end2 = torch.where(in_second, block_end, 0)
    return torch.stack([start1, start2], -1), torch.stack([end1, end2], -1)
