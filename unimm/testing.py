"""What unimm's tests and benchmarks share: the device, the dtypes the kernel tests sweep, every
tolerance a result is held to, the error measure, and small builders (seeded generators, a tiny
decoder, a clean environment for subprocesses).

The tolerances live here, in one place, so a test and the benchmark that checks the same kernel
cannot drift apart unnoticed (docs/ARCHITECTURE.md, "Numerics"). Unless a table says otherwise
its numbers bound ``rel_err``, the relative-norm error against a reference; NaN never passes.
"""

from __future__ import annotations

import math
import os
import pathlib

import torch

from unimm.kernels import dispatch

HAS_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda") if HAS_GPU else torch.device("cpu")
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Dtypes and tolerances
# ---------------------------------------------------------------------------------------------

# Kernel tests: bf16 only on a GPU (the Triton interpreter's bf16 tl.dot is unreliable)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])
# Hostile-input tests: fp32 and the narrowest range there is, on every device
HOSTILE_DTYPES = [torch.float32, torch.float16]

# Tests of attention and cross-entropy against the fp64 reference, small shapes
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
# Tests of decode attention against the fp32 reference (the fp32 kernel accumulates over the whole cache)
DECODE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
# Hostile-input tests: magnitudes at the edges of the range, so fp32 is held to less
HOSTILE_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3}
# Benchmarks against the fp32 reference at real shapes: cross-entropy's loss (relative to the loss)
# and gradients, attention's out / dq / dk / dv, and VQ's distance gap between two picks (relative
# to |z|^2 + |e|^2, the terms whose cancellation sets its rounding)
BENCH_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Benchmark of decode attention against the fp32 reference
BENCH_DECODE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Benchmark of a training step: the first step's loss relative to transformers' on the same weights and batch
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
# Benchmark of diffusion sampling: max abs difference from the eager reference's sample on the same
# noise, relative to max(1, the sample's max abs value). An untrained head's samples are large (its
# clean-token estimate is not clipped, as in MAR): only the relative size of a difference means
# anything. 100 steps of bf16 rounding in two accumulation orders differ by ~1% of the sample's range.
SAMPLE_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}


def rel_err(got: torch.Tensor | None, expected: torch.Tensor, *, chunk: int = 2**24) -> float:
    """``||got - expected|| / ||expected||`` in fp64; NaN when ``got`` is None or holds a NaN.

    Computed on ``got``'s device over slices of ``chunk`` elements: ``expected`` may live
    elsewhere (a benchmark keeps its fp32 reference gradients on the CPU) and crosses over one
    slice at a time, so no fp64 copy of a large tensor is ever made whole.
    """
    if got is None:
        return math.nan
    if got.shape != expected.shape:
        raise ValueError(f"rel_err: shapes differ, {tuple(got.shape)} against {tuple(expected.shape)}")
    diff = torch.zeros((), dtype=torch.float64, device=got.device)
    norm = torch.zeros((), dtype=torch.float64, device=got.device)
    for g, e in zip(got.detach().reshape(-1).split(chunk), expected.detach().reshape(-1).split(chunk)):
        e = e.to(g.device, torch.float64)
        diff += (g.double() - e).square().sum()
        norm += e.square().sum()
    return (diff / norm.clamp_min(1e-60)).sqrt().item()


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------

def seeded(seed: int) -> torch.Generator:
    """A CPU generator at ``seed``: inputs drawn with it are the same on every device."""
    return torch.Generator().manual_seed(seed)


def available_backends(device: torch.device = DEVICE) -> list[str]:
    """The backends that can run kernels on ``device`` in this process."""
    return [b for b, reason in dispatch.live_backends(device).items() if reason is None]


def clean_env() -> dict:
    """This environment as a user's shell has it, for a subprocess: automatic dispatch and no
    Triton interpreter (a test session sets TRITON_INTERPRET for its own kernels), unimm
    importable from this checkout."""
    env = {key: value for key, value in os.environ.items() if key not in ("TRITON_INTERPRET", "UNIMM_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def tiny_decoder(family: str = "llama", *, vocab: int = 64, heads: tuple[int, int] = (4, 2), tied: bool | None = None,
                 window: int = 4, softcap: float | None = 5.0, init_std: float | None = None, seed: int = 0,
                 device: torch.device | str = "cpu"):
    """A random two-layer ``Decoder`` of ``family`` (hidden 32, heads of 16) for tests, seeded.

    ``heads``: query and key/value heads; ``tied``: tied embeddings (None: the family's default).
    gemma2 gets a sliding ``window`` and a final-logit ``softcap`` (None: the family's default).
    ``init_std``: every matrix drawn again at that std after the move to ``device`` (a larger
    init spreads the logits, so greedy choices are far from ties).
    """
    from unimm.models import Decoder  # here: the kernels' benchmarks read this module without the model layer

    config = dict(model_type=family, vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=heads[0], num_key_value_heads=heads[1], head_dim=16, max_position_embeddings=256)
    if tied is not None:
        config["tie_word_embeddings"] = tied
    if family == "gemma2":
        config.update(query_pre_attn_scalar=16, sliding_window=window)
        if softcap is not None:
            config["final_logit_softcapping"] = softcap
    torch.manual_seed(seed)
    decoder = Decoder.from_config(config).to(device)
    if init_std is not None:
        with torch.no_grad():
            for param in decoder.parameters():
                if param.dim() == 2:
                    param.normal_(0.0, init_std)
    return decoder
