"""The one place that loads the compiled extension ``unimm._C`` and says what it holds.

``unimm._C`` is optional: without nvcc at install time (or with ``UNIMM_BUILD_CUDA=0``) unimm is
pure Python and the CUDA backend is simply not live. Kernels reach compiled code only through
this module.
"""

from __future__ import annotations

import torch

try:
    from unimm import _C
except ImportError as error:  # not built, or built for another Python / platform
    _C = None
    load_error: str | None = f"{type(error).__name__}: {error}"
else:
    load_error = None

# Must match csrc/common.h: enum class DType.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """True when ``unimm._C`` was built and imports."""
    return _C is not None


def has(name: str) -> bool:
    """True when ``unimm._C`` is loaded and exports ``name``."""
    return _C is not None and hasattr(_C, name)


def build_info() -> dict | None:
    """Facts fixed at compile time (CUDA architectures, nvcc and runtime versions), or None."""
    return dict(_C.build_info()) if _C is not None else None


def _arch_entries() -> list[tuple[str, bool, bool]]:
    """CMake CUDA_ARCHITECTURES as (arch, has machine code, has PTX), e.g. ("90a", True, False)."""
    info = build_info()
    if info is None:
        return []
    entries = []
    for entry in info["cuda_archs"].split(","):
        arch, _, kind = entry.partition("-")
        entries.append((arch, kind in ("", "real"), kind in ("", "virtual")))
    return entries


def compiled_archs() -> list[str]:
    """The GPU code in ``unimm._C``, e.g. ``["sm_80", "sm_90a", "compute_80 (PTX)"]``."""
    archs = []
    for arch, machine_code, ptx in _arch_entries():
        if machine_code:
            archs.append(f"sm_{arch}")
        if ptx:
            archs.append(f"compute_{arch} (PTX)")
    return archs


def serves_device(device: torch.device) -> str | None:
    """None if the compiled code can run on ``device``, else why not."""
    if _C is None:
        return f"unimm._C is not built ({load_error})"
    major, minor = torch.cuda.get_device_capability(device)
    cc = major * 10 + minor
    for arch, machine_code, ptx in _arch_entries():
        number = int(arch.rstrip("a"))
        # "a" machine code runs only on its exact chip; other machine code on its own major
        # version at an equal or higher minor; PTX is JIT-compiled by the driver for newer GPUs.
        if machine_code and (number == cc if arch.endswith("a") else number // 10 == major and number <= cc):
            return None
        if ptx and not arch.endswith("a") and number <= cc:
            return None
    return f"unimm._C holds no code for sm_{cc} (built for {', '.join(compiled_archs())})"


def stream_handle(device: torch.device) -> int:
    """The current torch CUDA stream of ``device`` as an integer handle for ``unimm._C``."""
    return torch.cuda.current_stream(device).cuda_stream


def lib():
    """The loaded module; callers check ``available()`` / dispatch first."""
    if _C is None:
        raise RuntimeError(f"unimm._C is not available: {load_error}")
    return _C
