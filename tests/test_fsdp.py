"""examples/fsdp_train_step.py under torchrun with 2 CPU processes (FSDP2 over gloo) computes the
same loss and full gradients as one process running the step on the whole batch.

The sharded run uses automatic dispatch (here: the Triton kernels through the interpreter, as
conftest sets TRITON_INTERPRET), the single-process step the plain-PyTorch reference."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "fsdp_train_step.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("fsdp_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_fsdp_step_matches_one_process(tmp_path, monkeypatch):
    out = tmp_path / "step.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT), "--out", str(out), "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    sharded = torch.load(out)
    assert sharded["world_size"] == 2
    assert sharded["sharded_params"] > 0  # FSDP2 really held DTensor shards

    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    example = _load_example()
    model = example.build_model(0, torch.device("cpu"))
    loss = example.train_step(model, example.make_batch(0), 0, 1, torch.device("cpu"))
    grads = example.full_gradients(model)

    assert abs(float(sharded["loss"]) - float(loss)) <= 1e-5 * abs(float(loss))
    assert sharded["grads"].keys() == grads.keys()
    for name, grad in grads.items():
        got = sharded["grads"][name]
        assert got.shape == grad.shape, name
        assert float((got - grad).norm() / grad.norm()) < 1e-5, name
