"""Every Triton kernel compiles for sm_90a and sm_80 within the chips' limits (no GPU needed).

The interpreter checks what a kernel computes; this checks what the real compiler makes of it:
a config that overflows shared memory fails at launch, spills crawl, and unpipelined loads or
a dot that misses wgmma on Hopper leave most of the chip idle.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

AOT = pathlib.Path(__file__).resolve().parent / "triton_aot.py"


@pytest.fixture(scope="module")
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(AOT)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def test_every_case_compiled(reports):
    assert {r["arch"] for r in reports} == {80, 90}
    assert {r["family"] for r in reports} == {"vq", "cross_entropy", "attention", "diffusion", "decode"}


def test_fits_the_chip(reports):
    for r in reports:
        assert r["shared"] <= r["shared_limit"], f"{r['case']} sm_{r['arch']}: {r['shared']} B shared memory"
        assert r["stack_bytes"] == 0, f"{r['case']} sm_{r['arch']}: spills {r['stack_bytes']} B to local memory"


def test_aligned_loads_are_pipelined(reports):
    for r in reports:
        if r["expect"]["pipelined"]:
            assert r["pipelined"], f"{r['case']} sm_{r['arch']}: loads not software-pipelined"


def test_hopper_uses_wgmma(reports):
    for r in reports:
        if r["arch"] == 90 and r["expect"]["wgmma"]:
            assert r["wgmma"], f"{r['case']}: the dot did not become wgmma on sm_90a"
