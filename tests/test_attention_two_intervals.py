"""Two key intervals per row: the builders against dense definitions written element by element,
``from_intervals`` / ``from_dense`` / the derived masks on [B, S, 2] bounds, and ``attention`` on
them (forward and dq / dk / dv, every backend) against a dense softmax in fp64, non-finite keys
inside and outside the intervals included."""

import importlib

import pytest
import torch

from unimm.kernels import AttentionMask, attention
from unimm.kernels.reference import attention as reference
from unimm.testing import DEVICE, TOLERANCE, available_backends, rel_err, seeded

attention_module = importlib.import_module("unimm.kernels.attention")  # the package exports the function by this name

# ---- fixtures: dense definitions, one (query, key) pair at a time ---------------------------


def dense_sinks(seq_len, sinks, window, past_len=0):
    """Row i, at position p = past_len + i, sees key j <= p iff j < sinks or j > p - window."""
    keys = past_len + seq_len
    out = torch.zeros(seq_len, keys, dtype=torch.bool)
    for i in range(seq_len):
        p = past_len + i
        for j in range(p + 1):
            out[i, j] = j < sinks or j > p - window
    return out


def dense_shared_prompt(prompt, completions, seq_len):
    """Prompt rows causal; a completion's rows see the prompt and their own completion up to
    themselves; padding sees nothing."""
    segment = [0] * prompt
    for c, length in enumerate(completions):
        segment += [c + 1] * length
    segment += [-1] * (seq_len - len(segment))
    out = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(i + 1):
            out[i, j] = segment[i] >= 0 and (segment[j] == 0 or segment[j] == segment[i])
    return out


def dense_image_blocks(ids):
    """Text sees every key up to itself; an image token sees its own block and the image tokens
    of every earlier block."""
    ids = ids.tolist()
    seq_len = len(ids)
    block_start = [0] * seq_len
    for i in range(1, seq_len):
        block_start[i] = block_start[i - 1] if ids[i] == ids[i - 1] else i
    out = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for i in range(seq_len):
        for j in range(seq_len):
            if ids[i] == 0:
                out[i, j] = j <= i
            else:
                out[i, j] = ids[j] > 0 and (ids[j] == ids[i] or j < block_start[i])
    return out


def dense_attention(q, k, v, visible, scale=None, softcap=None):
    """Softmax attention under a dense bool mask [B, S, Skv] in the inputs' dtype; rows that see
    nothing are 0."""
    group = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kt, vt = (t.repeat_interleave(group, 1) for t in (kt, vt))
    s = qt @ kt.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    mask = visible[:, None].to(q.device)
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~mask.any(-1, keepdim=True), 0.0)
    p = torch.softmax(s, -1) * mask.any(-1, keepdim=True)
    return (p @ vt).transpose(1, 2)


def qkv(batch, seq_len, num_keys, q_heads, kv_heads, head_dim, seed, dtype=torch.float32):
    gen = seeded(seed)
    make = lambda s, h: torch.randn(batch, s, h, head_dim, generator=gen).to(DEVICE, dtype)
    return make(seq_len, q_heads), make(num_keys, kv_heads), make(num_keys, kv_heads)


