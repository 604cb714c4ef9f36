"""Compiles unimm's Triton kernels ahead of time for sm_90a and sm_80, without a GPU.

Run by tests/test_triton_compile.py in a subprocess (the test session runs triton's
interpreter, which replaces kernels with interpreted functions). For every case it reports what
would make a launch fail or crawl on the real chip: shared memory against the chip's limit,
register spills, whether the loads were software-pipelined (cp.async) and whether the dot went
to wgmma on Hopper. Prints one JSON object per line.

Alignment matters: at launch triton specialises pointers and integers divisible by 16, which is
what lets it vectorise and pipeline loads, so each case names the arguments that are.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

# Largest dynamic shared memory one block may use.
SHARED_LIMIT = {90: 232448, 80: 166912}
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_report(kernel, signature: dict, constexprs: dict, aligned: set[str], arch: int,
                   num_warps: int, num_stages: int) -> dict:
    # argument order is the kernel's; constexprs may name any of its parameters
    names = list(kernel.arg_names)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    full_signature = {name: signature.get(name, "constexpr") for name in names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=full_signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    report = dict(arch=arch, shared=compiled.metadata.shared, shared_limit=SHARED_LIMIT[arch],
                  pipelined="async_copy" in compiled.asm["ttgir"],
                  wgmma="warp_group_dot" in compiled.asm["ttgir"])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True).stdout
    registers, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    report.update(registers=int(registers.group(1)) if registers else None,
                  stack_bytes=int(stack.group(1)) if stack else None)
    return report


def vq_cases():
    from unimm.kernels import vq
    from unimm.kernels._triton_common import dot_precision

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for code_dim, cosine in ((4, False), (8, True), (100, False), (256, False), (256, True)):
            config = vq._triton_config(code_dim, dtype, interpret=False)
            launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
            t = TRITON_TYPES[dtype]
            signature = dict(z_ptr=f"*{t}", codebook_ptr=f"*{t}", code_bias_ptr="*fp32", code_scale_ptr="*fp32",
                             row_scale_ptr="*fp32", part_dist_ptr="*fp32", part_idx_ptr="*i64", n_rows="i32",
                             n_codes="i32", code_dim="i32", stride_z="i32", stride_codebook="i32",
                             codes_per_split="i32")
            aligned = {name for name, kind in signature.items() if kind.startswith("*")} | {"codes_per_split"}
            if code_dim % 16 == 0:
                aligned |= {"code_dim", "stride_z", "stride_codebook"}
            constexprs = dict(COSINE=cosine, PRECISION=dot_precision(dtype), **config)
            name = f"vq_argmin {t} d={code_dim}{' cosine' if cosine else ''}"
            expect = dict(pipelined=code_dim % 16 == 0, wgmma=True)
            yield name, vq._vq_argmin_kernel, signature, constexprs, aligned, launch, expect


def cross_entropy_cases():
    from unimm.kernels import cross_entropy as ce
    from unimm.kernels._triton_common import dot_precision

    matmul_args = dict(M="i32", N="i32", K="i32", stride_am="i32", stride_ak="i32", stride_bk="i32", stride_bn="i32",
                       stride_cm="i32", stride_cn="i32", col_offset="i32", vocab="i32", softcap="fp32",
                       label_smoothing="fp32", z_loss="fp32")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = TRITON_TYPES[dtype]
        precision = dot_precision(dtype)
        config = ce._lse_config(dtype, interpret=False)
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        signature = dict(h_ptr=f"*{t}", w_ptr=f"*{t}", bias_ptr=f"*{t}", column_ptr="*i32", parts_ptr="*fp32",
                         n_rows="i32", vocab="i32", dim="i32", stride_hn="i32", stride_wv="i32",
                         cols_per_split="i32", softcap="fp32")
        aligned = {"h_ptr", "w_ptr", "bias_ptr", "column_ptr", "parts_ptr", "dim", "stride_hn", "stride_wv",
                   "cols_per_split"}
        constexprs = dict(stride_hd=1, stride_wd=1, HAS_BIAS=True, HAS_SOFTCAP=True, PRECISION=precision, **config)
        yield f"lse {t}", ce._lse_kernel, signature, constexprs, aligned, launch, dict(pipelined=True, wgmma=True)

        config = ce._matmul_config(dtype, interpret=False)
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        # (name, output type, epilogue, unit strides): triton turns integer arguments equal to 1
        # into constants at launch, so they are constants here too
        for name, c_type, epilogue, unit in (
                ("dx = lossgrad(h @ W.T)", t, ce.EPILOGUE_LOSS_GRAD, {"stride_ak", "stride_bk", "stride_cn"}),
                ("dW = dx.T @ h", t, ce.EPILOGUE_STORE, {"stride_am", "stride_bn", "stride_cn"}),
                ("dH += dx @ W", "fp32", ce.EPILOGUE_ACCUMULATE, {"stride_ak", "stride_bn", "stride_cn"})):
            signature = dict(a_ptr=f"*{t}", b_ptr=f"*{t}", c_ptr=f"*{c_type}", bias_ptr=f"*{t}", lse_ptr="*fp32",
                             column_ptr="*i32", coef_ptr="*fp32",
                             **{k: v for k, v in matmul_args.items() if k not in unit})
            aligned = {"a_ptr", "b_ptr", "c_ptr", "bias_ptr", "lse_ptr", "column_ptr", "coef_ptr", "M", "N", "K",
                       "stride_am", "stride_ak", "stride_bk", "stride_bn", "stride_cm"} - unit
            constexprs = dict(**{k: 1 for k in unit}, EPILOGUE=epilogue, HAS_BIAS=True, HAS_SOFTCAP=True,
                              PRECISION=precision, **config)
            yield (f"matmul {t} {name}", ce._matmul_kernel, signature, constexprs, aligned, launch,
                   dict(pipelined=True, wgmma=True))


def attention_cases():
    attn = importlib.import_module("unimm.kernels.attention")  # the package exports the function by this name
    from unimm.kernels._triton_common import dot_precision

    def strides(*names):  # [B, S, H, D] tensors: batch, seq and head strides (D is contiguous)
        return {f"stride_{n}{axis}": "i32" for n in names for axis in "bsh"}

    for dtype, head_dim in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 64)):
        t = TRITON_TYPES[dtype]
        config = attn._config(head_dim, dtype, interpret=False)
        common = dict(HAS_SOFTCAP=True, HEAD_DIM=head_dim, PRECISION=dot_precision(dtype))
        scalars = dict(stride_mask="i32", scale="fp32", softcap="fp32")
        sizes = dict(seq_len="i32", num_keys="i32", heads="i32")
        fwd = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", o_ptr=f"*{t}", lse_ptr="*fp32", start_ptr="*i32",
                   end_ptr="*i32", **sizes, group="i32", **strides("q", "k", "v", "o"), **scalars)
        dq = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", do_ptr=f"*{t}", dq_ptr=f"*{t}", lse_ptr="*fp32",
                  delta_ptr="*fp32", start_ptr="*i32", end_ptr="*i32", **sizes, group="i32",
                  **strides("q", "k", "v", "do", "dq"), **scalars)
        dkdv = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", do_ptr=f"*{t}", dk_ptr=f"*{t}", dv_ptr=f"*{t}",
                    lse_ptr="*fp32", delta_ptr="*fp32", start_ptr="*i32", end_ptr="*i32", first_ptr="*i32",
                    last_ptr="*i32", **sizes, kv_heads="i32", group="i32", **strides("q", "k", "v", "do", "dk", "dv"),
                    stride_mask="i32", stride_tiles="i32", scale="fp32", softcap="fp32")
        for name, kernel, signature, tiles in (("fwd", attn._attn_fwd_kernel, fwd, config["fwd"]),
                                               ("bwd dq", attn._attn_bwd_dq_kernel, dq, config["dq"]),
                                               ("bwd dk dv", attn._attn_bwd_dkdv_kernel, dkdv, config["dkdv"])):
            tiles = dict(tiles)
            launch = {key: tiles.pop(key) for key in ("num_warps", "num_stages")}
            aligned = {n for n, kind in signature.items() if kind.startswith("*") or n.startswith("stride_")}
            # wgmma needs 64-row operands: not in the fp32 tiles nor in dK/dV at D = 256 (see _config)
            wgmma = dtype != torch.float32 and not (head_dim == 256 and name == "bwd dk dv")
            yield (f"attention {name} {t} d={head_dim}", kernel, signature, dict(**common, **tiles), aligned, launch,
                   dict(pipelined=False, wgmma=wgmma))


def diffusion_cases():
    from unimm.kernels import diffusion

    for dtype, width in ((torch.bfloat16, 1024), (torch.bfloat16, 1536), (torch.float32, 1024)):
        t = TRITON_TYPES[dtype]
        block = triton.next_power_of_2(width)
        signature = dict(x_ptr=f"*{t}", shift_ptr=f"*{t}", scale_ptr=f"*{t}", weight_ptr=f"*{t}", bias_ptr=f"*{t}",
                         out_ptr=f"*{t}", width="i32", stride_x="i32", stride_shift="i32", stride_scale="i32",
                         stride_out="i32", eps="fp32")
        aligned = {name for name in signature if name != "eps"}
        yield (f"modulated layernorm {t} w={width}", diffusion._modulated_layernorm_kernel, signature,
               dict(AFFINE=True, BLOCK=block), aligned, dict(num_warps=min(16, block // 256), num_stages=1),
               dict(pipelined=False, wgmma=False))
    signature = dict(x_ptr="*fp32", out_ptr="*bf16", noise_ptr="*fp32", step_ptr="*fp32", new_x_ptr="*fp32",
                     token_dim="i32", stride_out="i32", rows="i32", cfg_scale="fp32", noise_scale="fp32", clip="fp32")
    yield ("denoise step bf16", diffusion._step_kernel, signature, dict(GUIDED=True, CLIP=True, BLOCK=16),
           {"x_ptr", "out_ptr", "noise_ptr", "step_ptr", "new_x_ptr"}, dict(num_warps=1, num_stages=1),
           dict(pipelined=False, wgmma=False))
    from unimm.kernels._triton_common import dot_precision

    # the head's GEMMs: few rows (weight streaming) to many rows (CFG-doubled 2048 tokens)
    for dtype, rows, silu, gated in ((torch.bfloat16, 32, True, False), (torch.bfloat16, 128, False, True),
                                     (torch.bfloat16, 2048, True, False), (torch.bfloat16, 4096, False, True),
                                     (torch.float32, 64, False, False)):
        t = TRITON_TYPES[dtype]
        config = diffusion._linear_config(rows, dtype, interpret=False)
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        signature = dict(x_ptr=f"*{t}", w_ptr=f"*{t}", b_ptr=f"*{t}", res_ptr=f"*{t}", gate_ptr=f"*{t}",
                         out_ptr=f"*{t}", rows="i32", n="i32", k="i32", stride_x="i32", stride_w="i32",
                         stride_res="i32", stride_gate="i32", stride_out="i32")
        aligned = {name for name in signature if name != "rows"}
        # tiles of 64+ rows go to wgmma on Hopper; fewer rows to mma.sync
        yield (f"head linear {t} rows={rows}", diffusion._linear_kernel, signature,
               dict(SILU=silu, GATED_RESIDUAL=gated, PRECISION=dot_precision(dtype), **config), aligned, launch,
               dict(pipelined=True, wgmma=dtype != torch.float32 and config["BLOCK_M"] >= 64))


def decode_cases():
    from unimm.kernels import decode
    from unimm.kernels._triton_common import dot_precision

    for dtype, head_dim, group in ((torch.bfloat16, 64, 4), (torch.bfloat16, 128, 4), (torch.bfloat16, 128, 1),
                                   (torch.bfloat16, 128, 8), (torch.bfloat16, 256, 2), (torch.bfloat16, 128, 16),
                                   (torch.bfloat16, 256, 32), (torch.float16, 64, 7), (torch.float32, 128, 4),
                                   (torch.float32, 64, 16)):
        t = TRITON_TYPES[dtype]
        config = decode._triton_config(group, head_dim, interpret=False)
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        signature = dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", lens_ptr="*i32", out_ptr=f"*{t}",
                         part_out_ptr="*fp32", part_lse_ptr="*fp32", max_len="i32", kv_heads="i32", group="i32",
                         q_tiles="i32", q_heads="i32", keys_per_split="i32", num_splits="i32",
                         **{f"stride_{n}": "i32" for n in ("qb", "qh", "kb", "kn", "kh", "vb", "vn", "vh", "ob", "oh")},
                         scale="fp32", softcap="fp32")
        aligned = {n for n, kind in signature.items() if kind.startswith("*") or n.startswith("stride_")}
        constexprs = dict(HAS_SOFTCAP=True, SPLIT=True, HEAD_DIM=head_dim, PRECISION=dot_precision(dtype), **config)
        path = "dot" if config["USE_DOT"] else "broadcast"
        # the dot path's loads feed tl.dot, which triton pipelines; its 16 to 64 query rows are
        # too few for wgmma (64-row tiles), so mma.sync serves them
        yield (f"decode split {t} d={head_dim} group={group} ({path})", decode._decode_split_kernel, signature,
               constexprs, aligned, launch, dict(pipelined=config["USE_DOT"], wgmma=False))
    for dtype, head_dim in ((torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 256), (torch.float32, 128)):
        t = TRITON_TYPES[dtype]
        signature = dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", lens_ptr="*i32", out_ptr=f"*{t}", q_heads="i32",
                         max_len="i32", keys_per_split="i32", num_splits="i32", stride_ob="i32", stride_oh="i32")
        yield (f"decode combine {t} d={head_dim}", decode._decode_combine_kernel, signature,
               dict(HEAD_DIM=head_dim, BLOCK_S=decode._COMBINE_BLOCK_SPLITS),
               {"part_out_ptr", "part_lse_ptr", "lens_ptr", "out_ptr", "stride_ob", "stride_oh"},
               dict(num_warps=4, num_stages=1), dict(pipelined=False, wgmma=False))


FAMILIES = {"vq": vq_cases, "cross_entropy": cross_entropy_cases, "attention": attention_cases,
            "diffusion": diffusion_cases, "decode": decode_cases}


def main(families: list[str]) -> None:
    for family in families:
        for name, kernel, signature, constexprs, aligned, launch, expect in FAMILIES[family]():
            for arch in (90, 80):
                report = compile_report(kernel, signature, constexprs, aligned, arch, **launch)
                print(json.dumps(dict(family=family, case=name, expect=expect, **report)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(FAMILIES))
