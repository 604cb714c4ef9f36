"""attention and AttentionMask under hostile inputs, on every live backend (reference; Triton
through the interpreter in fp32 / fp16 on a CPU, compiled on a GPU).

The library's rule for non-finite values: nothing is read back from the device to validate it;
NaN / Inf reach exactly the results that depend on them, and what a result does not depend on
(keys outside a row's interval, rows that see nothing, padding) contributes exactly nothing,
forward and in every gradient, whatever it holds. For attention the granularity is the row:
  * out[i] is NaN when q[i] is not finite or row i sees a key whose k or v row is not;
  * dq[i] is NaN when that holds or dO[i] is not finite ("row i is poisoned"), and row i then
    makes NaN the dk of every key it sees, and their dv unless only values were non-finite;
  * a row that sees nothing outputs 0 and passes 0 gradients, whatever its q and dO;
  * every other element is exactly what it is with the non-finite entries replaced by any
    finite values.
Python-scalar arguments are always validated, with errors that name them. Mask bounds outside
``[0, Skv]`` (hand-built masks only) are clamped, identically on every backend.
"""

import pytest
import torch

from unimm.kernels import AttentionMask, attention
from unimm.kernels.reference import attention as reference
from unimm.testing import DEVICE, HOSTILE_DTYPES, HOSTILE_TOLERANCE, seeded

try:  # the property tests need hypothesis (the test extra); the others run without it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

NON_FINITE = (float("nan"), float("inf"), float("-inf"))
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered:RuntimeWarning")  # numpy, in the interpreter


def run(q, k, v, mask, grad_out, **options):
    """out, dq, dk, dv of one call with upstream gradient ``grad_out``, on the backend in force."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, mask, **options)
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in leaves]


def rule(q, k, v, grad_out, mask):
    """Where the rule puts NaN: out rows [B, S, Hq], dq rows [B, S, Hq], dk and dv rows
    [B, Skv, Hkv], computed densely from the inputs (the spec, written out)."""
    group = q.shape[2] // k.shape[2]
    visible = mask.to_dense(k.shape[1]).cpu()[..., None]  # [B, S, Skv, 1]: every head sees alike
    bad = lambda t: ~torch.isfinite(t.cpu()).all(-1)
    q_bad, do_bad = bad(q), bad(grad_out)  # [B, S, Hq]
    k_bad, v_bad = (bad(t).repeat_interleave(group, dim=2) for t in (k, v))  # [B, Skv, Hq]
    sees_any = visible[..., 0].any(-1)[..., None]  # [B, S, 1]
    sees_k = (visible & k_bad[:, None]).any(2)  # [B, S, Hq]
    sees_v = (visible & v_bad[:, None]).any(2)
    out_nan = sees_any & (q_bad | sees_k | sees_v)
    poisoned = sees_any & (q_bad | do_bad | sees_k | sees_v)
    probabilities = sees_any & (q_bad | do_bad | sees_k)

    def keys_seen_by(rows):  # [B, S, Hq] -> [B, Skv, Hkv]
        seen = (visible & rows[:, :, None]).any(1)  # [B, Skv, Hq]
        return seen.reshape(*seen.shape[:2], -1, group).any(-1)
    return out_nan, poisoned, keys_seen_by(poisoned), keys_seen_by(probabilities)


def check_rule(planted, clean, nan_rows):
    """Each result: all-NaN on the rows the rule names, and elsewhere exactly the clean run's."""
    for name, got, want, rows in zip(("out", "dq", "dk", "dv"), planted, clean, nan_rows):
        rows = rows.to(got.device)
        assert torch.isnan(got[rows]).all(), f"{name}: a row that depends on a non-finite value is not NaN"
        assert torch.equal(got[~rows], want[~rows]), f"{name}: a row that does not depend on one changed"


def random_case(seed, dtype, batch=2, seq_len=13, num_keys=19, q_heads=2, kv_heads=1, head_dim=16):
    gen = seeded(seed)
    make = lambda *shape: torch.randn(*shape, head_dim, generator=gen).to(DEVICE, dtype)
    return (make(batch, seq_len, q_heads), make(batch, num_keys, kv_heads), make(batch, num_keys, kv_heads),
            make(batch, seq_len, q_heads))