def run(q, k, v, mask, upstream_seed=3, **options):
    """attention's output and (dq, dk, dv) for a fixed random upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, mask, **options)
    upstream = torch.randn(out.shape, generator=seeded(upstream_seed)).to(out.device, out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def check_dense(q, k, v, mask, visible, **options):
    """attention under ``mask`` equals a dense fp64 softmax under ``visible``, forward and grads."""
    tol = TOLERANCE[q.dtype]
    out, grads = run(q, k, v, mask, **options)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = dense_attention(*leaves, visible, **options)
    (want * torch.randn(want.shape, generator=seeded(3)).to(want.device, q.dtype).double()).sum().backward()
    assert out.dtype == q.dtype and rel_err(out, want) <= tol, rel_err(out, want)
    for name, mine, theirs in zip("qkv", grads, leaves):
        assert torch.isfinite(mine).all(), name
        assert rel_err(mine, theirs.grad) <= tol, (name, rel_err(mine, theirs.grad))
    return out, grads


def random_pairs(batch, seq_len, num_keys, seed):
    """Random [B, S, 2] bounds: two disjoint intervals per row in random order, the second empty
    (start >= end, also past the keys) for about a third of the rows, some rows empty."""
    gen = seeded(seed)
    cuts = torch.randint(0, num_keys + 1, (batch, seq_len, 4), generator=gen).sort(-1).values
    start, end = cuts[..., 0::2].clone(), cuts[..., 1::2].clone()
    swap = torch.rand(batch, seq_len, generator=gen) < 0.5
    start[swap], end[swap] = start[swap].flip(-1), end[swap].flip(-1)
    empty = torch.rand(batch, seq_len, generator=gen) < 0.35
    start[..., 1][empty], end[..., 1][empty] = num_keys + 3, 2
    return start.to(DEVICE), end.to(DEVICE)


# ---- masks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sinks, window, past_len", [(3, 5, 0), (1, 1, 4), (0, 4, 2), (4, 40, 0), (2, 6, 9)])
def test_sinks_and_window(sinks, window, past_len):
    mask = AttentionMask.sinks_and_window(2, 23, sinks=sinks, window=window, past_len=past_len, device=DEVICE)
    want = dense_sinks(23, sinks, window, past_len)
    assert mask.shape == (2, 23) and mask.num_keys == past_len + 23
    assert torch.equal(mask.to_dense(past_len + 23).cpu(), want.expand(2, -1, -1))
    assert mask.visible_pairs() == 2 * int(want.sum())
    one = sinks == 0 or past_len + 23 <= sinks + window
    assert (mask.kv_start2 is None) == one and mask.layout == ("causal" if one and sinks and not past_len else None)


def test_shared_prompt():
    prompts = torch.tensor([5, 0, 7], device=DEVICE)
    completions = torch.tensor([[4, 0, 6], [3, 8, 1], [2, 2, 2]], device=DEVICE)
    mask = AttentionMask.shared_prompt(prompts, completions, 21)
    assert mask.kv_start2 is not None and mask.layout is None
    for b in range(3):
        want = dense_shared_prompt(int(prompts[b]), completions[b].tolist(), 21)
        assert torch.equal(mask.to_dense(21)[b].cpu(), want)


def image_layouts():
    return {
        "two runs": [0, 1, 1, 2, 0, 0, 3, 3, 3, 0, 0, 0, 4, 4, 5][:12] + [0, 0, 0],
        "adjacent blocks": [0, 0, 1, 1, 1, 2, 2, 3, 0, 0, 0, 0, 0, 0, 0],
        "images first": [1, 1, 1, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0],
        "text only": [0] * 15,
    }


@pytest.mark.parametrize("name", list(image_layouts()))
def test_image_blocks(name):
    ids = torch.tensor([image_layouts()[name]], device=DEVICE)
    mask = AttentionMask.image_blocks(ids)
    assert torch.equal(mask.to_dense(15)[0].cpu(), dense_image_blocks(ids[0].cpu()))
    assert (mask.kv_start2 is None) == (name in ("adjacent blocks", "text only"))


@pytest.mark.parametrize("call, error, match", [
    (lambda: AttentionMask.sinks_and_window(1, 4, sinks=-1, window=2), ValueError, "sinks must be an int >= 0"),
    (lambda: AttentionMask.sinks_and_window(1, 4, sinks=1, window=0), ValueError, "window must be an int >= 1"),
    (lambda: AttentionMask.sinks_and_window(1, 4, sinks=1.0, window=2), TypeError, "sinks must be an int"),
    (lambda: AttentionMask.shared_prompt(torch.tensor([2.0]), torch.tensor([[1]]), 4), TypeError, "prompt_lens"),
    (lambda: AttentionMask.shared_prompt(torch.tensor([2]), torch.tensor([1]), 4), ValueError,
     "completion_lens must have 2 dims"),
    (lambda: AttentionMask.shared_prompt(torch.tensor([2]), torch.tensor([[2, 1]]), 4), ValueError,
     "row 0: .* fit in seq_len = 4"),
    (lambda: AttentionMask.shared_prompt(torch.tensor([2]), torch.tensor([[-1, 1]]), 4), ValueError, ">= 0"),
    (lambda: AttentionMask.shared_prompt(torch.tensor([2, 1]), torch.tensor([[1]]), 4), ValueError,
     "completion_lens must be"),
    (lambda: AttentionMask.image_blocks(torch.tensor([[1, 0, 2, 0, 3, 3]])), ValueError,
     "image_ids row 0: .*three key intervals"),
    (lambda: AttentionMask.image_blocks(torch.tensor([[1, 1, 0, 1]])), ValueError, "image_ids row 0: .*contiguous"),
    (lambda: AttentionMask.image_blocks(torch.tensor([[0, -1]])), ValueError, "image_ids row 0: ids must be >= 0"),
    (lambda: AttentionMask.from_intervals(torch.tensor([[[0, 2]]]), torch.tensor([[[3, 4]]])), ValueError,
     "row 0: the two intervals overlap"),
    (lambda: AttentionMask.from_intervals(torch.tensor([[[0, -2]]]), torch.tensor([[[1, 4]]])), ValueError,
     "non-empty second interval"),
    (lambda: AttentionMask.from_intervals(torch.tensor([[[2, 0]]]), torch.tensor([[[1, 0]]])), ValueError,
     "first interval needs"),
    (lambda: AttentionMask.from_intervals(torch.zeros(1, 2, 3, dtype=torch.int32),
                                          torch.ones(1, 2, 3, dtype=torch.int32)), ValueError, r"\[B, S, 2\]"),
    (lambda: AttentionMask(torch.zeros(1, 2, 2, dtype=torch.int32), torch.ones(1, 2, 2, dtype=torch.int32), 2,
                           layout="causal"), ValueError, "layout must be None"),
])
def test_arguments_are_validated(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_from_intervals_and_hand_built_pairs():
    start, end = random_pairs(3, 17, 20, seed=0)
    mask = AttentionMask.from_intervals(start, end)
    keys = torch.arange(20, device=DEVICE)
    want = ((keys >= start[..., :1]) & (keys < end[..., :1])) | ((keys >= start[..., 1:]) & (keys < end[..., 1:]))
    assert torch.equal(mask.to_dense(20), want) and mask.num_keys == int(end.amax())
    assert mask.visible_pairs() == int(want.sum())
    # normal form: a lone interval first, the earlier one first
    assert ((mask.kv_end2 <= mask.kv_start2) | ((mask.kv_end > mask.kv_start) & (mask.kv_end <= mask.kv_start2))).all()
    # all second intervals empty: one interval, as from [B, S] bounds
    one = AttentionMask.from_intervals(start.clone().index_fill_(-1, torch.tensor([1], device=DEVICE), 5),
                                       end.clone().index_fill_(-1, torch.tensor([1], device=DEVICE), 5))
    assert one.kv_start2 is None and one.parts() == (one,)
    # hand-built overlapping intervals are merged, out-of-range ones clamped where they meet keys
    rows = torch.arange(9, device=DEVICE).expand(2, 9)
    hand = AttentionMask(torch.stack([rows - 3, rows - 20], -1), torch.stack([rows + 1, rows - 1], -1), 9)
    assert torch.equal(hand.to_dense(9), AttentionMask((rows - 20).clamp_min(0), rows + 1, 9).to_dense(9))
    assert torch.equal(hand.kv_end2, hand.kv_start2)


def test_from_dense_round_trip():
    start, end = random_pairs(2, 13, 16, seed=1)
    mask = AttentionMask.from_intervals(start, end)
    dense = mask.to_dense(16)
    for given in (dense[:, None], torch.where(dense[:, None], 0.0, float("-inf"))):
        back = AttentionMask.from_dense(given, 13, past_len=3)
        assert back.kv_start2 is not None and torch.equal(back.to_dense(16), dense)
    one = AttentionMask.causal(2, 13, past_len=3, device=DEVICE).to_dense(16)
    assert AttentionMask.from_dense(one[:, None], 13, 3).kv_start2 is None
    three = dense.clone()
    three[0, 4] = torch.tensor([1, 0, 1, 0, 1] + [0] * 11, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask .* batch row 0: .*one or two contiguous runs"):
        AttentionMask.from_dense(three[:, None], 13, 3)


def test_derived_masks_keep_both_intervals():
    start, end = random_pairs(2, 11, 14, seed=2)
    mask = AttentionMask.from_intervals(start, end)
    dense = mask.to_dense(14).cpu()
    keys = torch.arange(40)
    past = torch.tensor([5, 0])
    continued = mask.continued(past.to(DEVICE), 40).to_dense(40).cpu()
    for b in range(2):
        shifted = torch.zeros(11, 40, dtype=torch.bool)
        shifted[:, past[b]:past[b] + 14] = dense[b]
        starts_chunk = dense[b, :, 0]  # an interval at the chunk's first key also sees the cache
        shifted[:, :past[b]] = starts_chunk[:, None]
        assert torch.equal(continued[b], shifted)
    positions = torch.arange(3, 14).expand(2, 11)
    windowed = mask.windowed(4, positions.to(DEVICE)).to_dense(14).cpu()
    assert torch.equal(windowed, dense & (keys[:14] > positions[..., None] - 4))
    dropped = mask.dropping(3).to_dense(11).cpu()
    assert torch.equal(dropped, dense[..., 3:])
    padding = torch.tensor([[0, 0] + [1] * 12, [1] * 10 + [0] * 4], device=DEVICE)
    kept = mask.within_padding(padding).to_dense(14).cpu()
    assert torch.equal(kept, dense & padding.bool().cpu()[:, None])
    moved = mask.to("cpu")
    assert moved.kv_start2 is not None and torch.equal(moved.to_dense(14), dense)


def test_tile_bounds_cover_both_intervals():
    start, end = random_pairs(2, 37, 29, seed=3)
    mask = AttentionMask.from_intervals(start, end)
    first, last = mask.tile_bounds(8, 4, 29)
    dense = mask.to_dense(29).cpu()
    for b in range(2):
        for tile in range(first.shape[1]):
            rows = dense[b, :, tile * 4:(tile + 1) * 4].any(-1).nonzero().flatten()
            if rows.numel():
                assert first[b, tile] <= rows.min() // 8 and last[b, tile] > rows.max() // 8
    # exactly the query tiles either interval's hull touches: the union of the parts' ranges
    parts = [part.tile_bounds(8, 4, 29) for part in mask.parts()]
    touched = [(f < g) for f, g in parts]
    big = torch.iinfo(torch.int32).max
    want_first = torch.minimum(*(torch.where(t, f, big) for t, (f, _) in zip(touched, parts)))
    want_last = torch.maximum(*(torch.where(t, g, 0) for t, (_, g) in zip(touched, parts)))
    any_touch = touched[0] | touched[1]
    assert torch.equal(first[any_touch], want_first[any_touch]) and torch.equal(last[any_touch], want_last[any_touch])
    assert (first[~any_touch] == last[~any_touch]).all()


def test_flex_mask_mod_equals_to_dense():
    flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")
    mask = AttentionMask.sinks_and_window(2, 19, sinks=2, window=5, device=DEVICE)
    dense = mask.to_dense(19)
    assert torch.equal(flex.create_mask(mask.mask_mod(), 2, None, 19, 19, device=DEVICE)[:, 0], dense)
    padded = torch.nn.functional.pad(dense, (0, 5, 0, 5)).reshape(2, 3, 8, 3, 8).any(-1).any(2)
    assert torch.equal(mask.to_flex_block_mask(block_size=8).to_dense()[:, 0].bool(), padded)


# ---- attention ------------------------------------------------------------------------------

def builder_cases():
    ids = torch.tensor([image_layouts()["two runs"]], device=DEVICE).expand(2, -1)
    return {
        "sinks": (AttentionMask.sinks_and_window(2, 15, sinks=2, window=4, device=DEVICE),
                  dense_sinks(15, 2, 4).expand(2, -1, -1)),
        "shared prompt": (AttentionMask.shared_prompt(torch.tensor([4, 0], device=DEVICE),
                                                      torch.tensor([[5, 3], [6, 7]], device=DEVICE), 15),
                          torch.stack([dense_shared_prompt(4, [5, 3], 15), dense_shared_prompt(0, [6, 7], 15)])),
        "image blocks": (AttentionMask.image_blocks(ids), dense_image_blocks(ids[0].cpu()).expand(2, -1, -1)),
    }


@pytest.mark.parametrize("name", list(builder_cases()))
def test_builders_attention(backend, name):
    mask, visible = builder_cases()[name]
    assert mask.kv_start2 is not None
    check_dense(*qkv(2, 15, 15, 4, 2, 16, seed=5), mask, visible.to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_pairs_gqa_softcap(backend, dtype):
    start, end = random_pairs(2, 13, 15, seed=4)
    mask = AttentionMask.from_intervals(start, end)
    out, _ = check_dense(*qkv(2, 13, 17, 4, 2, 24, seed=6, dtype=dtype), mask, mask.to_dense(17), softcap=3.0,
                         scale=0.4)
    assert (out[~mask.to_dense(17).any(-1)] == 0).all()


def test_non_finite_keys_outside_both_intervals_change_nothing(backend):
    # 16 queries after 5 cached keys: keys 2 and 3 lie between every row's sinks and window
    mask = AttentionMask.sinks_and_window(2, 16, sinks=2, window=2, past_len=5, device=DEVICE)
    q, k, v = qkv(2, 16, 26, 2, 1, 16, seed=7)
    out, grads = run(q, k, v, mask)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, 21:] = float("nan")  # an unused cache tail
    dirty_v[:, 21:] = float("inf")
    dirty_k[0, 3], dirty_v[1, 2] = float("nan"), float("-inf")
    hidden = ~mask.to_dense(26).any(1)  # keys no row sees
    assert hidden[0, 3] and hidden[1, 2] and hidden[:, 21:].all()
    out2, grads2 = run(q, dirty_k, dirty_v, mask)
    assert torch.equal(out2, out) and torch.equal(grads2[0], grads[0])
    for clean, dirty in zip(grads[1:], grads2[1:]):
        assert torch.equal(dirty, clean)


def poison_cases():
    return {  # (mask, a key inside the second interval of some rows, a key of the first interval they see)
        "sinks": (AttentionMask.sinks_and_window(1, 17, sinks=2, window=3, device=DEVICE), 9, 0),
        "shared prompt": (AttentionMask.shared_prompt(torch.tensor([4], device=DEVICE),
                                                      torch.tensor([[5, 6, 2]], device=DEVICE), 17), 11, 2),
    }


@pytest.mark.parametrize("case", list(poison_cases()))
@pytest.mark.parametrize("where", ["k", "v", "q"])
def test_non_finite_inside_an_interval_poisons_what_the_reference_does(backend, where, case):
    """A non-finite k (v) inside the second interval of some rows: their outputs and dQ are NaN,
    and so are the dK (dK and dV) of every key they see in either interval; q: the row's own."""
    mask, key, first_key = poison_cases()[case]
    q, k, v = qkv(1, 17, 17, 2, 1, 16, seed=8)
    {"k": k, "v": v, "q": q}[where][0, key, 0, 3] = float("nan") if where != "v" else float("inf")
    out, grads = run(q, k, v, mask)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    want = reference.attention(*leaves, mask, compute_dtype=torch.float64)
    (want * torch.randn(want.shape, generator=seeded(3)).double()).sum().backward()
    for got, expected in zip([out, *grads], [want, *(t.grad for t in leaves)]):
        assert torch.equal(got.isnan(), expected.isnan())
        finite = ~expected.isnan()
        assert rel_err(got[finite], expected[finite]) <= TOLERANCE[torch.float32]
        assert not expected.isnan().all()
    if where != "q":  # a first-interval key's dK is NaN only through the second interval's poison
        assert grads[1][0, first_key].isnan().all() and grads[2][0, first_key].isnan().all() == (where == "k")


