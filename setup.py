"""Builds unimm and, when nvcc is found, its CUDA extension ``unimm._C``.

The extension is a pybind11 module compiled by CMake + ninja + nvcc. It links the CUDA
runtime statically and does not link libtorch, so it builds and imports on a machine with
no GPU and survives torch upgrades.

Environment:
  UNIMM_BUILD_CUDA   unset/"auto": build _C when nvcc is found, warn and go on without it if
                     the compile fails; "0": never build it (pure-Python install);
                     "1": build it and fail the install if that is not possible.
  UNIMM_CUDA_ARCHS   CMake CUDA architectures (default "80-real;90a-real;80-virtual":
                     sm_80 and sm_90a machine code plus compute_80 PTX for newer GPUs).
  CUDACXX / CUDA_HOME  where to look for nvcc before PATH.
  MAX_JOBS           parallel compile jobs (default: number of CPUs).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80-real;90a-real;80-virtual"


def _say(message: str) -> None:
    # pip hides build output unless asked (-v); stderr lines still show up in its log.
    print(f"unimm setup: {message}", file=sys.stderr, flush=True)


def _find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home:
            candidates.append(os.path.join(home, "bin", "nvcc"))
    candidates.append(shutil.which("nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def _find_tool(name: str) -> str | None:
    """cmake / ninja: prefer the PyPI packages of the build environment, then PATH."""
    try:
        module = __import__(name)
        bin_dir = getattr(module, "BIN_DIR", None) or getattr(module, "CMAKE_BIN_DIR", None)
        if bin_dir and os.path.isfile(os.path.join(bin_dir, name)):
            return os.path.join(bin_dir, name)
    except ImportError:
        pass
    return shutil.which(name)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        # optional: setuptools then skips copying it in editable installs when it was not built.
        super().__init__(name, sources=[], optional=True)


class CMakeBuild(build_ext):
    """Runs CMake for ``unimm._C``; decides, once and loudly, whether the extension is built."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        mode = os.environ.get("UNIMM_BUILD_CUDA", "auto").strip().lower()
        if mode not in ("auto", "0", "1"):
            raise RuntimeError(f"UNIMM_BUILD_CUDA must be 0, 1 or unset, got {mode!r}")
        if mode == "0":
            _say("UNIMM_BUILD_CUDA=0: skipping the CUDA extension unimm._C (pure-Python install)")
            return
        nvcc = _find_nvcc()
        if nvcc is None:
            if mode == "1":
                raise RuntimeError("UNIMM_BUILD_CUDA=1 but nvcc was not found (set CUDACXX or CUDA_HOME)")
            _say("nvcc not found: skipping the CUDA extension unimm._C (pure-Python install)")
            return
        try:
            self._build_cmake(ext, nvcc)
        except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
            if mode == "1":
                raise
            _say(f"building unimm._C failed ({error}); installing without it. "
                 "Set UNIMM_BUILD_CUDA=1 to make this an error.")

    def get_outputs(self):
        # A skipped extension has no file to install.
        return [path for path in super().get_outputs() if os.path.exists(path)]

    def _build_cmake(self, ext: Extension, nvcc: str) -> None:
        import pybind11

        cmake = _find_tool("cmake")
        ninja = _find_tool("ninja")
        if cmake is None:
            raise RuntimeError("cmake not found (pip install cmake)")
        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("UNIMM_CUDA_ARCHS", DEFAULT_ARCHS)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DUNIMM_OUTPUT_DIR={ext_dir}",
        ]
        if ninja is not None:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        _say(f"building unimm._C with {nvcc} for CUDA architectures {archs}")
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    ext_modules=[CMakeExtension("unimm._C")],
    cmdclass={"build_ext": CMakeBuild},
)
