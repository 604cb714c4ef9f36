"""One training step (forward, backward, AdamW) of a Llama-3.2-1B-shaped unified model: unimm against
transformers and transformers + Liger-Kernel.

The backbone is Llama-3.2-1B's (hidden 2048, 16 layers, 32 heads / 8 KV heads of 64, MLP 8192,
llama3 RoPE, tied embeddings) with the vocabulary expanded to 161,280 entries whose last 32,768
are image codes (Emu3-style). A batch is packed 8k-token rows of two documents each,
[text | image | text] with 80% image tokens; every position is trained on its next token inside
its document. Two layouts: images as bidirectional spans (each image token sees its whole
image) and images as causal spans (plain packed causal documents). Implementations, each on its
own copy of the same bf16 weights and the same batch, in this process:
  * unimm: ``unimm.models.Decoder`` with ``AttentionMask.from_spans`` and ``decoder.loss``
    (``linear_cross_entropy``): interval-mask attention, no logits materialised.
  * transformers+unimm: transformers' LlamaForCausalLM after ``unimm.integrations.transformers.apply``,
    given the same AttentionMask as ``attention_mask``.
  * transformers: LlamaForCausalLM on SDPA with the layout as a 4-D boolean mask
    (``mask.to_dense``), logits materialised and upcast for the loss, as transformers does.
  * transformers+liger: the same after ``liger_kernel.transformers.apply_liger_kernel_to_llama``
    (RoPE, RMSNorm, SwiGLU, fused linear cross-entropy); n/a when liger-kernel does not import.
    It patches transformers' Llama module globally, so it runs last.
Every step is ``loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)`` with
``torch.optim.AdamW`` (fused on CUDA) over bf16 parameters.

Reported per layout and implementation: median step time, tokens/s, MFU = model FLOPs /
(time x the measured bf16 matmul rate), where model FLOPs = 6 x parameters x tokens (every
parameter is a matmul weight; the tied embedding counts once, as the head) + attention
3.5 x 4 x head_dim x heads x layers x visible pairs (forward + 2.5x backward, the same for every
implementation); peak memory of a step (parameters, optimizer state and all transients; and
what the step adds beyond what lives between steps); the first step's loss against
transformers' (the same weights and batch: agreement to bf16 rounding); speedup and memory ratio
against each anchor.

Target (issue): on H100, unimm >= 1.5x the tokens/s of transformers + Liger at lower peak memory,
in both layouts.

With ``--quick`` (what ``unimm bench --quick`` runs): the bidirectional-images layout only, with
2 warm-up and 5 timed steps.

    python -m unimm.bench.train_step [--layouts bidirectional-images] [--rows 1] [--quick] [--out DIR]
    python -m unimm.bench.train_step --smoke --out DIR   # a tiny model on the CPU: checks the family
"""

from __future__ import annotations

import functools
import time

import torch
import transformers

from unimm.bench._harness import attempt, fold, mark_na, optional_import, parse_run, show, verdict
from unimm.bench._llama import LLAMA3_ROPE, llama_config, llama_for_causal_lm
from unimm.integrations.transformers import apply as apply_unimm
from unimm.kernels import AttentionMask
from unimm.models import Decoder, DecoderConfig
from unimm.testing import LOSS_TOLERANCE

liger, _liger_error = optional_import("liger_kernel.transformers", "liger-kernel")

TARGET = "on H100: unimm >= 1.5x the tokens/s of transformers + Liger at lower peak memory, in both layouts"
TARGET_SPEEDUP = 1.5
IMAGE_FRACTION = 0.8
COUNTS = dict(warmup=3, repeat=10)  # a step is hundreds of ms; AdamW's state exists after the first
QUICK_COUNTS = dict(warmup=2, repeat=5)
SMOKE_COUNTS = dict(warmup=1, repeat=2)

# name: model and batch; rows of seq_len tokens, docs_per_row documents per row
SHAPES = {
    "llama3.2-1b-v161k": dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                              vocab=161280, image_codes=32768, rows=1, seq_len=8192, docs_per_row=2),
}
SMOKE_SHAPES = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=301,
                 image_codes=100, rows=2, seq_len=40, docs_per_row=2),
}
LAYOUTS = ("bidirectional-images", "causal-images")
QUICK_LAYOUTS = ("bidirectional-images",)
ANCHORS = ("transformers+liger", "transformers")
IMPLS = ("unimm", "transformers+unimm", "transformers", "transformers+liger")  # liger patches globally: last


