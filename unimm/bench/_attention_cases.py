"""How the attention family (``unimm.bench.attention``) builds and checks its cases: each layout
as the ``AttentionMask`` builder call a model would make, its description, and the fp32
reference every implementation's output and gradients are compared with, and unimm's two rows
(automatic dispatch, and its own kernel forced: benched where dispatch chose a vendor kernel).
"""

from __future__ import annotations

import os

import torch

from unimm.kernels import AttentionMask, attention
from unimm.kernels.attention import attention_backend
from unimm.testing import rel_err

OWN = "unimm[triton]"


def unimm_impl(impl, case):
    """make_impl's answer for "unimm" and OWN: (fn(q, k, v), extras with ``served_by``, None)."""
    mask = case["mask"]
    served_by = attention_backend(case["q"], case["k"], case["v"], mask)
    if impl == "unimm":
        return (lambda q, k, v: attention(q, k, v, mask)), dict(
            variant="attention(q, k, v, mask), automatic dispatch", mask_build_ms=case["unimm_build_ms"],
            served_by=served_by), None
    def own(q, k, v):
        previous, os.environ["UNIMM_BACKEND"] = os.environ.get("UNIMM_BACKEND", ""), "triton"
        try:
            return attention(q, k, v, mask)
        finally:
            os.environ["UNIMM_BACKEND"] = previous  # empty is automatic dispatch, as unset
    return own, dict(variant="attention(q, k, v, mask), UNIMM_BACKEND=triton", served_by="triton",
                     mask_build_ms=case["unimm_build_ms"]), None


def images_per_doc(spec) -> int:
    if not spec["image"] or spec["doc"] < spec["lead"] + spec["image"]:
        return 0
    return (spec["doc"] - spec["lead"] - spec["image"]) // (spec["image"] + spec["gap"]) + 1


def packed_ids(spec, batch, seq, device):
    """doc_ids and span_ids [B, S] for a ``packed`` layout, built with torch ops."""
    doc, image, lead, gap, pad = (spec[key] for key in ("doc", "image", "lead", "gap", "pad"))
    pos = torch.arange(seq, device=device)
    doc_ids = (pos // doc).expand(batch, seq).clone()
    if pad:
        doc_ids[-1, seq - pad:] = -1
    n_images = images_per_doc(spec)
    if n_images:
        rel = pos % doc - lead  # position after the doc's leading text
        index = rel.div(image + gap, rounding_mode="floor")
        in_image = (rel >= 0) & (rel % (image + gap) < image) & (index < n_images)
        spans = torch.where(in_image, (pos // doc) * n_images + index + 1, 0)  # unique, nonzero
    else:
        spans = torch.zeros_like(pos)
    span_ids = torch.where(doc_ids >= 0, spans.expand(batch, seq), 0)
    return doc_ids, span_ids


def layout_builder(spec, batch, seq, device):
    """The layout's AttentionMask builder call, with its inputs made beforehand (not timed)."""
    if spec["kind"] == "causal":
        return lambda: AttentionMask.causal(batch, seq, device=device)
    if spec["kind"] == "prefix_lm":
        prefix_lens = torch.full((batch,), int(seq * spec["prefix_fraction"]), device=device)
        return lambda: AttentionMask.prefix_lm(prefix_lens, seq)
    if spec["kind"] == "sinks_window":
        return lambda: AttentionMask.sinks_and_window(batch, seq, sinks=spec["sinks"], window=spec["window"],
                                                      device=device)
    doc_ids, span_ids = packed_ids(spec, batch, seq, device)
    return lambda: AttentionMask.from_spans(doc_ids, span_ids)


def describe_layout(spec, seq) -> str:
    if spec["kind"] == "causal":
        return "pure causal"
    if spec["kind"] == "prefix_lm":
        return f"prefix-LM, bidirectional prefix of {int(seq * spec['prefix_fraction'])} tokens"
    if spec["kind"] == "sinks_window":
        return (f"attention sinks (the first {spec['sinks']} keys) plus a causal window of {spec['window']}: "
                "two intervals per row")
    n_docs = -(-seq // spec["doc"])
    text = f"{n_docs} docs of {spec['doc']} (from_spans)"
    n_images = images_per_doc(spec)
    if n_images:
        text += (f", each: text {spec['lead']}, then {n_images} images of {spec['image']} bidirectional "
                 f"tokens {spec['gap']} text tokens apart, text to the end")
    else:
        text += ", causal within each doc (span ids all 0)"
    if spec["pad"]:
        text += f"; the last {spec['pad']} tokens of the last sequence are padding"
    return text


def reference(q, k, v, dout, dense, scale):
    """(out, dq, dk, dv) in fp32 on the inputs' device: explicit softmax attention with the dense
    mask, fp32 matmuls without TF32, one query head and a block of query rows at a time (512 MiB
    of fp32 scores per block). Rows with no visible key give 0."""
    batch, seq, q_heads, _ = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dq = torch.empty_like(out)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros_like(dk)
    has_keys = dense.any(-1)[..., None]  # [B, S, 1]
    rows = max(1, 2**27 // (batch * kv_len))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.enable_grad():
            for h in range(q_heads):
                kh = k.detach()[:, :, h // group].float().requires_grad_()
                vh = v.detach()[:, :, h // group].float().requires_grad_()
                for start in range(0, seq, rows):
                    block = slice(start, start + rows)
                    qb = q.detach()[:, block, h].float().requires_grad_()
                    scores = torch.matmul(qb, kh.transpose(1, 2)) * scale
                    scores = scores.masked_fill(~dense[:, block], float("-inf"))
                    scores = scores.masked_fill(~has_keys[:, block], 0.0)  # no all -inf rows: no NaN
                    probs = torch.softmax(scores, dim=-1) * has_keys[:, block]
                    ob = torch.matmul(probs, vh)
                    gq, gk, gv = torch.autograd.grad(ob, (qb, kh, vh), dout[:, block, h].float())
                    out[:, block, h] = ob.detach()
                    dq[:, block, h] = gq
                    dk[:, :, h // group] += gk
                    dv[:, :, h // group] += gv
                    del scores, probs, ob, gq, gk, gv
    finally:
        torch.set_float32_matmul_precision(precision)
    return out, dq, dk, dv


def check(result, out, grads, ref, empty, tol):
    """Errors of one implementation's first call against the reference, into ``result``."""
    names = ("out",) if grads is None else ("out", "dq", "dk", "dv")
    got = (out,) if grads is None else (out,) + tuple(grads)
    for name, g, e in zip(names, got, ref):
        result[f"{name}_rel_err"] = rel_err(g, e)
    result["empty_rows"] = int(empty.sum())
    if result["empty_rows"]:
        # out and dq of rows that see no keys: exactly 0
        result["empty_rows_max_abs"] = max(g.detach()[empty].abs().max().item() for g in got[:2])
    result["within_tolerance"] = bool(all(result[f"{name}_rel_err"] <= tol for name in names)
                                      and result.get("empty_rows_max_abs", 0.0) == 0.0)