# ---- the case, on every backend ---------------------------------------------------------

@pytest.mark.parametrize("dtype", HOSTILE_DTYPES)
def test_hidden_nan_values_do_not_reach_any_row(backend, dtype):
    """Causal after 2 cached keys: rows 0..3 see keys [0, 3..6); NaN in v[6:] (seen by nobody,
    but loaded with the others' tile) must reach nothing, forward or backward."""
    gen = seeded(0)
    q, k, v = (torch.randn(1, n, 1, 16, generator=gen).to(DEVICE, dtype) for n in (4, 8, 8))
    v[:, 6:] = float("nan")
    k[:, 7] = float("inf")
    out, dq, dk, dv = run(q, k, v, AttentionMask.causal(1, 4, past_len=2, device=DEVICE), torch.ones_like(q))
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all()
    assert (dk[:, 6:] == 0).all() and (dv[:, 6:] == 0).all()  # nobody sees them: no gradient


@pytest.mark.parametrize("dtype", HOSTILE_DTYPES)
def test_a_key_hidden_from_some_rows_of_a_tile_reaches_only_the_others(backend, dtype):
    """Causal: key 5 is seen by rows >= 5 of the same query tile. Its NaN value makes exactly those
    rows NaN; the rows before it, in the same tile, stay exactly as with a finite value."""
    q, k, v, grad_out = random_case(1, dtype, batch=1, seq_len=12, num_keys=12)
    mask = AttentionMask.causal(1, 12, device=DEVICE)
    clean = run(q, k, v, mask, grad_out)
    for tensor in ("k", "v"):
        planted = [t.clone() for t in (q, k, v)]
        planted["qkv".index(tensor)][0, 5, 0, 3] = float("nan")
        result = run(*planted, mask, grad_out)
        check_rule(result, clean, rule(*planted, grad_out, mask))
        assert not torch.isnan(result[0][0, :5]).any() and torch.isnan(result[0][0, 5:]).all()


@pytest.mark.parametrize("dtype", HOSTILE_DTYPES)
def test_padding_rows_with_nan_pass_nothing(backend, dtype):
    """Packed documents with padding rows (between and after the documents, in the same tiles as
    real rows) whose q, k, v and upstream gradient hold garbage: they see nothing and nobody sees
    them, so they output 0, pass 0 gradients and reach no other row or key."""
    q, k, v, grad_out = random_case(2, dtype, batch=1, seq_len=20, num_keys=20)
    doc = torch.tensor([[0] * 6 + [-1] * 3 + [1] * 8 + [-1] * 3], device=DEVICE)
    padding = (doc[0] < 0).nonzero().flatten()
    mask = AttentionMask.from_spans(doc, torch.zeros_like(doc))
    clean = run(q, k, v, mask, grad_out)
    q[:, padding], grad_out[:, padding] = float("nan"), float("-inf")
    k[:, padding], v[:, padding] = float("inf"), float("nan")
    planted = run(q, k, v, mask, grad_out)
    check_rule(planted, clean, rule(q, k, v, grad_out, mask))
    out, dq, dk, dv = planted
    assert torch.isfinite(out).all() and (out[:, padding] == 0).all() and (dq[:, padding] == 0).all()
    assert torch.isfinite(dk).all() and torch.isfinite(dv).all() and (dk[:, padding] == 0).all()


def test_a_non_finite_value_leaves_dv_finite(backend):
    """Only values non-finite: the rows that see them are NaN, and so is the dk of the keys those
    rows see, but dv (made of the probabilities and dO, which a value does not change) is not."""
    q, k, v, grad_out = random_case(3, torch.float32, batch=1, seq_len=9, num_keys=9)
    mask = AttentionMask.causal(1, 9, device=DEVICE)
    clean = run(q, k, v, mask, grad_out)
    v[0, 4, 0, 0] = float("inf")
    out, dq, dk, dv = planted = run(q, k, v, mask, grad_out)
    check_rule(planted, clean, rule(q, k, v, grad_out, mask))
    assert torch.isnan(out[0, 4:]).all() and torch.isnan(dk).all() and torch.equal(dv, clean[3])


# ---- hostile scalars and masks ----------------------------------------------------------------