# ---------------------------------------------------------------------------------------------
# Model and batch
# ---------------------------------------------------------------------------------------------

def hf_config(spec: dict) -> transformers.LlamaConfig:
    config = llama_config(spec, spec["vocab"], use_cache=False)
    config._attn_implementation = "sdpa"
    return config


def matmul_params(spec: dict) -> int:
    """Parameters that are matmul weights: every one but the norms (tied embedding once)."""
    q, kv = spec["heads"] * spec["head_dim"], spec["kv_heads"] * spec["head_dim"]
    per_layer = spec["hidden"] * (2 * q + 2 * kv) + 3 * spec["hidden"] * spec["intermediate"]
    return spec["layers"] * per_layer + spec["vocab"] * spec["hidden"]


def step_flops(spec: dict, visible_pairs: int) -> float:
    tokens = spec["rows"] * spec["seq_len"]
    attention = 3.5 * 4 * spec["head_dim"] * spec["heads"] * spec["layers"] * visible_pairs
    return 6 * matmul_params(spec) * tokens + attention


def make_batch(spec: dict, layout: str, device: torch.device) -> dict:
    """Packed rows: ``docs_per_row`` documents of [text | image | text], 80% image tokens; image
    tokens drawn from the code block at the vocabulary's end, text below it."""
    rows, seq_len, docs = spec["rows"], spec["seq_len"], spec["docs_per_row"]
    doc_len = seq_len // docs
    text = round(doc_len * (1 - IMAGE_FRACTION) / 2)
    in_doc = torch.arange(seq_len) % doc_len
    doc_ids = (torch.arange(seq_len) // doc_len).clamp_max(docs - 1).expand(rows, seq_len)
    is_image = ((in_doc >= text) & (in_doc < doc_len - text)).expand(rows, seq_len)
    span_ids = torch.where(is_image, doc_ids + 1, 0) if layout == "bidirectional-images" else torch.zeros_like(doc_ids)
    generator = torch.Generator().manual_seed(0)
    codes_start = spec["vocab"] - spec["image_codes"]
    text_ids = torch.randint(0, codes_start, (rows, seq_len), generator=generator)
    image_ids = torch.randint(codes_start, spec["vocab"], (rows, seq_len), generator=generator)
    input_ids = torch.where(is_image, image_ids, text_ids)
    targets = torch.full_like(input_ids, -100)
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    targets[:, :-1] = torch.where(same_doc, input_ids[:, 1:], -100)
    # transformers shifts labels itself: labels[t + 1] is the target of position t
    labels = torch.nn.functional.pad(targets[:, :-1], (1, 0), value=-100)
    mask = AttentionMask.from_spans(doc_ids.to(device), span_ids.to(device))
    return dict(input_ids=input_ids.to(device), positions=in_doc.expand(rows, seq_len).to(device),
                targets=targets.to(device), labels=labels.to(device), mask=mask,
                dense_mask=mask.to_dense(seq_len)[:, None], image_fraction=float(is_image.float().mean()),
                visible_pairs=mask.visible_pairs())


def master_weights(spec: dict, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """One random initialisation (transformers' own), kept on the CPU, copied into every model."""
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config(spec))
    state = {name: tensor.detach().to("cpu", dtype) for name, tensor in model.state_dict().items()}
    del model
    return state


def build(impl: str, spec: dict, weights: dict, dtype: torch.dtype, device: torch.device, batch: dict):
    """(model, step function returning the loss) for one implementation, or raises why not."""
    if impl == "unimm":
        with torch.device(device):
            decoder = Decoder(DecoderConfig.from_hf(hf_config(spec))).to(dtype)
        decoder.load_state_dict({name.removeprefix("model."): tensor for name, tensor in weights.items()})

        def forward():
            hidden = decoder(batch["input_ids"], positions=batch["positions"], mask=batch["mask"])
            return decoder.loss(hidden, batch["targets"])
        return decoder, forward

    if impl == "transformers+liger" and liger is None:
        raise RuntimeError(_liger_error)
    model = llama_for_causal_lm(hf_config(spec), dtype, device)
    model.load_state_dict(weights)
    if impl == "transformers+liger":
        if device.type != "cuda":
            raise RuntimeError("Liger's kernels are Triton GPU kernels: needs a CUDA device")
        liger.apply_liger_kernel_to_llama(model=model)
    if impl == "transformers+unimm":
        apply_unimm(model)
    mask = batch["mask"] if impl == "transformers+unimm" else batch["dense_mask"]

    def forward():
        return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["positions"],
                     labels=batch["labels"]).loss
    return model, forward


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def run_impl(result: dict, impl: str, spec: dict, weights: dict, batch: dict, run) -> None:
    device = run.device
    model, forward = build(impl, spec, weights, run.dtype, device, batch)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    result["loss"] = step().detach().float().item()  # the initial weights' loss: comparable across rows
    run.sync()
    result["first_step_s"] = time.perf_counter() - start
    result.update(run.time(step))
    if device.type == "cuda":
        resident = torch.cuda.memory_allocated()  # parameters + optimizer state: what lives between steps
        result["extra_peak_bytes"] = run.peak_memory(step)
        result["peak_bytes"] = resident + result["extra_peak_bytes"]


