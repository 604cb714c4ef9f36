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


def clean_env() -> dict:
    """This environment as a user's shell has it: automatic dispatch and no Triton interpreter
    (this session set TRITON_INTERPRET for its own kernels), unimm importable from this checkout."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "UNIMM_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="session")
def device_check_smoke(tmp_path_factory):
    """``benchmarks/gpu_check.sh --smoke OUTDIR``, run once per session (its bench stage is
    ``unimm bench --smoke``, every family on tiny CPU shapes); returns OUTDIR."""
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("device-check")
    run = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh"), "--smoke", str(out)], env=clean_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    return out


@pytest.fixture
def bench_smoke(device_check_smoke):
    """family -> (its JSON payload, its log) from the device check's ``unimm bench --smoke``."""
    import json

    def read(family: str):
        bench = device_check_smoke / "bench"
        [path] = bench.glob(f"{family}-*.json")
        [log] = (bench / "logs").glob(f"{family}-*.log")
        return json.loads(path.read_text()), log.read_text()
    return read