def test_one_interval_masks_launch_what_they_did(monkeypatch):
    """A one-interval mask makes one forward and one backward op call (each launching its
    kernels); a two-interval mask one per interval, each launching the same kernels."""
    if "triton" not in available_backends():
        pytest.skip("the Triton backend is not live here")
    monkeypatch.setenv("UNIMM_BACKEND", "triton")
    calls = {"forward": 0, "backward": 0}
    launches = {}

    def counting(name, op):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return op(*args, **kwargs)
        return wrapper

    class Launches:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            launches[self.name] = launches.get(self.name, 0) + 1
            return self.kernel[grid]

    monkeypatch.setattr(attention_module, "_attention_op", counting("forward", attention_module._attention_op))
    monkeypatch.setattr(attention_module, "_attention_backward_op",
                        counting("backward", attention_module._attention_backward_op))
    for name in dir(attention_module.kernels):
        kernel = getattr(attention_module.kernels, name)
        if name.endswith("_kernel") and hasattr(kernel, "__getitem__"):
            monkeypatch.setattr(attention_module.kernels, name, Launches(name, kernel))
    q, k, v = qkv(1, 9, 9, 2, 2, 16, seed=9)
    counts = []
    for mask in (AttentionMask.causal(1, 9, device=DEVICE),
                 AttentionMask.sinks_and_window(1, 9, sinks=1, window=3, device=DEVICE)):
        calls.update(forward=0, backward=0)
        launches.clear()
        run(q, k, v, mask)
        counts.append((dict(calls), dict(launches)))
    (one_calls, one_launches), (two_calls, two_launches) = counts
    assert one_calls == {"forward": 1, "backward": 1} and two_calls == {"forward": 2, "backward": 2}
    assert one_launches and two_launches == {name: 2 * n for name, n in one_launches.items()}


