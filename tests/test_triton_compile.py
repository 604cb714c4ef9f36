"""Every Triton kernel compiles for sm_90a and sm_80 within the chips' limits (no GPU needed).

The interpreter checks what a kernel computes; this checks what the real compiler makes of it:
a config that overflows shared memory fails at launch, spills crawl, and unpipelined loads or
a dot that misses wgmma on Hopper leave most of the chip idle.

The cases (kernel, config, expectations) come from tests/triton_aot.py at collection time, so a
failure names its case; the compiles run once per module, in subprocesses without the
interpreter. ``UNIMM_AOT_PYTHONS``: the python executables (separated by ``os.pathsep``) whose
triton compiles them, each a parametrization named by its triton version; default: this one.
CI adds a virtual environment with triton 3.6 (torch 2.11's), e.g.
``UNIMM_AOT_PYTHONS=python3:.ci-venv-t36/bin/python``.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import pytest

pytest.importorskip("triton")

AOT = pathlib.Path(__file__).resolve().parent / "triton_aot.py"
# Each interpreter's compiles split into this many processes (attention is about half the work);
# at most os.cpu_count() processes run at once.
FAMILY_CHUNKS = (("attention",), ("vq", "cross_entropy", "diffusion", "decode", "sampling"))
TIMEOUT_S = 1800  # for all of them together; about 2 x 2 minutes on two cores
HOPPER_SHARED_LIMIT = 232448  # 227 KB: the most dynamic shared memory one block may use on sm_90a


def _load_aot():
    spec = importlib.util.spec_from_file_location("unimm_triton_aot", AOT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


aot = _load_aot()
CASES = list(aot.cases())  # names, configs and expectations: nothing compiles here


def _pythons() -> list[str]:
    listed = [p for p in os.environ.get("UNIMM_AOT_PYTHONS", "").split(os.pathsep) if p.strip()]
    return listed or [sys.executable]


def _triton_version(python: str) -> str:
    if python == sys.executable:
        import triton

        return triton.__version__
    try:
        run = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return run.stdout.strip() if run.returncode == 0 else "unknown"


PYTHONS = _pythons()
PYTHON_IDS = []
for _python in PYTHONS:
    _id = f"triton{_triton_version(_python)}"
    PYTHON_IDS.append(_id if _id not in PYTHON_IDS else f"{_id}-{len(PYTHON_IDS)}")


@pytest.fixture(scope="module")
def aot_runs():
    """Compiles every case under every interpreter: {python: {(case, arch): report}}, or for an
    interpreter whose run failed, the reason as a string."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    jobs = [(python, chunk) for python in PYTHONS for chunk in FAMILY_CHUNKS]
    outcome = {python: {} for python in PYTHONS}
    with tempfile.TemporaryDirectory() as tmp:
        pending, running, deadline = list(enumerate(jobs)), [], time.monotonic() + TIMEOUT_S
        while pending or running:
            while pending and len(running) < max(1, os.cpu_count() or 1):
                index, (python, chunk) = pending.pop(0)
                out, err = (open(os.path.join(tmp, f"{index}.{kind}"), "w+") for kind in ("out", "err"))
                try:
                    proc = subprocess.Popen([python, str(AOT), *chunk], env=env, stdout=out, stderr=err, text=True)
                except OSError as error:
                    out.close()
                    err.close()
                    outcome[python] = f"{python} did not start: {error}"
                    continue
                running.append((python, chunk, proc, out, err))
            time.sleep(0.5)
            for job in list(running):
                python, chunk, proc, out, err = job
                if proc.poll() is None and time.monotonic() < deadline:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                running.remove(job)
                out.seek(0)
                err.seek(0)
                stdout, stderr = out.read(), err.read()
                out.close()
                err.close()
                if proc.returncode != 0:
                    if not isinstance(outcome[python], str):
                        outcome[python] = (f"{python} {AOT.name} {' '.join(chunk)}: exit {proc.returncode}\n"
                                           f"{stderr[-4000:]}")
                    continue
                if isinstance(outcome[python], dict):
                    for line in stdout.splitlines():
                        if line.startswith("{"):
                            report = json.loads(line)
                            outcome[python][report["case"], report["arch"]] = report
    return outcome


@pytest.fixture(scope="module", params=PYTHONS, ids=PYTHON_IDS)
def reports(request, aot_runs):
    """One interpreter's reports, {(case, arch): report}."""
    outcome = aot_runs[request.param]
    if isinstance(outcome, str):
        pytest.fail(outcome, pytrace=False)
    return outcome


def _report(reports, case, arch) -> dict:
    report = reports.get((case.name, arch))
    assert report is not None, f"{case.name} sm_{arch}: not compiled"
    assert "error" not in report, f"{case.name} sm_{arch}: did not compile: {report['error']}"
    return report


def _case_params(cases, with_arch=True):
    params = []
    for case in cases:
        for arch in case.archs if with_arch else (90,):
            marks = ()
            if not with_arch and isinstance(case.hopper, str):
                marks = pytest.mark.xfail(strict=True, reason=case.hopper)
            params.append(pytest.param(case, arch, marks=marks, id=f"sm_{arch}-{case.name}"))
    return params


def test_every_case_compiled(reports):
    """The subprocess compiled exactly the cases collected here, at the same configs."""
    expected = {(case.name, arch): dict(**case.constexprs, **case.launch) for case in CASES for arch in case.archs}
    assert sorted(set(expected) - set(reports)) == [], "not compiled"
    assert sorted(set(reports) - set(expected)) == [], "compiled but not collected"
    differing = sorted(key for key, config in expected.items() if reports[key]["config"] != config)
    assert differing == [], "compiled at other configs than collected"
    assert {r["family"] for r in reports.values()} == {"vq", "cross_entropy", "attention", "diffusion", "decode",
                                                        "sampling"}


@pytest.mark.parametrize("case, arch", _case_params(CASES))
def test_fits_the_chip(reports, case, arch):
    r = _report(reports, case, arch)
    assert r["shared"] <= r["shared_limit"], f"{r['shared']} B shared memory (limit {r['shared_limit']})"
    assert r["stack_bytes"] == 0, f"spills {r['stack_bytes']} B to local memory ({r['registers']} registers)"


@pytest.mark.parametrize("case, arch", _case_params([case for case in CASES if case.pipelined]))
def test_aligned_loads_are_pipelined(reports, case, arch):
    assert _report(reports, case, arch)["pipelined"], "loads not software-pipelined (no cp.async)"


GEMM_CASES = [case for case in CASES if 90 in case.archs and case.hopper is not None]


@pytest.mark.parametrize("case, arch", _case_params(GEMM_CASES, with_arch=False))
def test_hopper_dots_on_wgmma(reports, case, arch):
    """GEMM-like kernels at the configs the dispatcher picks on sm_90a: every dot is a wgmma in the
    PTX (none left on mma.sync), no spills, shared memory within 227 KB."""
    r = _report(reports, case, arch)
    assert r["wgmma"] > 0, f"no wgmma.mma_async in the PTX ({r['mma_sync']} mma.sync)"
    assert r["mma_sync"] == 0, f"{r['mma_sync']} mma.sync left in the PTX beside {r['wgmma']} wgmma.mma_async"
    assert r["stack_bytes"] == 0, f"spills {r['stack_bytes']} B to local memory"
    assert r["shared"] <= HOPPER_SHARED_LIMIT, f"{r['shared']} B shared memory"
