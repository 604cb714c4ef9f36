"""Shared test setup: the Triton interpreter switch, the device tiers and the fixtures. Plain
helpers (device, dtypes, tolerances, ``rel_err``, seeded generators, a tiny decoder) are in
``unimm.testing``, which the benchmarks share: test modules import them from there.

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

import json
import os
import subprocess

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from unimm.kernels import dispatch
from unimm.testing import DEVICE, HAS_GPU, REPO_ROOT, available_backends, clean_env

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


@pytest.fixture
def reference_backend(monkeypatch):
    """The plain-PyTorch reference kernels, forced: for tests of the layers above the kernels
    (the Triton interpreter is slow, and what they check does not depend on the backend). A
    module takes it for all its tests with ``pytestmark = pytest.mark.usefixtures("reference_backend")``."""
    monkeypatch.setenv("UNIMM_BACKEND", "reference")


@pytest.fixture(scope="session")
def device_check_smoke(tmp_path_factory):
    """``benchmarks/gpu_check.sh --smoke OUTDIR``, run once per session (its bench stage is
    ``unimm bench --smoke``, every family on tiny CPU shapes); returns OUTDIR."""
    out = tmp_path_factory.mktemp("device-check")
    run = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", str(out)], env=clean_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    return out


@pytest.fixture
def bench_smoke(device_check_smoke):
    """family -> (its JSON payload, its log) from the device check's ``unimm bench --smoke``, once
    the outline every family writes is checked: its name, a smoke run (no measured peaks), the
    environment record."""
    def read(family: str):
        bench = device_check_smoke / "bench"
        [path] = bench.glob(f"{family}-*.json")
        [log] = (bench / "logs").glob(f"{family}-*.log")
        payload = json.loads(path.read_text())
        assert payload["family"] == family and payload["smoke"] and payload["peaks"] is None
        assert {"device", "torch", "triton", "cuda", "unimm", "git_sha", "date"} <= payload["environment"].keys()
        return payload, log.read_text()
    return read
