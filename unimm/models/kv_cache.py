"""``KVCache``: the static key/value buffers generation decodes into, and the host-side check of
their lengths."""

from __future__ import annotations

import torch

from unimm.kernels._common import is_int
from unimm.models.config import DecoderConfig


class KVCache:
    """Static key/value buffers for generation: per layer ``k[i], v[i]`` ``[B, max_len, Hkv, D]``
    and ``lens`` int32 ``[B]``, the number of valid cached tokens of each row.

    The decoder writes a chunk of S tokens into rows ``[lens[b], lens[b] + S)`` and never changes
    ``lens``: the caller advances it in place (``cache.lens += 1``, or per row), so a decode step
    is static in shape and CUDA-graph capturable.

    Lengths must stay in ``[0, max_len]``. Assigning them (``cache.lens = [5, 9]``, or
    ``set_lens``) checks them: values on the host are read for free, a CUDA tensor once (a setup
    step, not a decode step). An in-place update (``+=``, ``copy_``, ``fill_``) is not checked
    when it happens; the decoder checks lengths where it can read them without a device sync
    (CPU caches, and every chunk of more than one token), and elsewhere (a CUDA decode step)
    never writes outside a row's ``max_len`` slots (see ``Decoder.forward``).
    """

    def __init__(self, config: DecoderConfig, batch_size: int, max_len: int, *, device, dtype: torch.dtype):
        if not isinstance(config, DecoderConfig):
            raise TypeError(f"config must be a DecoderConfig, got {type(config).__name__}")
        for name, value in (("batch_size", batch_size), ("max_len", max_len)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        shape = (batch_size, max_len, config.num_kv_heads, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_layers)]
        self._lens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        # set by an owner that keeps 0 <= lens < max_len at every decode step by construction
        # (the generation engine sizes max_len for its whole budget): its steps skip the range guard
        self._lens_in_range = False

    @property
    def lens(self) -> torch.Tensor:
        """int32 ``[B]``: cached tokens per row. The tensor is the cache's own (CUDA graphs read
        it by address): assignment copies into it."""
        return self._lens

    @lens.setter
    def lens(self, value) -> None:
        if value is self._lens:  # ``cache.lens += n`` already updated the buffer in place: no read back
            return
        self.set_lens(value)

    @property
    def batch_size(self) -> int:
        return self._lens.shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    def set_lens(self, lens) -> None:
        """Sets every row's cached length: an int, ``batch_size`` ints, or an integer tensor
        ``[batch_size]`` (on any device: a CUDA tensor is read back once), each in
        ``[0, max_len]``; copied into ``lens`` in place."""
        if isinstance(lens, torch.Tensor):
            if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
                raise TypeError(f"cache lengths must be integers, got a {lens.dtype} tensor")
            if lens.dim() > 1 or (lens.dim() == 1 and lens.shape[0] != self.batch_size):
                raise ValueError(f"cache lengths must be one per row, [{self.batch_size}], got shape "
                                 f"{tuple(lens.shape)}")
            values = lens.detach().to("cpu", torch.int64).expand(self.batch_size)
            check_lens(values, self.max_len, 0)
        else:
            items = [lens] * self.batch_size if is_int(lens) else lens
            if not isinstance(items, (list, tuple)) or not all(is_int(v) for v in items):
                raise TypeError(f"cache lengths must be an int, a list of ints or an integer tensor, got {lens!r}")
            if len(items) != self.batch_size:
                raise ValueError(f"cache lengths must be one per row ({self.batch_size}), got {len(items)}")
            bad = next((row for row, v in enumerate(items) if not 0 <= v <= self.max_len), None)
            if bad is not None:
                raise ValueError(f"cache.lens must be in [0, {self.max_len}] (the cache's capacity max_len), row "
                                 f"{bad} has {items[bad]}")
            values = torch.tensor([int(v) for v in items], dtype=torch.int64)
        self._lens.copy_(values.to(torch.int32))

    def reset(self) -> None:
        """Forget every cached token (the buffers are overwritten as new tokens arrive)."""
        self._lens.zero_()


def check_lens(lens: torch.Tensor, max_len: int, new_tokens: int) -> int:
    """Host-side check of cache lengths before ``new_tokens`` more land: ``0 <= lens`` and
    ``lens + new_tokens <= max_len`` (the cache's capacity); returns the longest. Reads ``lens``
    once: the caller knows that costs no device sync, or accepts one."""
    if lens.numel() == 0:
        return 0
    low, high = torch.stack(torch.aminmax(lens)).tolist()  # one read
    if low < 0 or (new_tokens == 0 and high > max_len):
        row = int(torch.argmin(lens)) if low < 0 else int(torch.argmax(lens))
        raise ValueError(f"cache.lens must be in [0, {max_len}] (the cache's capacity max_len), row {row} has "
                         f"{low if low < 0 else high}")
    if high + new_tokens > max_len:
        row = int(torch.argmax(lens))
        raise ValueError(f"cache overflow: row {row} holds {high} tokens, + {new_tokens} new > the cache's capacity "
                         f"max_len={max_len}")
    return high
