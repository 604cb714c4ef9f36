"""Backend choice for every kernel call: ``"vendor"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

Rules (docs/ARCHITECTURE.md):
  * CUDA tensors go to the fastest live backend that can serve the call, in the order the
    kernel family states (e.g. CUDA for small code dims, else Triton), then the reference.
  * CPU tensors go to the reference, or to Triton when ``TRITON_INTERPRET=1`` was set before
    unimm (and so triton) defined its kernels: that is how CPU tests run Triton code.
  * ``UNIMM_BACKEND=reference|triton|cuda|vendor`` forces a backend. A forced backend that cannot
    serve a call raises ``BackendUnavailable`` saying why; it never falls back silently.
  * ``"vendor"`` is a kernel someone else ships that computes exactly what the call asks (torch's
    SDPA, FlashAttention's varlen kernel), chosen first on CUDA where a family lists it and the
    call's layout fits it. It is live on CUDA devices; whether it serves a given call is the
    family's ``unsupported`` reason (e.g. attention: which mask, softcap, dtype, package
    installed). ``UNIMM_BACKEND=triton`` or ``cuda`` thus always runs unimm's own kernel.

Where ``select`` is called, relative to the family's ``torch.library.custom_op``:
  * Inside the op, for the families without a backward (``decode_attention``, ``sample_tokens``,
    ``vq_quantize``): one op, with one fake, serves every backend, so torch.compile and CUDA-graph
    capture see the same opaque op whichever backend runs, and the choice is made when the op
    runs (under torch.compile too, never frozen into a trace).
  * Outside the op, in the public function, for the families with a backward (``attention``,
    ``linear_cross_entropy``): their Triton forward and backward are a pair of custom ops joined
    by ``register_autograd``, and an op has one backward, while the reference backend is
    differentiated by autograd through its plain PyTorch ops. So the op wraps the Triton backend
    alone and the choice is made before it (under torch.compile, when the call is traced).
  * ``vq_lookup`` has one implementation, a torch gather (a custom op with its autograd), and no
    choice to make; the diffusion sampling loop has no op at all: it is a Python loop of launches
    (captured whole in a CUDA graph on a GPU), and chooses in ``sample_loop``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from unimm import _ext

OWN_BACKENDS = ("reference", "triton", "cuda")  # unimm's own kernels
BACKENDS = OWN_BACKENDS + ("vendor",)

try:
    import triton  # noqa: F401

    _triton_error: str | None = None
except ImportError as error:
    _triton_error = f"triton is not installed ({error})"

# triton decides at decoration time whether a kernel is compiled or interpreted, so the mode
# that counts is the one in force when unimm's kernels were defined (this import).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


class BackendUnavailable(RuntimeError):
    """A backend forced with UNIMM_BACKEND cannot serve a call."""


def forced_backend() -> str | None:
    """The backend named by ``UNIMM_BACKEND``, or None when unset or empty."""
    value = os.environ.get("UNIMM_BACKEND", "").strip().lower()
    if not value or value == "auto":
        return None
    if value not in BACKENDS:
        raise ValueError(f"UNIMM_BACKEND must be one of {', '.join(OWN_BACKENDS)}, or auto / unset for automatic "
                         f"dispatch, got {os.environ['UNIMM_BACKEND']!r}; or vendor, for the vendor kernel of a "
                         f"family that has one")
    return value


def backend_unavailable(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run kernels on ``device`` at all, else the reason it cannot."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        if _triton_error is not None:
            return _triton_error
        if device.type == "cuda":
            if TRITON_INTERPRET:
                return "TRITON_INTERPRET=1 was set when unimm was imported, so Triton kernels run on CPU tensors only"
            return None
        if device.type == "cpu":
            if TRITON_INTERPRET:
                return None
            return "the tensors are on the CPU and TRITON_INTERPRET=1 was not set before importing unimm"
        return f"Triton kernels do not run on {device.type} tensors"
    if backend == "cuda":
        if not _ext.available():
            return f"unimm._C is not built ({_ext.load_error})"
        if device.type != "cuda":
            return f"the tensors are on {device.type}, not a CUDA device"
        return _ext.serves_device(device)
    if backend == "vendor":
        return None if device.type == "cuda" else f"vendor kernels run on CUDA tensors, not {device.type}"
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")


def select(
    op: str,
    device: torch.device,
    *,
    implemented: tuple[str, ...],
    unsupported: Mapping[str, str | None] | None = None,
) -> str:
    """The backend that runs ``op`` on tensors of ``device``.

    ``implemented``: the accelerated backends this family has, fastest first, e.g.
    ``("cuda", "triton")`` or ``("vendor", "triton")``; the reference is always there.
    ``unsupported``: for this particular call, backend -> why it cannot serve it (None or
    missing: it can), e.g. a CUDA kernel limited to small dims.
    """
    device = torch.device(device)
    unsupported = unsupported or {}

    def reason(backend: str) -> str | None:
        if backend == "reference":
            return None
        if backend not in implemented:
            return f"{op} has no {backend} kernel"
        return backend_unavailable(backend, device) or unsupported.get(backend)

    forced = forced_backend()
    if forced is not None:
        why = reason(forced)
        if why is not None:
            raise BackendUnavailable(f"UNIMM_BACKEND={forced} cannot serve {op}: {why}")
        return forced
    if device.type == "cuda":
        for backend in implemented:
            if reason(backend) is None:
                return backend
        return "reference"
    if "triton" in implemented and reason("triton") is None:
        return "triton"
    return "reference"


def live_backends(device: torch.device) -> dict[str, str | None]:
    """Each backend -> None when it can run kernels on ``device``, else why not."""
    return {backend: backend_unavailable(backend, device) for backend in BACKENDS}
