"""The install: unimm._C built and importable without a GPU, `unimm info`, and setup.py's modes."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import unimm
from unimm import _ext

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


@pytest.mark.skipif(not NVCC, reason="nvcc not installed: unimm._C is not built here")
def test_extension_built_and_imports():
    assert _ext.available(), _ext.load_error
    import unimm._C as C

    info = C.build_info()
    assert set(_ext.compiled_archs()) >= {"sm_80", "sm_90a"}
    assert info["cudart_version"] >= 12000
    assert C.device_count() >= 0  # no GPU is not an error


def test_unimm_info():
    exe = shutil.which("unimm")
    command = [exe, "info"] if exe else [sys.executable, "-m", "unimm", "info"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for needle in (f"unimm    {unimm.__version__}", "torch    ", "triton   ", "GPU ", "_C       ", "reference live"):
        assert needle in out, out
    if _ext.available():
        assert "sm_90a" in out and "sm_80" in out
    for backend in ("triton", "cuda"):
        assert f"  {backend}" in out


def _copy_source(destination: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


def _build_wheel(tmp_path: Path, **env_overrides) -> subprocess.CompletedProcess:
    source = _copy_source(tmp_path / "src")
    env = {**os.environ, **env_overrides}
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path / "wheels"),
                           str(source)], env=env, capture_output=True, text=True, timeout=900)


def _wheel_names(tmp_path: Path) -> list[str]:
    [wheel] = (tmp_path / "wheels").glob("unimm-*.whl")
    return zipfile.ZipFile(wheel).namelist()


def test_pure_python_install_when_disabled(tmp_path):
    run = _build_wheel(tmp_path, UNIMM_BUILD_CUDA="0")
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert log.count("UNIMM_BUILD_CUDA=0: skipping the CUDA extension unimm._C") == 1
    names = _wheel_names(tmp_path)
    assert "unimm/kernels/vq.py" in names and not any("_C" in name for name in names)


@pytest.mark.skipif(not NVCC, reason="needs nvcc to reach the compile step")
def test_failed_compile_is_an_error_only_when_required(tmp_path):
    run = _build_wheel(tmp_path / "required", UNIMM_BUILD_CUDA="1", UNIMM_CUDA_ARCHS="not-an-arch")
    assert run.returncode != 0
    run = _build_wheel(tmp_path / "auto", UNIMM_CUDA_ARCHS="not-an-arch")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "building unimm._C failed" in run.stdout + run.stderr
    assert not any("_C" in name for name in _wheel_names(tmp_path / "auto"))


@pytest.mark.skipif(not NVCC, reason="needs nvcc")
def test_wheel_carries_extension(tmp_path):
    run = _build_wheel(tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert any(name.startswith("unimm/_C") and name.endswith(".so") for name in _wheel_names(tmp_path))
