"""One training step of a tiny unimm ``Decoder`` sharded with FSDP2 (``fully_shard``).

Each transformer layer is sharded on its own, then the root (embeddings, final norm and the tied
``lm_head``), as FSDP2 recommends. The loss runs inside the root's forward (``StepLoss``), so
FSDP2 gathers ``lm_head`` around ``linear_cross_entropy`` just as around the layers. Every rank
builds the same global batch (packed documents with a bidirectional "image" span each, as an
``AttentionMask.from_spans``) and takes its own rows; the loss is the mean over the global
batch's targets, so the gathered gradients equal a single-process step on the whole batch.
The step's loss and full (gathered, unsharded) gradients go to ``--out`` (``torch.save``).

    torchrun --standalone --nproc_per_node 2 examples/fsdp_train_step.py --out step.pt
    python examples/fsdp_train_step.py --out step.pt        # one process, no FSDP: the reference

On GPUs (one per process) ranks talk over NCCL; with ``--device cpu`` over gloo (FSDP2 runs
there on a ``"cpu"`` device mesh).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from unimm.kernels import AttentionMask
from unimm.models import Decoder, DecoderConfig

CONFIG = DecoderConfig(family="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
BATCH, SEQ_LEN = 4, 24


class StepLoss(nn.Module):
    """Decoder forward plus the summed cross-entropy, as one module call."""

    def __init__(self, decoder: Decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, input_ids: torch.Tensor, mask: AttentionMask, targets: torch.Tensor) -> torch.Tensor:
        return self.decoder.loss(self.decoder(input_ids, mask=mask), targets, reduction="sum")


def build_model(seed: int, device: torch.device) -> StepLoss:
    torch.manual_seed(seed)
    return StepLoss(Decoder(CONFIG)).to(device)


def make_batch(seed: int) -> dict[str, torch.Tensor]:
    """The global batch: per row two documents of random length, each with one bidirectional
    span of "image" tokens that are not targets (images as input), targets = next token inside
    a document, -100 at each document's last token."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ_LEN), generator=generator)
    doc_ids = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
    span_ids = torch.zeros(BATCH, SEQ_LEN, dtype=torch.long)
    for row in range(BATCH):
        split = int(torch.randint(8, SEQ_LEN - 8, (), generator=generator))
        doc_ids[row, split:] = 1
        for span, (lo, hi) in enumerate(((0, split), (split, SEQ_LEN)), start=1):
            start = lo + 1 + int(torch.randint(0, (hi - lo) // 2, (), generator=generator))
            span_ids[row, start:start + 4] = span
    targets = torch.full_like(input_ids, -100)
    same_doc = doc_ids[:, 1:] == doc_ids[:, :-1]
    targets[:, :-1] = torch.where(same_doc & (span_ids[:, 1:] == 0), input_ids[:, 1:], -100)
    return dict(input_ids=input_ids, doc_ids=doc_ids, span_ids=span_ids, targets=targets)


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], rank: int, world: int,
               device: torch.device) -> torch.Tensor:
    """Forward + backward on this rank's rows of the global batch; returns its share of the
    global mean loss (the ranks' shares sum to it).

    FSDP2 averages gradients over ranks, so the backward runs on ``world`` times the share
    (``set_gradient_divide_factor(1)`` would sum instead, but needs NCCL's PreMulSum: gloo has none).
    """
    num_targets = int((batch["targets"] != -100).sum())
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    part = {name: tensor[rows].to(device) for name, tensor in batch.items()}
    mask = AttentionMask.from_spans(part["doc_ids"], part["span_ids"])
    share = model(part["input_ids"], mask, part["targets"]) / num_targets
    (share * world).backward()
    return share.detach()


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, gathered to full size when FSDP2 sharded it (a DTensor)."""
    grads = {}
    for name, param in model.decoder.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name] = grad.detach().cpu()
    return grads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="file for {'loss', 'grads', 'world_size', 'sharded_params'} (torch.save)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda: one GPU per process, NCCL; cpu: gloo (default: cuda when available)")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    cuda = args.device == "cuda"
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if BATCH % world:
        raise SystemExit(f"the global batch of {BATCH} rows does not split over {world} processes")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    model = build_model(args.seed, device)
    if distributed:
        mesh = init_device_mesh(device.type, (world,))
        for layer in model.decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    loss = train_step(model, make_batch(args.seed), rank, world, device)
    if distributed:
        dist.all_reduce(loss)
    sharded = sum(hasattr(param, "full_tensor") for param in model.parameters())  # DTensors under FSDP2
    grads = full_gradients(model)  # collective under FSDP: every rank takes part
    if rank == 0:
        torch.save(dict(loss=loss.cpu(), grads=grads, world_size=world, sharded_params=sharded), args.out)
        print(f"world size {world}: loss {loss.item():.6f}, {len(grads)} gradients written to {args.out}")
    if distributed:
        dist.barrier()  # rank 0 has saved
        dist.destroy_process_group()
        if not cuda:
            # gloo's worker threads can still own work objects (FSDP2's async collectives) when
            # the interpreter finalises, and destroying them then aborts the process ("terminate
            # called without an active exception"; pytorch/pytorch#179291): the step is done and
            # saved, so leave without finalising
            sys.stdout.flush()
            os._exit(0)


if __name__ == "__main__":
    main()
