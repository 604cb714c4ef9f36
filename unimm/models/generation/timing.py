"""Where a ``generate`` call's time goes: seconds per phase, for ``return_timings=True``.

On a GPU each phase is bracketed by CUDA events on the current stream and the elapsed times are
read once, at the end of the call (no synchronisation per token); on the CPU the phases are timed
with ``time.perf_counter``. Disabled (the default), a phase is a bare ``nullcontext``.
"""

from __future__ import annotations

import contextlib
import time

import torch

PHASES = ("prefill", "decode_steps", "sampling", "diffusion_head", "structure_tokens", "inputs")


class PhaseTimer:
    """``with timer.phase("sampling"): ...`` adds that block's time to the phase; ``seconds()``
    gives ``{phase: seconds}`` for every name in ``PHASES`` (0.0 for phases that did not run)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.enabled = enabled
        self.cuda = enabled and device.type == "cuda"
        self._events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = dict.fromkeys(PHASES, 0.0)

    def phase(self, name: str):
        if name not in self._seconds:
            raise ValueError(f"unknown phase {name!r}; expected one of {PHASES}")
        if not self.enabled:
            return contextlib.nullcontext()
        return self._cuda_phase(name) if self.cuda else self._host_phase(name)

    @contextlib.contextmanager
    def _host_phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - start

    @contextlib.contextmanager
    def _cuda_phase(self, name: str):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._events.append((name, start, end))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase; on a GPU this waits for the recorded work (once)."""
        if self._events:
            self._events[-1][2].synchronize()
            for name, start, end in self._events:
                self._seconds[name] += start.elapsed_time(end) / 1000.0
            self._events.clear()
        return dict(self._seconds)
