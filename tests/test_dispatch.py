"""Backend choice: automatic rules, UNIMM_BACKEND, and loud failures."""

import pytest
import torch

from unimm import _ext
from unimm.kernels import BackendUnavailable, dispatch

CPU = torch.device("cpu")


def test_reference_serves_everything(monkeypatch):
    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    assert dispatch.select("op", CPU, implemented=("cuda", "triton"),
                           unsupported={"cuda": "no", "triton": "no"}) == "reference"


def test_cpu_rules(monkeypatch):
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", False)
    assert dispatch.select("op", CPU, implemented=("cuda", "triton")) == "reference"
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", True)
    assert dispatch.select("op", CPU, implemented=("cuda", "triton")) == "triton"
    assert dispatch.select("op", CPU, implemented=("cuda", "triton"), unsupported={"triton": "dim"}) == "reference"
    assert dispatch.select("op", CPU, implemented=("cuda",)) == "reference"


def test_forced_backend_fails_loudly(monkeypatch):
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", False)
    monkeypatch.setenv("UNIMM_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="UNIMM_BACKEND=triton cannot serve op: .*TRITON_INTERPRET"):
        dispatch.select("op", CPU, implemented=("cuda", "triton"))
    monkeypatch.setenv("UNIMM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="UNIMM_BACKEND=cuda cannot serve op"):
        dispatch.select("op", CPU, implemented=("cuda", "triton"))
    with pytest.raises(BackendUnavailable, match="op has no cuda kernel"):
        dispatch.select("op", CPU, implemented=("triton",))
    monkeypatch.setattr(dispatch, "TRITON_INTERPRET", True)
    monkeypatch.setenv("UNIMM_BACKEND", "triton")
    with pytest.raises(BackendUnavailable, match="code_dim too large"):
        dispatch.select("op", CPU, implemented=("triton",), unsupported={"triton": "code_dim too large"})


def test_bad_backend_name(monkeypatch):
    for bad in ("cudnn", "bogus", " Tritonn "):
        monkeypatch.setenv("UNIMM_BACKEND", bad)
        with pytest.raises(ValueError, match=f"UNIMM_BACKEND must be one of reference, triton, cuda, or auto / unset "
                                             f"for automatic dispatch, got '{bad}'"):
            dispatch.forced_backend()
        with pytest.raises(ValueError, match="UNIMM_BACKEND must be one of"):  # at the call, not at import
            dispatch.select("op", CPU, implemented=("triton",))
    for name in ("Reference", " TRITON "):
        monkeypatch.setenv("UNIMM_BACKEND", name)
        assert dispatch.forced_backend() == name.strip().lower()
    for unset in ("", "auto", "  "):
        monkeypatch.setenv("UNIMM_BACKEND", unset)
        assert dispatch.forced_backend() is None


def test_forced_backend_reaches_public_ops(monkeypatch):
    from unimm.kernels import vq_quantize

    monkeypatch.setenv("UNIMM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match="vq_quantize"):
        vq_quantize(torch.randn(4, 8), torch.randn(5, 8))


def test_live_backends_on_cpu():
    live = dispatch.live_backends(CPU)
    assert live["reference"] is None
    assert live["cuda"] is not None
    assert (live["triton"] is None) == dispatch.TRITON_INTERPRET


def test_compiled_arch_rules(monkeypatch):
    if not _ext.available():
        pytest.skip("unimm._C not built")
    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda_archs": "80-real,90a-real,80-virtual"})
    assert _ext.compiled_archs() == ["sm_80", "sm_90a", "compute_80 (PTX)"]
    for capability, served in [((9, 0), True), ((8, 0), True), ((8, 6), True), ((12, 0), True), ((7, 5), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert (_ext.serves_device(torch.device("cuda", 0)) is None) == served, capability
    monkeypatch.setattr(_ext, "build_info", lambda: {"cuda_archs": "90a-real"})
    for capability, served in [((9, 0), True), ((8, 0), False), ((10, 0), False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert (_ext.serves_device(torch.device("cuda", 0)) is None) == served, capability