@pytest.mark.parametrize("options, error, match", [
    (dict(softcap=float("inf")), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=float("nan")), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-2.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap="2"), TypeError, "softcap must be a real number"),
    (dict(softcap=True), TypeError, "softcap must be a real number"),
    (dict(softcap=torch.tensor(2.0)), TypeError, "softcap must be a real number"),
    (dict(scale=float("inf")), ValueError, "scale must be a finite number"),
    (dict(scale=float("-nan")), ValueError, "scale must be a finite number"),
    (dict(scale="0.5"), TypeError, "scale must be a real number"),
    (dict(scale=False), TypeError, "scale must be a real number"),
])
def test_scalar_arguments_are_validated(backend, options, error, match):
    q, k, v, _ = random_case(4, torch.float32, batch=1, seq_len=3, num_keys=3)
    with pytest.raises(error, match=match):
        attention(q, k, v, AttentionMask.causal(1, 3, device=DEVICE), **options)


def test_scalar_arguments_accept_any_real_number(backend):
    import numpy as np

    q, k, v, _ = random_case(5, torch.float32, batch=1, seq_len=3, num_keys=3)
    mask = AttentionMask.causal(1, 3, device=DEVICE)
    want = attention(q, k, v, mask, scale=0.5, softcap=3.0)
    assert torch.equal(attention(q, k, v, mask, scale=np.float32(0.5), softcap=3), want)