def test_decoder_prefill_with_two_interval_masks(monkeypatch):
    """The model layer takes two-interval masks: a prefill into an empty cache as is, and a chunk
    after cached tokens continued onto them (each interval shifted, one at the chunk's first key
    extended over the cache), sliding-window layers included; each equals one full forward."""
    from unimm.models import KVCache
    from unimm.testing import tiny_decoder

    monkeypatch.setenv("UNIMM_BACKEND", "reference")
    decoder = tiny_decoder("gemma2", window=4)
    ids = torch.randint(0, 64, (1, 12), generator=seeded(0))
    rows = torch.arange(12)
    # rows 0-7 causal; rows 8-11 see [0, 6) and [8, i + 1)
    full_mask = AttentionMask.from_intervals(torch.stack([0 * rows, torch.where(rows >= 8, 8, 0)], -1)[None],
                                             torch.stack([torch.where(rows >= 8, 6, rows + 1),
                                                          torch.where(rows >= 8, rows + 1, 0)], -1)[None])
    assert full_mask.kv_start2 is not None
    with torch.no_grad():
        full = decoder(ids, mask=full_mask)
        cache = KVCache(decoder.config, 1, 12, device="cpu", dtype=torch.float32)
        assert rel_err(decoder(ids, mask=full_mask, cache=cache), full) <= 1e-5
        cache = KVCache(decoder.config, 1, 12, device="cpu", dtype=torch.float32)
        decoder(ids[:, :5], cache=cache)
        cache.lens += 5
        # the chunk's rows 5-11 in chunk coordinates: [0, i + 1), then [0, 1) and [3, i + 1)
        local = torch.arange(7)
        chunk_mask = AttentionMask.from_intervals(
            torch.stack([0 * local, torch.where(local >= 3, 3, 0)], -1)[None],
            torch.stack([torch.where(local >= 3, 1, local + 1), torch.where(local >= 3, local + 1, 0)], -1)[None])
        assert rel_err(decoder(ids[:, 5:], mask=chunk_mask, cache=cache), full[:, 5:]) <= 1e-5


def test_two_interval_masks_never_go_to_a_vendor_kernel():
    from unimm.kernels import _attention_vendor as vendor

    q = torch.zeros(1, 9, 2, 16, dtype=torch.float16, device=DEVICE)
    causal_like = AttentionMask.sinks_and_window(1, 9, sinks=2, window=7, device=DEVICE)  # covers every row
    assert causal_like.kv_start2 is None and vendor.kernel_for(q, q, causal_like, None) == (vendor.SDPA, None)
    two = AttentionMask.sinks_and_window(1, 9, sinks=2, window=3, device=DEVICE)
    kernel, why = vendor.kernel_for(q, q, two, None)
    assert kernel is None and "not plain causal" in why