def bench_case(layout, name, spec, run) -> list[dict]:
    batch = make_batch(spec, layout, run.device)
    weights = master_weights(spec, run.dtype, run.device)
    flops = step_flops(spec, batch["visible_pairs"])
    tokens = spec["rows"] * spec["seq_len"]
    results = []
    for impl in IMPLS:
        result = dict(layout=layout, shape=name, impl=impl)
        results.append(result)
        # an anchor's own failure is its n/a; unimm's is a bug
        reason = attempt(functools.partial(run_impl, result, impl, spec, weights, batch, run),
                         is_bug=impl in ("unimm", "transformers+unimm"))
        run.release(collect=True)
        if reason is not None:
            mark_na(result, reason, ("layout", "shape", "impl"), f"{layout:>21} {impl:>19}")
            continue
        seconds = result["median_ms"] * 1e-3
        result.update(available=True, tokens_per_s=tokens / seconds, tflops=flops / seconds / 1e12)
        if run.peaks is not None:
            result["mfu_pct"] = 100 * result["tflops"] / run.peaks["bf16_matmul_tflops"]
        print(f"{layout:>21} {impl:>19}  {result['median_ms']:9.1f} ms  {result['tokens_per_s']:10.0f} tok/s"
              + (f"  MFU {result['mfu_pct']:5.1f}%" if "mfu_pct" in result else "")
              + (f"  peak {result['peak_bytes'] / 2**30:6.2f} GiB" if "peak_bytes" in result else "")
              + f"  loss {result['loss']:.5f}")
    del batch, weights

    by_impl = {r["impl"]: r for r in results if r["available"]}
    anchor_loss = by_impl.get("transformers", {}).get("loss")
    for impl, result in by_impl.items():
        if anchor_loss is not None and impl != "transformers":
            result["loss_rel_diff"] = abs(result["loss"] - anchor_loss) / abs(anchor_loss)
            result["within_tolerance"] = bool(result["loss_rel_diff"] <= LOSS_TOLERANCE[run.dtype])  # NaN fails
        if impl in ("unimm", "transformers+unimm"):
            result["speedup"] = {a: by_impl[a]["median_ms"] / result["median_ms"] for a in ANCHORS if a in by_impl}
            result["memory_ratio"] = {a: result["peak_bytes"] / by_impl[a]["peak_bytes"] for a in ANCHORS
                                      if a in by_impl and "peak_bytes" in result}
    return results


def check_targets(results, layouts):
    """Per layout: unimm >= 1.5x Liger's tokens/s, and lower peak memory; None where Liger was n/a."""
    parts = {}
    for layout in layouts:
        rows = {r["impl"]: r for r in results if r["layout"] == layout}
        unimm, liger = rows.get("unimm", {}), rows.get("transformers+liger", {})
        if not unimm.get("available"):
            parts[layout] = dict(speed=False, memory=False)
        elif not liger.get("available"):
            parts[layout] = dict(speed=None, memory=None)
        else:
            parts[layout] = dict(
                speed=unimm["tokens_per_s"] >= TARGET_SPEEDUP * liger["tokens_per_s"],
                memory=unimm["peak_bytes"] < liger["peak_bytes"] if "peak_bytes" in unimm else None)
    return parts, fold(value for part in parts.values() for value in part.values())


