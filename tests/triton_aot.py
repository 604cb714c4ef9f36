"""Compiles unimm's Triton kernels ahead of time for sm_90a and sm_80, without a GPU.

Run by tests/test_triton_compile.py in a subprocess, once per Triton installation it is told
about (the test session runs triton's interpreter, which replaces kernels with interpreted
functions). For every case it reports what would make a launch fail or crawl on the real chip:
shared memory against the chip's limit, registers and spills (the cubin's stack frame), whether
the loads were software-pipelined (cp.async), and how the dots were lowered: the PTX's
``wgmma.mma_async`` (Hopper's warpgroup MMA) and ``mma.sync`` (the Ampere-style MMA Hopper
still runs, at a fraction of its rate) instructions. Prints one JSON object per (case, arch).

Importing this module compiles nothing: ``cases()`` lists the cases (names, configs and
expectations) from the kernel modules' config functions, which the test reads at collection
time; only ``main`` compiles.

Alignment matters: at launch triton specialises pointers and integers divisible by 16, which is
what lets it vectorise and pipeline loads, so each case names the arguments that are.

Usage: ``python tests/triton_aot.py [family ...]`` (default: every family).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton

ARCHS = (90, 80)
# Largest dynamic shared memory one block may use.
SHARED_LIMIT = {90: 232448, 80: 166912}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclasses.dataclass
class Case:
    """One kernel at one config. Expectations:

    pipelined: the loads are software-pipelined (cp.async) on both chips.
    hopper: None for kernels without ``tl.dot`` (and configs not for sm_90a); else True when every
        dot must lower to wgmma on sm_90a (no mma.sync left in the PTX), or a string saying why it
        cannot today (the test marks the case an expected failure with that reason).
    """

    family: str
    name: str
    kernel: object
    signature: dict
    constexprs: dict
    aligned: set
    launch: dict
    pipelined: bool
    hopper: bool | str | None = None
    archs: tuple[int, ...] = ARCHS  # the chips this config is for (a config may differ per chip)


def compile_report(case: Case, arch: int) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # argument order is the kernel's; constexprs may name any of its parameters
    names = list(case.kernel.arg_names)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in case.aligned}
    full_signature = {name: case.signature.get(name, "constexpr") for name in names}
    compiled = triton.compile(ASTSource(fn=case.kernel, signature=full_signature, constexprs=case.constexprs,
                                        attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(**case.launch))
    ptx = compiled.asm["ptx"]
    report = dict(shared=compiled.metadata.shared, shared_limit=SHARED_LIMIT[arch],
                  pipelined="async_copy" in compiled.asm["ttgir"],
                  wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
                  mma_sync=len(re.findall(r"\bmma\.sync\b", ptx)))
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True).stdout
    registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    report.update(registers=int(registers.group(1)) if registers else None,
                  stack_bytes=int(stack.group(1)) if stack else None)
    return report


def _launch(config: dict) -> dict:
    return {key: config.pop(key) for key in ("num_warps", "num_stages")}


def vq_cases():
    from unimm.kernels import vq
    from unimm.kernels._common import dot_precision

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for code_dim, cosine in ((4, False), (8, True), (100, False), (256, False), (256, True)):
            config = vq._triton_config(code_dim, dtype, interpret=False)
            launch = _launch(config)
            t = TRITON_TYPES[dtype]
            signature = dict(z_ptr=f"*{t}", codebook_ptr=f"*{t}", code_bias_ptr="*fp32", code_scale_ptr="*fp32",
                             row_scale_ptr="*fp32", part_dist_ptr="*fp32", part_idx_ptr="*i64", n_rows="i32",
                             n_codes="i32", code_dim="i32", stride_z="i32", stride_codebook="i32",
                             codes_per_split="i32")
            aligned = {name for name, kind in signature.items() if kind.startswith("*")} | {"codes_per_split"}
            if code_dim % 16 == 0:
                aligned |= {"code_dim", "stride_z", "stride_codebook"}
            constexprs = dict(COSINE=cosine, PRECISION=dot_precision(dtype), **config)
            yield Case("vq", f"vq_argmin {t} d={code_dim}{' cosine' if cosine else ''}", vq._vq_argmin_kernel,
                       signature, constexprs, aligned, launch, pipelined=code_dim % 16 == 0, hopper=True)


def cross_entropy_cases():
    from unimm.kernels import _cross_entropy_rows as rows
    from unimm.kernels import _cross_entropy_triton as ce
    from unimm.kernels._common import dot_precision

    matmul_args = dict(M="i32", N="i32", K="i32", stride_am="i32", stride_ak="i32", stride_bk="i32", stride_bn="i32",
                       stride_cm="i32", stride_cn="i32", col_offset="i32", softcap="fp32",
                       filter_eps="fp32")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TRITON_TYPES[dtype]
        precision = dot_precision(dtype)
        signature = dict(h_ptr=f"*{t}", w_ptr=f"*{t}", bias_ptr=f"*{t}", class_weight_ptr="*fp32", column_ptr="*i32",
                         parts_ptr="*fp32", n_rows="i32", vocab="i32", dim="i32", stride_hn="i32", stride_wv="i32",
                         cols_per_split="i32", softcap="fp32")
        aligned = {"h_ptr", "w_ptr", "bias_ptr", "class_weight_ptr", "column_ptr", "parts_ptr", "dim", "stride_hn",
                   "stride_wv", "cols_per_split"}
        for arch in ARCHS:  # the tiles differ per chip
            config = ce._lse_config(dtype, interpret=False, arch=arch)
            launch = _launch(config)
            constexprs = dict(stride_hd=1, stride_wd=1, HAS_BIAS=True, HAS_SOFTCAP=True, HAS_CLASS_WEIGHTS=True,
                              PRECISION=precision, **config)
            yield Case("cross_entropy", f"lse {t} sm_{arch}", ce._lse_kernel, signature, constexprs, aligned, launch,
                       pipelined=True, hopper=True if arch >= 90 else None, archs=(arch,))

        # (name, output type, epilogue, rows of K dropped, unit strides): triton turns integer
        # arguments equal to 1 into constants at launch, so they are constants here too
        for name, c_type, epilogue, drop_k, unit in (
                ("dx = lossgrad(h @ W.T)", t, ce.EPILOGUE_LOSS_GRAD, False, {"stride_ak", "stride_bk", "stride_cn"}),
                ("x = h @ W.T (row path)", t, ce.EPILOGUE_LOGITS, False, {"stride_ak", "stride_bk", "stride_cn"}),
                ("dW = dx.T @ h", t, ce.EPILOGUE_STORE, True, {"stride_am", "stride_bn", "stride_cn"}),
                ("dW += dx.T @ h (row path)", "fp32", ce.EPILOGUE_ACCUMULATE, True,
                 {"stride_am", "stride_bn", "stride_cn"}),
                ("dH += dx @ W", "fp32", ce.EPILOGUE_ACCUMULATE, False, {"stride_ak", "stride_bn", "stride_cn"})):
            config = ce._matmul_config(dtype, interpret=False, drop_k=drop_k)
            launch = _launch(config)
            signature = dict(a_ptr=f"*{t}", b_ptr=f"*{t}", c_ptr=f"*{c_type}", bias_ptr=f"*{t}",
                             class_weight_ptr="*fp32", stats_ptr="*fp32", column_ptr="*i32", coef_ptr="*fp32",
                             live_ptr="*i8", **{k: v for k, v in matmul_args.items() if k not in unit})
            aligned = {"a_ptr", "b_ptr", "c_ptr", "bias_ptr", "class_weight_ptr", "stats_ptr", "column_ptr", "coef_ptr",
                       "live_ptr", "M", "N", "K", "stride_am", "stride_ak", "stride_bk", "stride_bn",
                       "stride_cm"} - unit
            constexprs = dict(**{k: 1 for k in unit}, FILTER=int(epilogue) == int(ce.EPILOGUE_LOSS_GRAD),
                              EPILOGUE=int(epilogue), DROP_K=drop_k, HAS_BIAS=True, HAS_SOFTCAP=True,
                              HAS_CLASS_WEIGHTS=True, PRECISION=precision, **config)
            yield Case("cross_entropy", f"matmul {t} {name}", ce._matmul_kernel, signature, constexprs, aligned,
                       launch, pipelined=True, hopper=True)

        config = ce._matmul_config(dtype, interpret=False)
        signature = dict(x_ptr=f"*{t}", parts_ptr="*fp32", stats_ptr="*fp32", column_ptr="*i32", coef_ptr="*fp32",
                         class_weight_ptr="*fp32", live_ptr="*i8", M="i32", N="i32", stride_xm="i32", softcap="fp32",
                         filter_eps="fp32")
        aligned = {"x_ptr", "parts_ptr", "stats_ptr", "column_ptr", "coef_ptr", "class_weight_ptr", "live_ptr", "M",
                   "N", "stride_xm"}
        constexprs = dict(FILTER=True, HAS_SOFTCAP=True, HAS_CLASS_WEIGHTS=True, BLOCK_M=config["BLOCK_M"],
                          BLOCK_N=config["BLOCK_N"], SUB_N=32)
        yield Case("cross_entropy", f"row grad {t}", rows._row_grad_kernel, signature, constexprs, aligned,
                   _launch(dict(num_warps=config["num_warps"], num_stages=1)), pipelined=False, hopper=None)

        # the filtered row path's GEMMs over listed dx tiles: (name, output type, accumulate, drop,
        # tile (M extent, K extent), unit strides)
        tile = (config["BLOCK_M"], config["BLOCK_N"])
        for name, c_type, accumulate, drop, listed_tile, unit in (
                ("dH = dx @ W", t, False, "m", tile, {"stride_ak", "stride_bn", "stride_cn"}),
                ("dW = dx.T @ h", t, False, "k", tile[::-1], {"stride_am", "stride_bn", "stride_cn"}),
                ("dW += dx.T @ h", "fp32", True, "k", tile[::-1], {"stride_am", "stride_bn", "stride_cn"})):
            listed = ce.listed_config(dtype, interpret=False, tile=listed_tile)
            launch = _launch(listed)
            signature = dict(a_ptr=f"*{t}", b_ptr=f"*{t}", c_ptr=f"*{c_type}", list_ptr="*i32", count_ptr="*i32",
                             column_ptr="*i32", M="i32", N="i32", K="i32", stride_list="i32",
                             **{k: "i32" for k in ("stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm",
                                                   "stride_cn") if k not in unit})
            aligned = {"a_ptr", "b_ptr", "c_ptr", "list_ptr", "count_ptr", "column_ptr", "M", "N", "K", "stride_am",
                       "stride_ak", "stride_bk", "stride_bn", "stride_cm"} - unit
            constexprs = dict(**{k: 1 for k in unit}, ACCUMULATE=accumulate, DROP_K=drop == "k", DROP_M=drop == "m",
                              PRECISION=precision, **listed)
            yield Case("cross_entropy", f"listed {t} {name}", ce._listed_matmul_kernel, signature, constexprs,
                       aligned, launch, pipelined=True, hopper=True)


ATTENTION_KERNELS = ("fwd", "bwd dq", "bwd dk dv")


def attention_case(dtype: torch.dtype, head_dim: int, kernel: str, arch: int, safe: bool = False) -> Case:
    """``kernel`` (one of ATTENTION_KERNELS) at the tiles ``attention._config`` picks for ``arch``;
    ``safe``: its second launch, for the programs that meet non-finite rows (the same tiles, and
    flagged rows loaded as zeros)."""
    from unimm.kernels import _attention_triton as kernels
    from unimm.kernels._common import dot_precision, padded_head_dim

    attn = importlib.import_module("unimm.kernels.attention")  # the package exports the function by this name

    def strides(*names):  # [B, S, H, D] tensors: batch, seq and head strides (D is contiguous)
        return {f"stride_{n}{axis}": "i32" for n in names for axis in "bsh"}

    t = TRITON_TYPES[dtype]
    scalars = dict(stride_mask="i32", scale="fp32", softcap="fp32")
    sizes = dict(seq_len="i32", num_keys="i32", heads="i32")
    if kernel == "fwd":
        fn, key = kernels._attn_fwd_kernel, "fwd"
        signature = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", o_ptr=f"*{t}", lse_ptr="*fp32",
                         start_ptr="*i32", end_ptr="*i32", flags_ptr="*i32", counts_ptr="*i32", **sizes, group="i32",
                         **strides("q", "k", "v", "o"), **scalars)
    elif kernel == "bwd dq":
        fn, key = kernels._attn_bwd_dq_kernel, "dq"
        signature = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", do_ptr=f"*{t}", dq_ptr=f"*{t}",
                         lse_ptr="*fp32", delta_ptr="*fp32", start_ptr="*i32", end_ptr="*i32", flags_ptr="*i32",
                         counts_ptr="*i32", row_flags_ptr="*i8", **sizes, group="i32",
                         **strides("q", "k", "v", "do", "dq"), **scalars)
    else:
        fn, key = kernels._attn_bwd_dkdv_kernel, "dkdv"
        signature = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", do_ptr=f"*{t}", dk_ptr=f"*{t}",
                         dv_ptr=f"*{t}", lse_ptr="*fp32", delta_ptr="*fp32", start_ptr="*i32", end_ptr="*i32",
                         first_ptr="*i32", last_ptr="*i32", flags_ptr="*i32", row_flags_ptr="*i8",
                         row_counts_ptr="*i32", seen_ptr="*i32", **sizes, kv_heads="i32", group="i32",
                         **strides("q", "k", "v", "do", "dk", "dv"), stride_mask="i32", stride_tiles="i32",
                         scale="fp32", softcap="fp32")
    tiles = dict(attn._config(head_dim, dtype, interpret=False, arch=arch)[key])
    launch = _launch(tiles)
    aligned = {n for n, kind in signature.items() if kind.startswith("*") or n.startswith("stride_")}
    # wgmma takes tiles of 64+ rows. The forward's and dQ's dots have BLOCK_M query rows; all
    # four of dK/dV's (S.T = k @ q.T, dP.T = v @ dO.T, P.T @ dO, dS.T @ q) have BLOCK_N keys.
    if dtype == torch.float32:
        hopper = f"fp32 is a CPU-test dtype: its tiles of {tiles['BLOCK_M']} rows are too few for wgmma"
    elif kernel == "bwd dk dv" and tiles["BLOCK_N"] < 64:
        hopper = (f"dK/dV at D = {head_dim}: {tiles['BLOCK_M']} query rows x {tiles['BLOCK_N']} keys per tile (64 keys "
                  "spill under triton 3.9: two [keys, D] fp32 accumulators take 128 registers a thread), so no dot "
                  "has the 64 rows wgmma needs")
    elif kernel != "bwd dk dv" and tiles["BLOCK_M"] < 64:
        hopper = f"{kernel} at D = {head_dim}: {tiles['BLOCK_M']}-row tiles, and wgmma needs 64"
    else:
        hopper = True
    return Case("attention", f"attention {kernel}{' safe' if safe else ''} {t} d={head_dim}", fn, signature,
                dict(HAS_SOFTCAP=True, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
                     PRECISION=dot_precision(dtype), SAFE=safe, **tiles),
                aligned, launch, pipelined=not (safe and kernel == "bwd dk dv"), hopper=hopper if arch == 90 else None,
                archs=(arch,))


def attention_key_flags_case(dtype: torch.dtype, head_dim: int) -> Case:
    """The pass that flags key rows holding a NaN or an infinity, at the block ``_key_flags`` picks."""
    from unimm.kernels import _attention_triton as kernels

    t = TRITON_TYPES[dtype]
    signature = dict(k_ptr=f"*{t}", v_ptr=f"*{t}", flags_ptr="*i32", num_keys="i32", kv_heads="i32",
                     **{f"stride_{n}": "i32" for n in ("kb", "ks", "kh", "vb", "vs", "vh")})
    aligned = {n for n, kind in signature.items() if kind.startswith("*") or n.startswith("stride_")}
    return Case("attention", f"attention key flags {t} d={head_dim}", kernels._key_flags_kernel, signature,
                dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK=max(8, 2048 // head_dim)), aligned,
                dict(num_warps=4, num_stages=1),
                pipelined=False)


def attention_bwd_prep_case(dtype: torch.dtype, head_dim: int) -> Case:
    """The backward's per-row pass (delta = dO . O, row flags), at the rows ``_attention_backward_op`` picks."""
    from unimm.kernels import _attention_triton as kernels

    t = TRITON_TYPES[dtype]
    signature = dict(q_ptr=f"*{t}", do_ptr=f"*{t}", o_ptr=f"*{t}", delta_ptr="*fp32", row_flags_ptr="*i8",
                     spans_ptr="*i32", start_ptr="*i32", end_ptr="*i32", counts_ptr="*i32", seq_len="i32",
                     num_keys="i32", heads="i32", group="i32",
                     **{f"stride_{n}{axis}": "i32" for n in ("q", "do", "o") for axis in "bsh"}, stride_mask="i32")
    aligned = {n for n, kind in signature.items() if kind.startswith("*") or n.startswith("stride_")}
    return Case("attention", f"attention bwd prep {t} d={head_dim}", kernels._attn_bwd_prep_kernel, signature,
                dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=max(1, 2048 // head_dim)), aligned,
                dict(num_warps=4, num_stages=1),
                pipelined=False)


def attention_cases():
    for dtype, head_dim in ((torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                            (torch.bfloat16, 256), (torch.float16, 64), (torch.float16, 128), (torch.float16, 256),
                            (torch.float32, 64), (torch.bfloat16, 96)):  # 96: padded to 128 in the kernels
        for kernel in ATTENTION_KERNELS:
            for safe in (False, True):
                hopper, ampere = (attention_case(dtype, head_dim, kernel, arch, safe) for arch in (90, 80))
                if (hopper.constexprs, hopper.launch) == (ampere.constexprs, ampere.launch):
                    yield dataclasses.replace(hopper, archs=ARCHS)  # one config for both chips
                else:
                    yield hopper
                    yield ampere
    for dtype, head_dim in ((torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 64)):
        yield attention_key_flags_case(dtype, head_dim)
        yield attention_bwd_prep_case(dtype, head_dim)


def diffusion_cases():
    from unimm.kernels import _diffusion_triton as diffusion
    from unimm.kernels._common import dot_precision

    for dtype, width in ((torch.bfloat16, 1024), (torch.bfloat16, 1536), (torch.float32, 1024)):
        t = TRITON_TYPES[dtype]
        block = triton.next_power_of_2(width)
        signature = dict(x_ptr=f"*{t}", shift_ptr=f"*{t}", scale_ptr=f"*{t}", weight_ptr=f"*{t}", bias_ptr=f"*{t}",
                         out_ptr=f"*{t}", width="i32", stride_x="i32", stride_shift="i32", stride_scale="i32",
                         stride_out="i32", eps="fp32")
        aligned = {name for name in signature if name != "eps"}
        yield Case("diffusion", f"modulated layernorm {t} w={width}", diffusion._modulated_layernorm_kernel,
                   signature, dict(AFFINE=True, BLOCK=block), aligned,
                   dict(num_warps=min(16, block // 256), num_stages=1), pipelined=False)
    signature = dict(x_ptr="*fp32", out_ptr="*bf16", noise_ptr="*fp32", step_ptr="*fp32", new_x_ptr="*fp32",
                     token_dim="i32", stride_out="i32", rows="i32", cfg_scale="fp32", noise_scale="fp32", clip="fp32")
    yield Case("diffusion", "denoise step bf16", diffusion._step_kernel, signature,
               dict(GUIDED=True, CLIP=True, BLOCK=16), {"x_ptr", "out_ptr", "noise_ptr", "step_ptr", "new_x_ptr"},
               dict(num_warps=1, num_stages=1), pipelined=False)

    # the head's GEMMs: few rows (weight streaming; the LayerNorm folded in, split K) to many rows
    # (CFG-doubled 2048 tokens)
    for dtype, rows, silu, gated, norm, partial in (
            (torch.bfloat16, 32, True, False, True, True), (torch.bfloat16, 128, False, True, False, False),
            (torch.bfloat16, 128, True, False, True, False), (torch.bfloat16, 64, False, False, True, True),
            (torch.bfloat16, 2048, True, False, False, False), (torch.bfloat16, 4096, False, True, False, False),
            (torch.float16, 32, False, True, False, True), (torch.float16, 2048, True, False, False, False),
            (torch.float32, 64, False, False, True, False)):
        t = TRITON_TYPES[dtype]
        config = diffusion._linear_config(rows, dtype, interpret=False, norm=norm)
        launch = _launch(config)
        signature = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", b_ptr=f"*{t}", res_ptr=f"*{t}", gate_ptr=f"*{t}",
                         shift_ptr=f"*{t}", scale_ptr=f"*{t}", ln_w_ptr=f"*{t}", ln_b_ptr=f"*{t}", out_ptr=f"*{t}",
                         partial_ptr="*fp32", rows="i32", n="i32", k="i32", k_per_split="i32", stride_x="i32",
                         stride_w="i32", stride_res="i32", stride_gate="i32", stride_shift="i32",
                         stride_scale="i32", stride_out="i32", stride_partial="i32", eps="fp32")
        aligned = {name for name in signature if name not in ("rows", "eps")}
        # tiles of 64+ rows go to wgmma on Hopper; fewer rows to mma.sync
        hopper = True if config["BLOCK_M"] >= 64 else (
            f"{rows} rows: {config['BLOCK_M']}-row tiles (weight streaming), and wgmma needs 64")
        name = f"head linear {t} rows={rows}" + (" layernorm" if norm else "") + (" split-k" if partial else "")
        yield Case("diffusion", name, diffusion._linear_kernel, signature,
                   dict(SILU=silu, GATED_RESIDUAL=gated, NORM=norm, AFFINE=norm, PARTIAL=partial,
                        PRECISION=dot_precision(dtype), **config), aligned, launch,
                   pipelined=True, hopper=hopper)
        if partial:
            signature = dict(partial_ptr="*fp32", b_ptr=f"*{t}", res_ptr=f"*{t}", gate_ptr=f"*{t}", out_ptr=f"*{t}",
                             rows="i32", n="i32", k="i32", splits="i32", stride_partial="i32", stride_res="i32",
                             stride_gate="i32", stride_out="i32", eps="fp32")
            aligned = {name for name in signature if name not in ("rows", "splits", "eps")}
            yield Case("diffusion", f"head linear reduce {t} rows={rows}" + (" layernorm" if norm else ""),
                       diffusion._linear_reduce_kernel, signature,
                       dict(SILU=silu, GATED_RESIDUAL=gated, NORM=norm, BLOCK_M=config["BLOCK_M"],
                            BLOCK_N=config["BLOCK_N"]), aligned, dict(num_warps=4, num_stages=1), pipelined=False)


def decode_split_case(dtype: torch.dtype, head_dim: int, group: int, page_size: int = 0) -> Case:
    from unimm.kernels import decode
    from unimm.kernels._common import dot_precision, padded_head_dim

    t = TRITON_TYPES[dtype]
    config = decode._triton_config(group, head_dim, interpret=False, page_size=page_size)
    launch = _launch(config)
    signature = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", lens_ptr="*i32", table_ptr="*i32",
                     out_ptr=f"*{t}", part_out_ptr="*fp32", part_lse_ptr="*fp32", max_len="i32", kv_heads="i32",
                     group="i32", q_tiles="i32", q_heads="i32", keys_per_split="i32", num_splits="i32",
                     num_pages="i32", **{f"stride_{n}": "i32" for n in ("qb", "qh", "kb", "kn", "kh", "vb", "vn", "vh",
                                                                         "tb", "ob", "oh")},
                     scale="fp32", softcap="fp32")
    aligned = {n for n, kind in signature.items() if kind.startswith("*") or n.startswith("stride_")}
    constexprs = dict(HAS_SOFTCAP=True, SPLIT=True, HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim),
                      PRECISION=dot_precision(dtype), PAGE_SIZE=page_size, STAGES=launch["num_stages"], **config)
    hopper = None  # the broadcast path has no dot
    if config["USE_DOT"]:
        if dtype == torch.float32:
            hopper = "fp32 is a CPU-test dtype (and its 16 query rows are too few for wgmma)"
        elif config["BLOCK_G"] < 64:
            hopper = f"{group} query heads per KV head: {config['BLOCK_G']}-row tiles, and wgmma needs 64"
        else:
            hopper = True
    # both paths' K / V loads are pipelined (cp.async): the key loop names its num_stages, so
    # triton pipelines the broadcast path's loads too, not only those feeding tl.dot
    paged = f" page={page_size}" if page_size else ""
    return Case("decode", f"decode split {t} d={head_dim} group={group}{paged} "
                f"({'dot' if config['USE_DOT'] else 'broadcast'})", decode._decode_split_kernel, signature,
                constexprs, aligned, launch, pipelined=True, hopper=hopper)


def decode_cases():
    from unimm.kernels import decode
    from unimm.kernels._common import padded_head_dim

    # GQA groups of Llama 3.2 1B (64, 4), Llama 3 / Mistral (128, 4 and 8), Gemma 7B (128, 1) and
    # Gemma 2 (256, 2), Qwen 2.5 7B (7 query heads per KV head); MQA with 16 to 71 query heads
    # (Falcon 7B: 64, 71) takes the dot path
    for dtype, head_dim, group in ((torch.bfloat16, 64, 4), (torch.bfloat16, 128, 4), (torch.bfloat16, 128, 1),
                                   (torch.bfloat16, 128, 8), (torch.bfloat16, 256, 2), (torch.float16, 64, 7),
                                   (torch.bfloat16, 128, 16), (torch.bfloat16, 256, 32), (torch.bfloat16, 128, 64),
                                   (torch.bfloat16, 64, 71), (torch.float16, 128, 16), (torch.float32, 128, 4),
                                   (torch.float32, 64, 16), (torch.float32, 128, 16),
                                   # head dims padded to a power of two in the kernel (80 -> 128, 96 -> 128)
                                   (torch.bfloat16, 80, 4), (torch.bfloat16, 96, 16)):
        yield decode_split_case(dtype, head_dim, group)
    # paged caches (vLLM's default page of 16 tokens), on both paths
    for dtype, head_dim, group, page_size in ((torch.bfloat16, 128, 4, 16), (torch.bfloat16, 128, 32, 16),
                                              (torch.float16, 128, 2, 256), (torch.bfloat16, 256, 1, 16),
                                              (torch.bfloat16, 64, 8, 64)):
        yield decode_split_case(dtype, head_dim, group, page_size)
    for dtype, head_dim in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128),
                            (torch.bfloat16, 80)):
        t = TRITON_TYPES[dtype]
        signature = dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", lens_ptr="*i32", out_ptr=f"*{t}", q_heads="i32",
                         max_len="i32", keys_per_split="i32", num_splits="i32", stride_ob="i32", stride_oh="i32")
        yield Case("decode", f"decode combine {t} d={head_dim}", decode._decode_combine_kernel, signature,
                   dict(HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_S=decode._COMBINE_BLOCK_SPLITS),
                   {"part_out_ptr", "part_lse_ptr", "lens_ptr", "out_ptr", "stride_ob", "stride_oh"},
                   dict(num_warps=4, num_stages=1), pipelined=False)


