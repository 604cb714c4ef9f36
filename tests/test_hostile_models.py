"""Hostile inputs to the model layer (issue 14): ``Decoder`` / ``KVCache`` lengths and ids,
empty chunks, ``Decoder.generate`` / ``UnifiedModel.generate`` arguments, ``pack`` and the
segment classes, and the ``unimm demo`` command line.

The library's rule: nothing is read back from a device to validate it on the hot path; Python
scalars and lists, and data already on the host, are validated with errors that name the
argument. The GPU paths are exercised on the CPU by patching ``decoder._on_host`` (the one place
the decoder decides whether reading a tensor costs a device sync).
"""

import numpy as np
import pytest
import torch

import unimm.demo.train as demo_train
import unimm.models.decoder as decoder_module
from unimm.cli import main
from unimm.models import (
    ContinuousImage,
    Decoder,
    DecoderConfig,
    DiscreteImage,
    HybridImage,
    ImageFormat,
    Text,
    UnifiedModel,
    VocabLayout,
    pack,
)
from unimm.models.kv_cache import KVCache

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VOCAB = 50
MAX_LEN = 8
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


pytestmark = pytest.mark.usefixtures("reference_backend")  # these tests are about the model layer, not the kernels


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    torch.manual_seed(0)
    config = DecoderConfig(family="llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=2, num_kv_heads=1, head_dim=16)
    return Decoder(config).eval()


@pytest.fixture
def on_device(monkeypatch):
    """The decoder's GPU code paths: no tensor is readable without a device sync."""
    monkeypatch.setattr(decoder_module, "_on_host", lambda tensor: False)


def ids_of(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def prefilled(decoder: Decoder, ids: torch.Tensor, prompt: int) -> KVCache:
    cache = KVCache(decoder.config, ids.shape[0], MAX_LEN, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        decoder(ids[:, :prompt], cache=cache)
    cache.lens = [prompt] * ids.shape[0]
    return cache


# ---- KVCache lengths ---------------------------------------------------------------------------

def test_cache_lens_assignment_is_checked_and_keeps_the_buffer(decoder):
    cache = KVCache(decoder.config, 2, MAX_LEN, device="cpu", dtype=torch.float32)
    buffer = cache.lens
    cache.lens = [3, 5]
    assert cache.lens is buffer and cache.lens.tolist() == [3, 5] and cache.lens.dtype == torch.int32
    cache.lens = torch.tensor([MAX_LEN, 0])  # a full row is a valid state
    cache.lens = 2  # every row
    assert cache.lens.tolist() == [2, 2] and cache.lens is buffer
    cache.lens += 1  # in place: unchecked, no read back
    assert cache.lens.tolist() == [3, 3] and cache.lens is buffer
    with pytest.raises(ValueError, match=r"cache.lens must be in \[0, 8\] .*capacity.* row 0 has -1"):
        cache.lens = [-1, 0]
    with pytest.raises(ValueError, match=r"row 1 has 9"):
        cache.lens = torch.tensor([0, MAX_LEN + 1])
    with pytest.raises(ValueError, match="row 0 has 18446744073709551616"):
        cache.lens = [2**64, 0]
    with pytest.raises(TypeError, match="cache lengths must be integers, got a torch.float32 tensor"):
        cache.lens = torch.tensor([1.0, 2.0])
    with pytest.raises(TypeError, match="list of ints"):
        cache.lens = [1.5, 2]
    with pytest.raises(TypeError, match="list of ints"):
        cache.lens = [True, 2]
    with pytest.raises(ValueError, match=r"one per row, \[2\]"):
        cache.lens = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"one per row \(2\)"):
        cache.set_lens([1])
    assert cache.lens.tolist() == [3, 3]  # nothing changed by the failed assignments
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got True"):
        KVCache(decoder.config, True, MAX_LEN, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("seq", [1, 3])
def test_negative_lens_never_write_into_other_slots(decoder, seq):
    """A negative length made prefill and decode write at lens % max_len (the cache's last rows)."""
    ids = ids_of(2, 5)
    cache = prefilled(decoder, ids, 4)
    cache.lens.copy_(torch.tensor([-2, 4]))
    before = [k.clone() for k in cache.k]
    with torch.no_grad(), pytest.raises(ValueError, match=r"cache.lens must be in \[0, 8\] .* row 0 has -2"):
        decoder(ids[:, :seq], cache=cache)
    assert all(torch.equal(k, b) for k, b in zip(cache.k, before))


def test_decode_past_the_capacity_names_it(decoder):
    ids = ids_of(2, 5)
    cache = prefilled(decoder, ids, 4)
    cache.lens.fill_(MAX_LEN)
    with torch.no_grad(), pytest.raises(ValueError, match=r"row 0 holds 8 tokens, \+ 1 new > the cache's capacity "
                                                          r"max_len=8"):
        decoder(ids[:, :1], cache=cache)
    cache.lens.copy_(torch.tensor([3, MAX_LEN - 1]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"row 1 holds 7 tokens, \+ 2 new > .*max_len=8"):
        decoder(ids[:, :2], cache=cache)


_PREFILLED = {}


def prefilled_twice(decoder: Decoder, ids: torch.Tensor) -> tuple[KVCache, KVCache]:
    """Two copies of a cache prefilled with ``ids[:, :5]`` (the prefill runs once per module)."""
    if "cache" not in _PREFILLED:
        _PREFILLED["cache"] = prefilled(decoder, ids, 5)
    copies = []
    for _ in range(2):
        cache = KVCache(decoder.config, ids.shape[0], MAX_LEN, device="cpu", dtype=torch.float32)
        for mine, theirs in zip(cache.k + cache.v, _PREFILLED["cache"].k + _PREFILLED["cache"].v):
            mine.copy_(theirs)
        copies.append(cache)
    return tuple(copies)


@settings(max_examples=15, deadline=None)
@given(lens=st.lists(st.integers(-3, MAX_LEN + 2), min_size=3, max_size=3))
def test_device_decode_step_writes_only_inside_valid_rows(decoder, lens):
    """Without a host read, a row whose length is outside [0, max_len) writes nothing and comes
    out NaN; the other rows write and return exactly what the host-checked step does."""
    ids = ids_of(3, 6, seed=1)
    cache, host = prefilled_twice(decoder, ids)
    valid = [0 <= n < MAX_LEN for n in lens]
    cache.lens.copy_(torch.tensor(lens))
    host.lens.copy_(torch.tensor([n if ok else 0 for n, ok in zip(lens, valid)]))
    before = [t.clone() for t in cache.k + cache.v]
    with torch.no_grad():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(decoder_module, "_on_host", lambda tensor: False)
            out = decoder(ids[:, 5:6], cache=cache)
        expected = decoder(ids[:, 5:6], cache=host)
    assert torch.isnan(out).any(-1)[:, 0].tolist() == [not ok for ok in valid]
    for b, ok in enumerate(valid):
        for after, old, checked in zip(cache.k + cache.v, before, host.k + host.v):
            assert torch.equal(after[b], checked[b] if ok else old[b])
        if ok:
            assert torch.equal(out[b], expected[b])


# ---- empty chunks and ids --------------------------------------------------------------------------

def test_empty_sequence_gives_empty_hidden_states(decoder):
    ids = ids_of(2, 5)
    with torch.no_grad():
        assert decoder(ids[:, :0]).shape == (2, 0, 32)
        assert decoder(ids[:0]).shape == (0, 5, 32)
        assert decoder(inputs_embeds=torch.zeros(2, 0, 32)).shape == (2, 0, 32)
        cache = prefilled(decoder, ids, 3)
        before = [k.clone() for k in cache.k]
        assert decoder(ids[:, :0], cache=cache).shape == (2, 0, 32)
    assert all(torch.equal(k, b) for k, b in zip(cache.k, before)) and cache.lens.tolist() == [3, 3]
    with pytest.raises(ValueError, match="cache must hold"):  # the arguments are still checked
        decoder(ids[:1, :0], cache=cache)
    with pytest.raises(TypeError, match="positions must be an integer tensor"):
        decoder(ids[:, :0], positions=torch.zeros(2, 0))


@pytest.mark.parametrize("bad", [VOCAB, -1])
def test_out_of_vocabulary_ids_on_the_host_name_input_ids(decoder, bad):
    ids = ids_of(2, 5)
    ids[1, 2] = bad
    match = rf"input_ids must be in \[0, {VOCAB}\) \(the vocabulary size is {VOCAB}\)"
    with torch.no_grad():
        with pytest.raises(ValueError, match=match):
            decoder(ids)
        cache = prefilled(decoder, ids_of(2, 5), 3)
        with pytest.raises(ValueError, match=match):  # a decode step too (was: IndexError from the embedding)
            decoder(ids[:, 2:3], cache=cache)


@pytest.mark.parametrize("bad", [VOCAB + 7, -3])
def test_out_of_vocabulary_ids_on_a_device_embed_as_nan(decoder, on_device, bad):
    """No read back on a GPU: the bad token embeds as NaN, which reaches what depends on it (its
    own position and the later ones of its row; earlier positions are the attention kernels'
    business) and leaves the other rows exactly as they are."""
    ids = ids_of(3, 5)
    hostile = ids.clone()
    hostile[1, 2] = bad
    with torch.no_grad():
        hidden = decoder(hostile)
        clean = decoder(ids)
    assert torch.isnan(hidden[1, 2:]).all()
    assert torch.equal(hidden[[0, 2]], clean[[0, 2]])


# ---- Decoder.generate / UnifiedModel.generate arguments --------------------------------------------

def test_generate_checks_prompt_ids_once(decoder):
    ids = ids_of(2, 4)
    with pytest.raises(ValueError, match=rf"input_ids must be in \[0, {VOCAB}\) .* at prompt positions"):
        decoder.generate(torch.tensor([[VOCAB], [3]]), 2)  # one-token prompts (was: IndexError)
    padded = ids.clone()
    padded[0, 2:] = -100  # padding past prompt_lens may hold anything
    out = decoder.generate(padded, 2, prompt_lens=[2, 4])
    assert out.shape == (2, 6) and (out >= 0).all()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(prompt_lens=[2.0, 4.0]), TypeError, "prompt_lens must be a list of ints"),
    (dict(prompt_lens=[True, True]), TypeError, "prompt_lens must be a list of ints"),
    (dict(prompt_lens=torch.tensor([True, True])), TypeError, "prompt_lens must be integer lengths"),
    (dict(prompt_lens=[2**70, 1]), ValueError, r"prompt lengths must be in \[1, 4\].*1180591620717411303424"),
    (dict(attention_mask=torch.tensor([[1, 0.5, 0, 0], [1, 1, 1, 1]])), ValueError, "only 0 and 1"),
    (dict(cuda_graphs="yes"), TypeError, "cuda_graphs must be True or False"),
])
def test_generate_argument_checks(decoder, kwargs, error, match):
    with pytest.raises(error, match=match):
        decoder.generate(ids_of(2, 4), 2, **kwargs)


@pytest.fixture(scope="module")
def unified(decoder) -> UnifiedModel:
    torch.manual_seed(1)
    return UnifiedModel.from_decoder(decoder, special_tokens=("boi", "eoi"), feature_dims={"image": 3})


@pytest.mark.parametrize("prompts, kwargs, error, match", [
    ([[Text([1.7, 2.2])]], {}, TypeError, r"prompts\[0\]: document 0, segment 0: Text.ids\[0\] must be an int"),
    ([[Text([1]), Text(["a"])]], {}, TypeError, r"prompts\[0\]: .*segment 1: Text.ids\[0\] .* 'a' \(str\)"),
    (["abc"], {}, ValueError, r"prompts\[0\] must be a list of segments, got str"),
    ([[Text([1])]], dict(start_image=1), TypeError, "start_image must be True or False"),
])
def test_unified_generate_argument_checks(unified, prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        unified.generate(prompts, max_new_tokens=1, **kwargs)


# ---- pack and the segment classes ------------------------------------------------------------------

LAYOUT = VocabLayout(40, ("boi", "eoi", "sep"), 16)
TEXT_IDS = st.integers(0, LAYOUT.image_codes[0] - 1)


@pytest.mark.parametrize("segment, match", [
    (Text([1.7, 2.2]), r"Text.ids\[0\] must be an int token id, got 1.7 \(float\)"),
    (Text([3, 2.0]), r"Text.ids\[1\] must be an int token id, got 2.0 \(float\)"),
    (Text([True, False]), r"Text.ids\[0\] must be an int token id, got True \(bool\)"),
    (Text([1, "a"]), r"Text.ids\[1\] must be an int token id, got 'a' \(str\)"),
    (Text([[1, 2]]), r"Text.ids\[0\] must be an int token id, got \[1, 2\] \(list\)"),
    (Text([1, None]), r"Text.ids\[1\] .* None \(NoneType\)"),
    (Text("hello"), "Text.ids must be a list of int token ids or an integer tensor, got str"),
    (Text(7), "Text.ids must be a list of int token ids or an integer tensor, got int"),
    (Text(torch.tensor([1.0, 2.0])), "Text.ids must hold integer token ids, got a torch.float32 tensor"),
    (Text(torch.tensor([True])), "Text.ids must hold integer token ids, got a torch.bool tensor"),
    (Text(np.array([1.5, 2.5])), "Text.ids must hold integer token ids, got a torch.float64 tensor"),
    (Text([1], loss="yes"), "Text.loss must be True or False, got 'yes'"),
    (Text([1], loss=False, bidirectional=1), "Text.bidirectional must be True or False, got 1"),
    (ContinuousImage(torch.randn(4, 3), shape=(2, 2), order=[0, 1.5, 2, 3]),
     r"ContinuousImage.order\[1\] must be an int index, got 1.5"),
    (ContinuousImage(torch.randn(4, 3), encoder=5), "ContinuousImage.encoder must be .* got 5"),
    (DiscreteImage(torch.zeros(2, 2, dtype=torch.long), format="emu3"), "DiscreteImage.format must be an ImageFormat"),
    (HybridImage(torch.zeros(2, 2, dtype=torch.long), torch.randn(2, 3), loss=None), "HybridImage.loss must be"),
    (DiscreteImage(torch.zeros(1, 2, dtype=torch.long), format=ImageFormat(size=lambda h, w: [1, 2.5])),
     r"ImageFormat.size\(1, 2\)\[1\] must be an int token id, got 2.5"),
])
def test_pack_type_errors_name_the_segment_and_entry(segment, match):
    with pytest.raises(TypeError, match="document 0, segment 1: " + match):
        pack([[Text([1, 2]), segment]], 16, vocab=LAYOUT)


@pytest.mark.parametrize("segment, match", [
    (Text([1], weight=True), "Text.weight must be a positive finite number, got True"),
    (Text([2**64]), r"Text.ids\[0\] = 18446744073709551616 is not a token id"),
    (ContinuousImage(torch.randn(4, 3), shape=5),
     r"ContinuousImage.shape must be \(h, w\) with h \* w = 4 features, got 5"),
    (ContinuousImage(torch.randn(4, 3), shape=(True, 4)), r"ContinuousImage.shape must be \(h, w\)"),
    (ContinuousImage(torch.randn(4, 0)), r"ContinuousImage.features must be \[L, F\] with L, F >= 1"),
])
def test_pack_value_errors(segment, match):
    with pytest.raises(ValueError, match="document 0, segment 1: " + match):
        pack([[Text([1, 2]), segment]], 16, vocab=LAYOUT)


def test_pack_rejects_what_is_not_a_segment():
    with pytest.raises(TypeError, match="document 1, segment 0: segments must be Text"):
        pack([[Text([1])], [{"ids": [1]}]], 16, vocab=LAYOUT)
    with pytest.raises(ValueError, match="document 0: each document must be a list of segments, got str"):
        pack(["abc"], 16, vocab=LAYOUT)


@SETTINGS
@given(docs=st.lists(st.lists(TEXT_IDS, min_size=1, max_size=10), min_size=1, max_size=4),
       form=st.sampled_from(["list", "tuple", "tensor", "int32", "numpy"]), data=st.data())
def test_pack_round_trips_any_int_ids_and_names_a_bad_entry(docs, form, data):
    convert = {"list": list, "tuple": tuple, "tensor": torch.tensor,
               "int32": lambda ids: torch.tensor(ids, dtype=torch.int32),
               "numpy": lambda ids: np.array(ids, dtype=np.int16)}[form]
    batch = pack([[Text(convert(ids))] for ids in docs], 12, vocab=LAYOUT)
    for ids, (row, start, length) in zip(docs, batch.placements):
        assert length == len(ids) and batch.input_ids[row, start:start + length].tolist() == ids
    # one non-integer entry anywhere: a TypeError naming its document and index, never a rounding
    doc = data.draw(st.integers(0, len(docs) - 1))
    index = data.draw(st.integers(0, len(docs[doc]) - 1))
    bad = data.draw(st.sampled_from([0.5, float(docs[doc][index]), True, "1", None, float("nan")]))
    hostile = [list(ids) for ids in docs]
    hostile[doc][index] = bad
    with pytest.raises(TypeError, match=rf"document {doc}, segment 0: Text.ids\[{index}\] must be an int token id"):
        pack([[Text(ids)] for ids in hostile], 12, vocab=LAYOUT)


def test_nan_features_pass_through_pack_and_stay_in_their_positions(unified):
    """Feature values are data: pack neither reads nor rejects them; a NaN reaches exactly its
    own token's input embedding (the attention kernels then carry it to what attends to it)."""
    features = torch.randn(2, 3)
    features[1, 0] = float("nan")
    batch = pack([[Text([1, 2]), ContinuousImage(features), Text([3])], [Text([4, 5, 6])]], 16, vocab=unified.vocab)
    assert torch.isnan(batch.input_features["image"].values[1]).any()
    embeds = unified.embed(batch.input_ids, features=batch.input_features)
    nan_positions = torch.isnan(embeds).any(-1).nonzero()[:, 1].tolist()
    assert nan_positions == [int(batch.input_features["image"].positions[1])]


# ---- the demo command line -------------------------------------------------------------------------

@pytest.fixture
def no_run(monkeypatch):
    """Fails the test if a demo run would start; records the arguments it would get."""
    calls = []

    def fake_run(config, out, *, device=None, seed=0):
        calls.append((config, out, device, seed))
        return {}

    monkeypatch.setattr(demo_train, "run", fake_run)
    monkeypatch.setattr(demo_train, "prepare", lambda *a, **k: pytest.fail("a demo run started"))
    return calls


def demo_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: unimm demo") and lines[-1].startswith("unimm demo: error: ")
    return lines[-1]


def test_demo_rejects_unwritable_outputs(tmp_path, capsys, no_run):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert "--out: cannot create or write the output directory /proc/unimm-demo" in \
        demo_error(capsys, "--out", "/proc/unimm-demo")
    assert f"--out: cannot create or write the output directory {a_file}/out: Not a directory" in \
        demo_error(capsys, "--out", str(a_file / "out"))
    assert f"--out: {a_file} exists and is not a directory" in demo_error(capsys, "--out", str(a_file))
    assert "--out: the output directory must be a non-empty path" in demo_error(capsys, "--out", "")
    assert not no_run


def test_demo_rejects_unusable_devices(tmp_path, capsys, no_run):
    out = str(tmp_path / "out")
    assert "--device: 'bogus' is not a torch device (try cpu, cuda or cuda:N)" in \
        demo_error(capsys, "--device", "bogus", "--out", out)
    assert "--device: meta tensors hold no data" in demo_error(capsys, "--device", "meta", "--out", out)
    if not torch.cuda.is_available():
        assert "--device: cuda asked for, but CUDA is not available here" in \
            demo_error(capsys, "--device", "cuda", "--out", out)
    else:
        count = torch.cuda.device_count()
        assert f"this machine has {count} CUDA device(s)" in demo_error(capsys, "--device", f"cuda:{count}", "--out",
                                                                         out)
    assert "--seed must be in [0, " in demo_error(capsys, "--seed", str(2**64), "--out", out)
    assert not no_run and not (tmp_path / "out").exists()  # the device is checked before out is created


def test_demo_reaches_run_with_checked_arguments(tmp_path, no_run):
    out = tmp_path / "new" / "dir"
    assert main(["demo", "--config", "smoke", "--device", "cpu", "--out", str(out), "--seed", "3"]) == 0
    [(config, given_out, device, seed)] = no_run
    assert config.steps == 30 and device == torch.device("cpu") and seed == 3
    assert given_out == out and out.is_dir()


def test_demo_run_checks_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_train, "prepare", lambda *a, **k: pytest.fail("work started"))
    config = demo_train.PRESETS["smoke"]
    with pytest.raises(ValueError, match="cannot create or write the output directory /proc/x"):
        demo_train.run(config, "/proc/x", device="cpu")
    with pytest.raises(ValueError, match="'bogus' is not a torch device"):
        demo_train.run(config, tmp_path, device="bogus")
    with pytest.raises(ValueError, match="seed must be an int"):
        demo_train.run(config, tmp_path, device="cpu", seed=-1)
