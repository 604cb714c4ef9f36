"""Shared test setup.

Without a GPU, Triton kernels are tested on the CPU through triton's interpreter, which must be
switched on before unimm defines its kernels: this file runs before any test module imports
unimm.

Device tests come in two tiers, both skipped when no CUDA device is present:
  * ``gpu``: the fast tier, ``pytest -m gpu``: every kernel family at realistic bf16 shapes
    against its reference, CUDA-graph capture, every ``unimm._C`` kernel; sized for a few
    minutes from a cold Triton cache (each test module's GPU section states its compile count).
  * ``gpu_full``: the long parameter sweeps (dtype x shape x option grids), run only when
    selected: ``pytest -m gpu_full``.
"""

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from unimm.kernels import dispatch  # noqa: E402  (after TRITON_INTERPRET)

DEVICE = torch.device("cuda") if HAS_GPU else torch.device("cpu")


def available_backends() -> list[str]:
    """The backends that can run kernels on DEVICE in this process."""
    return [b for b, reason in dispatch.live_backends(DEVICE).items() if reason is None]


GPU_TIERS = ("gpu", "gpu_full")


def pytest_collection_modifyitems(config, items):
    """Device tiers: ``gpu`` (the fast tier, run with ``-m gpu``; also part of a plain run on a
    device) and ``gpu_full`` (the long sweeps, run only when ``-m`` names them). Both are skipped
    without a GPU. A test carries at most one of the two markers."""
    full_selected = "gpu_full" in (config.getoption("markexpr", "") or "")
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    not_selected = pytest.mark.skip(reason="a gpu_full sweep: run it with `pytest -m gpu_full` on a device")
    for item in items:
        tiers = {marker.name for marker in item.iter_markers() if marker.name in GPU_TIERS}
        if len(tiers) > 1:
            raise pytest.UsageError(f"{item.nodeid} carries both gpu and gpu_full; a test belongs to one tier")
        if not tiers:
            continue
        if not HAS_GPU:
            item.add_marker(no_gpu)
        elif tiers == {"gpu_full"} and not full_selected:
            item.add_marker(not_selected)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=["reference", "triton", "cuda"])
def backend(request, monkeypatch) -> str:
    """Runs the test once per backend live here, forced through UNIMM_BACKEND."""
    if request.param not in available_backends():
        pytest.skip(f"{request.param} backend not live here: {dispatch.live_backends(DEVICE)[request.param]}")
    monkeypatch.setenv("UNIMM_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests start with automatic dispatch unless they force a backend themselves."""
    monkeypatch.delenv("UNIMM_BACKEND", raising=False)
    yield


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_bench_smoke(script: str, family: str, tmp_path):
    """Runs ``benchmarks/<script> --smoke --out tmp_path`` as a user would, on this checkout, with
    automatic dispatch and no Triton interpreter; returns (its one JSON payload, its stdout)."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "UNIMM_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, str(root / "benchmarks" / script), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    [path] = tmp_path.glob(f"{family}-*.json")
    return json.loads(path.read_text()), run.stdout