def sampling_cases():
    from unimm.kernels import _sampling_triton, sampling

    # bf16 with CFG and every rule (LlamaGen-style top-k 2000 + top-p), plain temperature, greedy
    for dtype, cfg, greedy, top_k, top_p in ((torch.bfloat16, True, False, True, True),
                                             (torch.float32, False, False, False, False),
                                             (torch.float16, False, False, True, False),
                                             (torch.bfloat16, True, True, False, False)):
        t = TRITON_TYPES[dtype]
        config = sampling._triton_config(2, 161_000, interpret=False)
        launch = dict(num_warps=config.pop("num_warps"), enable_fp_fusion=False)
        signature = dict(logits_ptr=f"*{t}", uniforms_ptr="*fp32", tokens_ptr="*i64", rows_out="i32", n="i32",
                         lo="i32", row_stride="i32", cfg_scale="fp32", inv_t="fp32", top_k="i32", top_p_hi="fp32",
                         top_p_mid="fp32", top_p_lo="fp32")
        name = "greedy" if greedy else "+".join(["temperature"] + ["top-k"] * top_k + ["top-p"] * top_p)
        yield Case("sampling", f"sample_tokens {t} {name}{' cfg' if cfg else ''}",
                   _sampling_triton._sample_tokens_kernel, signature,
                   dict(CFG=cfg, GREEDY=greedy, TOP_K=top_k, TOP_P=top_p, **config),
                   {"logits_ptr", "uniforms_ptr", "tokens_ptr", "row_stride"}, launch, pipelined=False)


FAMILIES = {"vq": vq_cases, "cross_entropy": cross_entropy_cases, "attention": attention_cases,
            "diffusion": diffusion_cases, "decode": decode_cases, "sampling": sampling_cases}


def cases(families=None):
    """Every case of the named families (default: all), without compiling anything."""
    for family in families or FAMILIES:
        yield from FAMILIES[family]()


def main(families: list[str]) -> None:
    for case in cases(families):
        for arch in case.archs:
            start = time.perf_counter()
            try:
                report = compile_report(case, arch)
            except Exception as error:  # reported per case: the test names it
                report = dict(error=f"{type(error).__name__}: {error}"[-2000:])
            print(json.dumps(dict(family=case.family, case=case.name, arch=arch, triton=triton.__version__,
                                  config=dict(**case.constexprs, **case.launch),
                                  expect=dict(pipelined=case.pipelined, hopper=case.hopper),
                                  seconds=round(time.perf_counter() - start, 2), **report)), flush=True)


if __name__ == "__main__":
    # compile for the real chips: under the interpreter unimm would define interpreted kernels
    # (triton reads the variable when a kernel is defined, and no unimm kernel module is imported yet)
    os.environ.pop("TRITON_INTERPRET", None)
    main(sys.argv[1:])