def table_row(result):
    row = {
        "layout": result["layout"],
        "impl": result["impl"],
        "median ms": show(result, "median_ms", ".1f") if result["available"] else "n/a",
        "tokens/s": show(result, "tokens_per_s", ".0f"),
        "MFU %": show(result, "mfu_pct", ".1f"),
        "peak GiB": show(result, "peak_bytes", ".2f", 2**-30),
        "step extra GiB": show(result, "extra_peak_bytes", ".2f", 2**-30),
        "loss diff": show(result, "loss_rel_diff", ".1e"),
    }
    for anchor in ANCHORS:
        row[f"speedup vs {anchor}"] = show(result.get("speedup"), anchor, ".2f")
        row[f"memory vs {anchor}"] = show(result.get("memory_ratio"), anchor, ".2f")
    return row


def add_arguments(parser):
    parser.add_argument("--layouts", help=f"comma-separated subset of {','.join(LAYOUTS)}; default all "
                                          f"({','.join(QUICK_LAYOUTS)} with --quick)")
    parser.add_argument("--rows", type=int, help="packed rows per step (default: the shape's)")


def main(argv: list[str] | None = None) -> int:
    run = parse_run(__doc__, "train_step", SHAPES, SMOKE_SHAPES, default_dtype="bf16", counts=COUNTS,
                     smoke_counts=SMOKE_COUNTS, quick_counts=QUICK_COUNTS, smoke_dtype="fp32",
                     dtype_help="; fp32 with --smoke, CPU bf16 matmuls being slow", add_arguments=add_arguments,
                     argv=argv)
    layouts = run.choose(run.layouts, LAYOUTS, QUICK_LAYOUTS if run.quick else LAYOUTS, "layouts")
    if run.rows is not None and run.rows < 1:
        raise SystemExit(f"unimm.bench.train_step: --rows must be >= 1, got {run.rows}")
    shapes = {name: dict(run.shape_table[name], **({"rows": run.rows} if run.rows else {})) for name in run.names}
    if run.smoke:
        torch.set_num_threads(1)  # tiny CPU tensors: thread-pool wake-ups would dominate every call
    run.start()

    results = []
    for layout in layouts:
        for name, spec in shapes.items():
            results += bench_case(layout, name, spec, run)

    parts, target_met = check_targets(results, layouts)
    if run.smoke:  # CPU times say nothing about an H100 target
        parts = {layout: dict(speed=None, memory=None) for layout in layouts}
        target_met = None
    payload = dict(
        target=TARGET,
        target_met=target_met,
        target_parts=parts,
        **run.fields(),
        timing=dict(timer=run.timer.__name__, **run.counts, measures="forward + backward + AdamW step + zero_grad"),
        flops="6 * matmul_params * tokens + 3.5 * 4 * head_dim * heads * layers * visible_pairs",
        tolerance=LOSS_TOLERANCE[run.dtype],
        shapes={name: dict(spec, matmul_params=matmul_params(spec), tokens=spec["rows"] * spec["seq_len"],
                           image_fraction=IMAGE_FRACTION, rope_scaling=LLAMA3_ROPE)
                for name, spec in shapes.items()},
        layouts={"bidirectional-images": "each image span bidirectional inside its document, text causal",
                 "causal-images": "packed causal documents"},
        results=results,
    )
    outcome = f"target {verdict(target_met)}: " + ", ".join(
        f"{layout} speed {verdict(part['speed'])} memory {verdict(part['memory'])}" for layout, part in parts.items())
    run.report(payload, outcome, case=("layout",),
               agreement=f"first-step loss vs transformers' (tolerance {LOSS_TOLERANCE[run.dtype]:g}, relative)",
               tables=[("speedup vs X = X's median step time / this row's; memory vs X = this row's peak / X's peak",
                        [table_row(result) for result in results])])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