@pytest.mark.parametrize("dtype", HOSTILE_DTYPES)
def test_out_of_range_bounds_are_clamped_on_every_backend(backend, dtype):
    """A hand-built mask with kv_end past Skv, kv_start below 0, or start > end: the rows see the
    keys of their interval clamped to [0, Skv] (nothing when empty), like to_dense says, and no
    key past the end (or before the start) is made up."""
    q, k, v, grad_out = random_case(6, dtype, batch=1, seq_len=6, num_keys=10)
    start = torch.tensor([[-5, 0, 3, 8, 7, -2]], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([[4, 25, 2, 40, 7, -1]], dtype=torch.int32, device=DEVICE)
    hand_built = AttentionMask(start, end, 10)
    clamped = AttentionMask.from_intervals(start.clamp(0, 10), torch.maximum(end.clamp(0, 10), start.clamp(0, 10)))
    assert torch.equal(hand_built.to_dense(10), clamped.to_dense(10))
    got, want = run(q, k, v, hand_built, grad_out), run(q, k, v, clamped, grad_out)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name
    with torch.autocast(DEVICE.type, enabled=False):
        ref = reference.attention(q.double(), k.double(), v.double(), hand_built, compute_dtype=torch.float64)
    assert ((got[0].double() - ref).abs().max() <= 10 * HOSTILE_TOLERANCE[dtype]).item()
    assert (got[0][0, 2] == 0).all() and (got[0][0, 4:] == 0).all()  # empty rows


@pytest.mark.parametrize("call, error, match", [
    (lambda: AttentionMask.causal(True, 4), TypeError, "batch_size must be an int, got bool"),
    (lambda: AttentionMask.causal(2.0, 4), TypeError, "batch_size must be an int, got float"),
    (lambda: AttentionMask.causal(1, 4.0), TypeError, "seq_len must be an int, got float"),
    (lambda: AttentionMask.causal(1, 4, past_len=True), TypeError, "past_len must be an int, got bool"),
    (lambda: AttentionMask.causal(1, -1), ValueError, "seq_len must be an int >= 0"),
    (lambda: AttentionMask.prefix_lm(torch.tensor([1]), True), TypeError, "seq_len must be an int, got bool"),
    (lambda: AttentionMask.causal(1, 3).to_dense(True), TypeError, "num_keys must be an int, got bool"),
    (lambda: AttentionMask.causal(1, 3).to_dense(-1), ValueError, "num_keys must be an int >= 0"),
    (lambda: AttentionMask(torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.int32), 3), TypeError,
     "kv_start must be an integer tensor"),
    (lambda: AttentionMask(torch.zeros(1, 3, dtype=torch.int32), [[1, 1, 1]], 3), TypeError,
     "kv_end must be a torch.Tensor"),
    (lambda: AttentionMask(torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), 3), ValueError,
     "kv_start must have 2 dims"),
    (lambda: AttentionMask(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32), 3),
     ValueError, "kv_end must match kv_start"),
    (lambda: AttentionMask(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 3, dtype=torch.int32), -1),
     ValueError, "num_keys must be an int >= 0"),
    (lambda: AttentionMask(torch.zeros(1, 3, dtype=torch.int32), torch.ones(1, 3, dtype=torch.int32), 3.0),
     TypeError, "num_keys must be an int, got float"),
])
def test_mask_arguments_are_validated(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_hand_built_mask_of_any_integer_dtype_reads_as_int32(backend):
    q, k, v, _ = random_case(7, torch.float32, batch=1, seq_len=5, num_keys=5)
    start = torch.zeros(1, 5, dtype=torch.int64, device=DEVICE)
    end = torch.arange(1, 6, device=DEVICE)[None].expand(1, 5)  # int64, not contiguous
    mask = AttentionMask(start, end, 5)
    assert mask.kv_start.dtype == mask.kv_end.dtype == torch.int32 and mask.kv_end.is_contiguous()
    assert torch.equal(attention(q, k, v, mask), attention(q, k, v, AttentionMask.causal(1, 5, device=DEVICE)))


def test_from_spans_takes_any_int64_document_ids():
    """Documents 0 and 2**32 each hold a span 1: distinct spans (their old key doc * 2**32 + span
    collided, and the valid layout was rejected as a span in two runs)."""
    doc = torch.tensor([[0, 0, 0, 2**32, 2**32, 2**62, -1]], device=DEVICE)
    span = torch.tensor([[1, 1, 0, 1, 1, 0, 0]], device=DEVICE)
    mask = AttentionMask.from_spans(doc, span)
    assert mask.kv_start.tolist() == [[0, 0, 0, 3, 3, 5, 0]] and mask.kv_end.tolist() == [[2, 2, 3, 5, 5, 6, 0]]
    with pytest.raises(ValueError, match="span_ids row 0: a span appears in two separate runs"):
        AttentionMask.from_spans(doc, torch.tensor([[1, 0, 1, 1, 1, 0, 0]], device=DEVICE))
    with pytest.raises(ValueError, match="doc_ids row 0: a document appears in two separate runs"):
        AttentionMask.from_spans(torch.tensor([[2**40, 5, 2**40]], device=DEVICE), torch.zeros(1, 3, dtype=torch.long,
                                                                                               device=DEVICE))


# ---- properties -------------------------------------------------------------------------------

if given is not None:
    HYPOTHESIS = settings(deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

    @st.composite
    def hostile_cases(draw):
        """Small shapes (GQA included), a hand-built interval mask (empty rows, bounds past the
        keys), and a few NaN / +-inf entries planted in q, k, v and dO rows."""
        batch, seq_len, num_keys = draw(st.integers(1, 2)), draw(st.integers(1, 20)), draw(st.integers(1, 24))
        kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
        starts = draw(st.lists(st.integers(-2, num_keys + 1), min_size=batch * seq_len, max_size=batch * seq_len))
        lengths = draw(st.lists(st.integers(-2, num_keys + 2), min_size=batch * seq_len, max_size=batch * seq_len))
        plants = draw(st.lists(st.tuples(st.sampled_from("qkvd"), st.integers(0, 10**6), st.sampled_from(NON_FINITE)),
                               min_size=1, max_size=4))
        return dict(shape=(batch, seq_len, num_keys, kv_heads * group, kv_heads), starts=starts, lengths=lengths,
                    plants=plants, seed=draw(st.integers(0, 2**16)), softcap=draw(st.sampled_from([None, 2.5])),
                    dtype=draw(st.sampled_from(HOSTILE_DTYPES)))

    def build(case):
        batch, seq_len, num_keys, q_heads, kv_heads = case["shape"]
        q, k, v, grad_out = random_case(case["seed"], case["dtype"], batch, seq_len, num_keys, q_heads, kv_heads)
        start = torch.tensor(case["starts"], dtype=torch.int32).reshape(batch, seq_len)
        end = start + torch.tensor(case["lengths"], dtype=torch.int32).reshape(batch, seq_len)
        mask = AttentionMask(start.to(DEVICE), end.to(DEVICE), num_keys)
        planted = [t.clone() for t in (q, k, v, grad_out)]
        for name, where, value in case["plants"]:
            t = planted["qkvd".index(name)].view(-1)
            t[where % t.numel()] = value
        return (q, k, v, grad_out), planted, mask

    @settings(HYPOTHESIS, max_examples=12)
    @given(case=hostile_cases())
    def test_non_finite_inputs_reach_exactly_what_depends_on_them(backend, case):
        """Planted NaN / inf: the results the rule names are NaN, every other element is exactly
        what the same call gives with finite values there; and the Triton backend agrees with
        the reference, NaN for NaN, within tolerance elsewhere."""
        (q, k, v, grad_out), (pq, pk, pv, pdo), mask = build(case)
        options = dict(softcap=case["softcap"])
        planted = run(pq, pk, pv, mask, pdo, **options)
        check_rule(planted, run(q, k, v, mask, grad_out, **options), rule(pq, pk, pv, pdo, mask))
        if backend != "reference":
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("UNIMM_BACKEND", "reference")
                want = run(pq, pk, pv, mask, pdo, **options)
            for name, got, ref in zip(("out", "dq", "dk", "dv"), planted, want):
                assert torch.equal(torch.isnan(got), torch.isnan(ref)), name
                finite = ~torch.isnan(ref)
                err = (got[finite].double() - ref[finite].double()).abs().max().item() if finite.any() else 0.0
                scale = max(1.0, ref[finite].double().abs().max().item()) if finite.any() else 1.0
                assert err <= 4 * HOSTILE_TOLERANCE[case["dtype"]] * scale, f"{name}: {err:.2e}"

    @st.composite
    def span_layouts(draw):
        """doc / span ids per token: contiguous runs, any int64 document ids (padding -1)."""
        batch, seq_len = draw(st.integers(1, 3)), draw(st.integers(1, 24))
        rows_doc, rows_span = [], []
        for _ in range(batch):
            # ids equal modulo 2**32 among them (the old key doc * 2**32 + span confused them)
            ids = st.one_of(st.integers(0, 2**63 - 1), st.integers(0, 3).map(lambda n: n * 2**32 + 7))
            doc_ids = draw(st.lists(ids, min_size=1, max_size=5, unique=True))
            docs, spans = [], []
            for doc in doc_ids:  # each document one run; its span ids may repeat (then rejected)
                for span in draw(st.lists(st.integers(0, 3), min_size=1, max_size=3)):
                    run_len = draw(st.integers(1, 4))
                    docs += [doc] * run_len
                    spans += [span] * run_len
            rows_doc.append((docs + [-1] * seq_len)[:seq_len])
            rows_span.append((spans + [0] * seq_len)[:seq_len])
        return torch.tensor(rows_doc), torch.tensor(rows_span)

    @settings(HYPOTHESIS, max_examples=60)
    @given(layout=span_layouts())
    def test_from_spans_matches_its_definition_for_any_ids(layout):
        """i sees j iff doc[i] == doc[j] >= 0 and (j <= i or span[i] == span[j] != 0): checked
        element by element, or the layout is rejected for a span that is not contiguous."""
        doc, span = layout
        same_span = (span[:, :, None] == span[:, None, :]) & (span[:, :, None] != 0) & (doc[:, :, None] == doc[:, None])
        i = torch.arange(doc.shape[1])
        # a (doc, span) pair in two runs: the definition's "span" would not be one interval
        pair_runs = [[(int(d), int(s)) for n, (d, s) in enumerate(zip(dr, sr)) if s and d >= 0 and
                      (n == 0 or (int(dr[n - 1]), int(sr[n - 1])) != (int(d), int(s)))] for dr, sr in zip(doc, span)]
        if any(len(runs) != len(set(runs)) for runs in pair_runs):
            with pytest.raises(ValueError, match="a span appears in two separate runs"):
                AttentionMask.from_spans(doc.to(DEVICE), span.to(DEVICE))
            return
        mask = AttentionMask.from_spans(doc.to(DEVICE), span.to(DEVICE))
        want = (doc[:, :, None] == doc[:, None, :]) & (doc[:, :, None] >= 0) & ((i[None, :] <= i[:, None]) | same_span)
        assert torch.equal(mask.to_dense(doc.shape[1]).cpu(), want)
else:
    def test_properties_need_hypothesis():
        pytest.skip("hypothesis is not installed (pip install hypothesis, or the test extra)")
