"""transformers.Trainer on a model patched by ``unimm.integrations.transformers.apply()``: the loss
falls, the forward returns no logits, and no ``B x S x V`` tensor is ever allocated; gradient
checkpointing recomputes each layer through unimm's attention (the unimm mask reaches it through
keyword arguments) and gives the gradients of a plain backward.

How "never allocated" is checked: the PyTorch profiler with ``profile_memory=True`` records every
allocation the CPU allocator makes (its ``[memory]`` events, with their byte counts), wherever it
comes from: ATen ops, the inside of unimm's custom ops (``unimm::linear_cross_entropy`` and its
Triton kernels, which a ``TorchDispatchMode`` would see only as opaque calls), autograd's backward,
the checkpoint recompute and the optimizer. The sizes are chosen so that every legitimate tensor
(weights ``V x H`` with ``H < B S / 2``, MLP activations with ``I < V / 2``, attention) is smaller
than half a ``B x S x V`` tensor, so any allocation of ``B S V x 2`` bytes or more is a
(16-bit or wider) logits-sized tensor. A positive control runs the unpatched model under the same
recorder and must see one.

Tiny random Llama on the CPU; the loss runs through the Triton kernel (interpreted, as conftest
sets up without a GPU): the reference backend forms N x V logits by design.
"""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from torch.profiler import ProfilerActivity, profile  # noqa: E402

import unimm.kernels.cross_entropy as cross_entropy  # noqa: E402
from unimm.integrations import transformers as hf  # noqa: E402
from unimm.kernels import dispatch  # noqa: E402

B, S, V = 4, 32, 256
CONFIG = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, head_dim=16, max_position_embeddings=2 * S)
LOGITS_BYTES = B * S * V * 2  # a B x S x V tensor of 2-byte elements; fp32 logits are twice this


def _model(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    return transformers.LlamaForCausalLM(config)


def _examples(count: int = 16) -> list[dict]:
    """Four distinct right-padded sequences (arithmetic progressions mod V, easy to learn), repeated:
    ``input_ids``, ``attention_mask`` and ``labels`` (-100 at padding), as a tokenizer and
    collator would give them."""
    examples = []
    for i in range(count):
        kind = i % 4
        length = S - 3 * kind
        ids = torch.zeros(S, dtype=torch.long)
        ids[:length] = (7 + 31 * kind + (kind + 2) * torch.arange(length)) % V
        mask = (torch.arange(S) < length).long()
        examples.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return examples


class AllocationRecorder:
    """The byte counts of every CPU allocation made inside the ``with`` block (profiler memory events)."""

    def __enter__(self):
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc):
        self.profiler.__exit__(*exc)
        events = self.profiler.profiler.kineto_results.events()
        self.sizes = sorted((e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0), reverse=True)
        return False


class RecordingTrainer(transformers.Trainer):
    """Notes what each forward returned and the ``num_items_in_batch`` Trainer passed."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Trainer keeps only the batch columns named in ``inspect.signature(model.forward)``
        # (remove_unused_columns, on by default): the patched forward must show the model's parameters
        dropped = {"input_ids", "attention_mask", "labels"} - set(inputs)
        assert not dropped, (f"Trainer dropped {sorted(dropped)}: the patched forward's signature is "
                             f"{inspect.signature(model.forward)}, not the model's own")
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        self.seen.append((outputs.logits is None, num_items_in_batch))
        return (loss, outputs) if return_outputs else loss


def _attention_calls(model) -> list[int]:
    """A counter of the attention modules' calls (a checkpointed layer recomputes them in backward)."""
    calls = [0]
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers 5 renames gradient_checkpointing
def test_trainer_with_gradient_checkpointing_learns_without_logits(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    if dispatch.backend_unavailable("triton", cpu) is not None or dispatch.forced_backend() not in (None, "triton"):
        pytest.skip("needs the Triton loss on CPU tensors (TRITON_INTERPRET=1, set by conftest without a GPU): "
                    "the reference loss forms N x V logits by design")
    # The loss kernel's gradient workspace is N x chunk columns, at most UNIMM_CE_WORKSPACE_MB (1 GiB); at these
    # toy sizes all V columns would fit in one chunk. A 1-byte budget gives the smallest chunk (one tile of
    # columns), the regime of a real model, whose N x V is far beyond the budget.
    monkeypatch.setattr(cross_entropy, "WORKSPACE_BYTES", 1)
    # Attention on the reference (fast on the CPU; it is tested against the Triton kernels elsewhere and
    # allocates nothing V-sized); the loss on Triton, as on a GPU.
    select = dispatch.select
    monkeypatch.setattr(dispatch, "select", lambda op, device, **kw: "reference" if op == "attention"
                        else select(op, device, **kw))

    # positive control: the unpatched model's loss forms B x S x V logits, and the recorder sees them
    reference = _model()
    batch = {key: torch.stack([e[key] for e in _examples(B)]) for key in ("input_ids", "attention_mask", "labels")}
    with AllocationRecorder() as control:
        reference(**batch).loss.backward()
    assert control.sizes[0] >= B * S * V * 4

    model = hf.apply(copy.deepcopy(reference))
    calls = _attention_calls(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=B, learning_rate=1e-2,
        lr_scheduler_type="constant", weight_decay=0.0, gradient_checkpointing=True, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=_examples())
    trainer.seen = []
    with AllocationRecorder() as recorder:
        trainer.train()

    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert calls[0] == 6 * 2 * CONFIG["num_hidden_layers"]  # each layer: forward, then its recompute in backward
    assert len(trainer.seen) == 6 and all(no_logits for no_logits, _ in trainer.seen)
    assert all(items is not None for _, items in trainer.seen)  # Trainer's token count reached the loss
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and torch.isfinite(torch.tensor(losses)).all()
    assert losses[-1] < losses[0] - 0.5 and sum(losses[3:]) < sum(losses[:3]), losses  # ~5.6 -> ~4.3
    assert len(recorder.sizes) > 100  # the recorder saw the run's allocations
    assert recorder.sizes[0] < LOGITS_BYTES, f"an allocation of {recorder.sizes[0]} bytes (B x S x V = {B * S * V})"


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_matches_plain_backward(use_reentrant, monkeypatch):
    """Checkpointed layers replay their forward in backward with the keyword arguments they got,
    the unimm mask among them: same loss and gradients as without checkpointing, under a padding
    mask, and attention runs twice per layer."""
    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    plain = hf.apply(_model(1))
    checkpointed = hf.apply(copy.deepcopy(plain))
    options = {"use_reentrant": use_reentrant}
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5.24
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    plain.train()
    checkpointed.train()
    batch = {key: torch.stack([e[key] for e in _examples(B)]) for key in ("input_ids", "attention_mask", "labels")}
    counts = []
    for model in (plain, checkpointed):
        calls = _attention_calls(model)
        out = model(**batch)
        assert out.logits is None
        out.loss.backward()
        counts.append((calls[0], out.loss.detach()))
    layers = CONFIG["num_hidden_layers"]
    assert counts[0][0] == layers and counts[1][0] == 2 * layers
    torch.testing.assert_close(counts[1][1], counts[0][1], rtol=0, atol=0)
    for (name, want), got in zip(plain.named_parameters(), checkpointed.parameters()):
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7, msg=name)
