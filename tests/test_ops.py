"""selectivity.ops: the compiled ops and the pure-PyTorch reference, each checked against an
independent numpy float64 oracle over random shapes, dtypes, layouts and label patterns.

Backend "extension" calls torch.ops.selectivity.* (skipped only when selectivity._C is not built;
test_extension_is_built fails instead when SELECTIVITY_EXPECT_EXTENSION=1, as `make test` sets).
Backend "reference" calls ops.*_reference. Both are tested whatever SELECTIVITY_FORCE_REFERENCE says;
the dispatch tests check that ops.accumulate/selectivity_index honour it.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selectivity import ops

needs_extension = pytest.mark.skipif(
    not ops.has_extension(), reason=f"selectivity._C is not built ({ops._EXTENSION_ERROR}); run `make build`"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
BACKENDS = [pytest.param("extension", marks=needs_extension), "reference"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HYPOTHESIS = settings(max_examples=50, deadline=None)


def accumulate(backend, act, labels, sums, counts):
    if backend == "extension":
        torch.ops.selectivity.accumulate(act, labels, sums, counts)
    else:
        ops.accumulate_reference(act, labels, sums, counts)


def selectivity_index(backend, sums, counts, eps=1e-7):
    if backend == "extension":
        return ops.SIResult(*torch.ops.selectivity.selectivity_index(sums, counts, eps))
    return ops.selectivity_index_reference(sums, counts, eps)


# ----- the oracle: plain numpy float64, written from the definitions, not from ops.py -----


def oracle_accumulate(act, labels, K):
    a = act.detach().cpu().double().numpy()  # the low-precision values, upcast exactly
    B, U = a.shape[:2]
    means = a.reshape(B, U, -1).mean(axis=2)
    sums, counts = np.zeros((K, U)), np.zeros(K, dtype=np.int64)
    for b, label in enumerate(labels.cpu().tolist()):
        sums[label] += means[b]
        counts[label] += 1
    return sums, counts


def oracle_index(sums, counts, eps):
    sums, counts = sums.cpu().numpy(), counts.cpu().numpy()
    U = sums.shape[1]
    si, pref, mu_max, mu_rest = np.zeros(U), np.full(U, -1), np.zeros(U), np.zeros(U)
    present = np.flatnonzero(counts > 0)
    for u in range(U):
        if len(present) == 0:
            continue
        means = sums[present, u] / counts[present]
        best = int(np.argmax(means))  # numpy: the first maximum, i.e. the lowest class
        others = np.delete(means, best)
        mu_max[u], pref[u] = means[best], present[best]
        mu_rest[u] = others.mean() if len(others) else 0.0
        den = mu_max[u] + mu_rest[u] + eps
        si[u] = (mu_max[u] - mu_rest[u]) / den if den != 0 else 0.0
    return si, pref, mu_max, mu_rest


# ----- random inputs -----

# Every way an activation may arrive: the two native layouts, [B, U], and strided views that the
# kernels read in place (batch/unit slices, expanded batch) or must copy (transposed H/W).
LAYOUTS = ["nchw", "channels_last", "2d", "2d_transposed", "batch_slice", "unit_slice", "cl_unit_slice",
           "hw_transposed", "batch_expanded"]


def make_act(layout, B, U, H, W, dtype, values, gen, device="cpu"):
    def rand(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if values == "relu":
            x = x.clamp_min(0)
        elif values == "zeros":
            x = torch.zeros(shape, dtype=torch.float64)
        elif values == "integers":  # exact in every dtype, and makes ties between classes likely
            x = x.mul(2).round()
        return x.to(dtype).to(device)

    if layout == "nchw":
        return rand(B, U, H, W)
    if layout == "channels_last":
        return rand(B, U, H, W).to(memory_format=torch.channels_last)
    if layout == "2d":
        return rand(B, U)
    if layout == "2d_transposed":
        return rand(U, B).t()
    if layout == "batch_slice":
        return rand(2 * B, U, H, W)[::2]
    if layout == "unit_slice":
        return rand(B, 2 * U, H, W)[:, 1::2]
    if layout == "cl_unit_slice":
        return rand(B, 2 * U, H, W).to(memory_format=torch.channels_last)[:, ::2]
    if layout == "hw_transposed":
        return rand(B, U, W, H).transpose(2, 3)
    if layout == "batch_expanded":
        return rand(1, U, H, W).expand(B, U, H, W)
    raise AssertionError(layout)


@st.composite
def batches(draw):
    B, U, K = draw(st.integers(1, 9)), draw(st.integers(1, 37)), draw(st.integers(1, 12))
    H, W = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    layout, dtype = draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(DTYPES))
    values = draw(st.sampled_from(["normal", "relu", "zeros", "integers"]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if draw(st.booleans()):  # all images of one class: most classes absent
        labels = torch.full((B,), draw(st.integers(0, K - 1)), dtype=torch.int64)
    else:
        labels = torch.randint(0, K, (B,), generator=gen)
    return make_act(layout, B, U, H, W, dtype, values, gen), labels, K


def assert_state_close(sums, counts, act, labels, initial=0.0):
    """sums within 1e-6 * sum|x| of the oracle: the CPU kernel sums runs of <= 8 values in float32
    (error <= 7 * 2^-24 * sum|x|, csrc/ops/accumulate/cpu/accumulate_cpu.cpp); everything else is float64."""
    K = sums.shape[0]
    expected_sums, expected_counts = oracle_accumulate(act, labels, K)
    scale, _ = oracle_accumulate(act.abs(), labels, K)
    error = np.abs(sums.cpu().numpy() - (expected_sums + initial))
    bound = 1e-6 * scale + 1e-12 * (1 + abs(initial))
    assert (error <= bound).all(), f"max error {error.max():.3g}, worst ratio to bound {(error / bound).max():.3g}"
    np.testing.assert_array_equal(counts.cpu().numpy(), expected_counts)


def assert_index_close(result, expected):
    si, pref, mu_max, mu_rest = expected
    np.testing.assert_allclose(result.mu_max.cpu().numpy(), mu_max, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(result.mu_rest.cpu().numpy(), mu_rest, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.si.cpu().numpy(), si, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(result.pref_class.cpu().numpy(), pref)
    assert result.si.dtype == torch.float64 and result.pref_class.dtype == torch.int64
    assert torch.isfinite(result.si).all()


# ----- accumulate -----


@pytest.mark.parametrize("backend", BACKENDS)
@HYPOTHESIS
@given(case=batches())
def test_accumulate_matches_oracle(backend, case):
    act, labels, K = case
    sums, counts = ops.new_state(K, act.shape[1])
    sums += 0.25  # accumulate adds to what is there
    accumulate(backend, act, labels, sums, counts)
    assert_state_close(sums, counts, act, labels, initial=0.25)


@pytest.mark.parametrize("backend", BACKENDS)
@HYPOTHESIS
@given(case=batches(), data=st.data())
def test_accumulate_in_pieces_equals_one_call(backend, case, data):
    act, labels, K = case
    cut = data.draw(st.integers(0, act.shape[0]))
    whole, pieces = ops.new_state(K, act.shape[1]), ops.new_state(K, act.shape[1])
    accumulate(backend, act, labels, *whole)
    accumulate(backend, act[:cut], labels[:cut], *pieces)
    accumulate(backend, act[cut:], labels[cut:], *pieces)
    np.testing.assert_allclose(pieces[0].numpy(), whole[0].numpy(), rtol=1e-12, atol=1e-14)
    assert torch.equal(pieces[1], whole[1])


# The CPU kernel's paths by shape, at sizes the random cases above do not reach: rows of 256
# units (8 streams of 32 rows), 2048 units (8 KB rows), few pixels (one pass, no phase 1), many
# pixels (8 streams plus a remainder of 1-7 rows), and their NCHW twins.
NETWORK_SHAPES = [(6, 256, 16, 16), (2, 2048, 7, 7), (5, 2048, 2, 2), (4, 100, 3, 5), (3, 512, 9, 9)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", NETWORK_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulate_network_shapes_match_oracle(backend, shape, layout, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    act = make_act(layout, *shape, dtype, "relu", gen)
    labels = torch.randint(0, 7, (shape[0],), generator=gen)
    sums, counts = ops.new_state(7, shape[1])
    accumulate(backend, act, labels, sums, counts)
    assert_state_close(sums, counts, act, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_accumulate_empty_batch_is_a_no_op(backend):
    sums, counts = ops.new_state(3, 5)
    accumulate(backend, torch.zeros(0, 5, 2, 2), torch.zeros(0, dtype=torch.int64), sums, counts)
    assert not sums.any() and not counts.any()


def test_accumulate_detaches_act_that_requires_grad():
    act = torch.rand(4, 3, 2, 2, requires_grad=True)
    sums, counts = ops.new_state(2, 3)
    ops.accumulate(act, torch.tensor([0, 1, 1, 0]), sums, counts)
    assert not sums.requires_grad and sums.grad_fn is None
    assert_state_close(sums, counts, act, torch.tensor([0, 1, 1, 0]))


# ----- selectivity_index -----


@st.composite
def states(draw):
    K, U = draw(st.integers(1, 12)), draw(st.integers(1, 37))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    counts = torch.randint(0, 4, (K,), generator=gen)  # ~1/4 of the classes absent
    values = draw(st.sampled_from(["uniform", "integers", "zeros"]))
    if values == "uniform":
        sums = torch.rand(K, U, generator=gen, dtype=torch.float64) * 5
    elif values == "integers":  # ties between classes
        sums = torch.randint(0, 3, (K, U), generator=gen).double()
    else:
        sums = torch.zeros(K, U, dtype=torch.float64)
    sums *= counts.unsqueeze(1) > 0  # an absent class has no sum
    eps = draw(st.sampled_from([0.0, 1e-7, 0.5]))
    return sums, counts, eps


@pytest.mark.parametrize("backend", BACKENDS)
@HYPOTHESIS
@given(state=states())
def test_selectivity_index_matches_oracle(backend, state):
    sums, counts, eps = state
    assert_index_close(selectivity_index(backend, sums, counts, eps), oracle_index(sums, counts, eps))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("values", ["uniform", "integers"])
def test_selectivity_index_network_size_matches_oracle(backend, values):
    # Wider than the CPU kernel's 1024-unit tile (two tiles + a remainder) and more present classes
    # than its four-class sweep (plus a remainder), with ties between classes in "integers".
    gen = torch.Generator().manual_seed(3)
    K, U = 203, 2100
    counts = torch.randint(0, 5, (K,), generator=gen)
    if values == "uniform":
        sums = torch.rand(K, U, generator=gen, dtype=torch.float64) * 7
    else:
        sums = torch.randint(0, 4, (K, U), generator=gen).double()
    sums *= counts.unsqueeze(1) > 0
    assert_index_close(selectivity_index(backend, sums, counts), oracle_index(sums, counts, 1e-7))


@pytest.mark.parametrize("backend", BACKENDS)
def test_selectivity_index_edge_cases(backend):
    # unit 0: all zero; unit 1: class 2 only; unit 2: tie between classes 0 and 2
    sums = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 0.0], [0.0, 4.0, 3.0]], dtype=torch.float64)
    counts = torch.tensor([1, 0, 1])
    r = selectivity_index(backend, sums, counts, eps=0.0)
    assert r.si[0] == 0 and r.mu_max[0] == 0 and r.mu_rest[0] == 0  # 0/0 -> 0, not NaN
    assert r.pref_class.tolist() == [0, 2, 0]  # ties go to the lowest class
    assert r.mu_max[1] == 4 and r.mu_rest[1] == 0 and r.si[1] == 1
    assert r.si[2] == 0 and r.mu_rest[2] == 3

    one_class = selectivity_index(backend, sums, torch.tensor([0, 0, 2]), eps=1e-7)
    assert one_class.mu_rest.tolist() == [0.0, 0.0, 0.0]  # no other class: mu_rest is 0
    assert one_class.mu_max.tolist() == [0.0, 2.0, 1.5] and one_class.pref_class.tolist() == [2, 2, 2]

    none = selectivity_index(backend, sums, torch.zeros(3, dtype=torch.int64))
    assert none.si.tolist() == [0.0] * 3 and none.pref_class.tolist() == [-1] * 3
    assert none.mu_max.tolist() == [0.0] * 3 and none.mu_rest.tolist() == [0.0] * 3


# ----- bad input: one clear line, the same from both backends -----


def good_args():
    return torch.rand(4, 5, 2, 2), torch.tensor([0, 1, 2, 1]), *ops.new_state(3, 5)


def replace(i, value):
    def make():
        args = list(good_args())
        args[i] = value(args[i]) if callable(value) else value
        return args

    return make


ACCUMULATE_ERRORS = [
    ("act float64", replace(0, torch.rand(4, 5, 2, 2, dtype=torch.float64)), TypeError,
     r"act must be float32, float16 or bfloat16, got torch\.float64; cast it with act\.float\(\)"),
    ("act int", replace(0, torch.ones(4, 5, 2, 2, dtype=torch.int32)), TypeError, r"act must be float32.*torch\.int32"),
    ("act 3-D", replace(0, torch.rand(4, 5, 2)), ValueError, r"act must be \[B, U, H, W\] or \[B, U\], got shape \[4, 5, 2\]"),
    ("act no pixels", replace(0, torch.rand(4, 5, 0, 2)), ValueError, r"act has no pixels \(shape \[4, 5, 0, 2\]\)"),
    ("labels int32", replace(1, torch.tensor([0, 1, 2, 1], dtype=torch.int32)), TypeError,
     r"labels must be int64, got torch\.int32; use labels\.long\(\)"),
    ("labels too short", replace(1, torch.tensor([0, 1, 2])), ValueError,
     r"labels must be 1-D with B = 4 entries \(act\.size\(0\)\), got shape \[3\]"),
    ("labels 2-D", replace(1, torch.zeros(4, 1, dtype=torch.int64)), ValueError, r"labels must be 1-D with B = 4"),
    ("label too big", replace(1, torch.tensor([0, 1, 7, 3])), ValueError,
     r"labels out of range: label 7 is not in \[0, K\) with K = 3"),
    ("label negative", replace(1, torch.tensor([0, -1, 2, 1])), ValueError, r"labels out of range: label -1 is not in \[0, K\)"),
    ("sums float32", replace(2, torch.zeros(3, 5)), TypeError, r"sums must be float64, got torch\.float32; make the state with"),
    ("sums 1-D", replace(2, torch.zeros(5, dtype=torch.float64)), ValueError, r"sums must be 2-D \[K, U\], got shape \[5\]"),
    ("sums wrong U", replace(2, torch.zeros(3, 6, dtype=torch.float64)), ValueError,
     r"sums must be \[K, U\] with U = 5 \(act\.size\(1\)\), got shape \[3, 6\]"),
    ("sums not contiguous", replace(2, torch.zeros(5, 3, dtype=torch.float64).t()), ValueError,
     r"sums and counts must be contiguous"),
    ("counts float64", replace(3, torch.zeros(3, dtype=torch.float64)), TypeError, r"counts must be int64, got torch\.float64"),
    ("counts wrong K", replace(3, torch.zeros(4, dtype=torch.int64)), ValueError,
     r"counts must be \[K\] with K = 3 \(sums\.size\(0\)\), got shape \[4\]"),
    ("state on another device", lambda: [*good_args()[:2], *ops.new_state(3, 5, device="meta")], ValueError,
     r"act, labels, sums and counts must be on one device, got act on cpu, labels on cpu, sums and counts on meta"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, make, exc, message", ACCUMULATE_ERRORS, ids=[e[0] for e in ACCUMULATE_ERRORS])
def test_accumulate_rejects_bad_input(backend, name, make, exc, message):
    args = make()
    before = [a.clone() for a in args[2:] if a.device.type != "meta"]
    with pytest.raises(exc, match=message) as info:
        accumulate(backend, *args)
    assert "\n" not in str(info.value).strip()  # one line
    after = [a for a in args[2:] if a.device.type != "meta"]
    assert all(torch.equal(x, y) for x, y in zip(before, after)), "a rejected call changed the state"


INDEX_ERRORS = [
    ("sums float32", lambda: (torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64)), TypeError, r"sums must be float64"),
    ("counts int32", lambda: (torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.int32)), TypeError,
     r"counts must be int64, got torch\.int32"),
    ("K mismatch", lambda: (torch.zeros(3, 5, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)), ValueError,
     r"counts must be \[K\] with K = 3"),
    ("sums 3-D", lambda: (torch.zeros(3, 5, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)), ValueError,
     r"sums must be 2-D \[K, U\], got shape \[3, 5, 1\]"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, make, exc, message", INDEX_ERRORS, ids=[e[0] for e in INDEX_ERRORS])
def test_selectivity_index_rejects_bad_input(backend, name, make, exc, message):
    with pytest.raises(exc, match=message):
        selectivity_index(backend, *make())


def test_new_state():
    sums, counts = ops.new_state(4, 7)
    assert sums.shape == (4, 7) and sums.dtype == torch.float64 and not sums.any()
    assert counts.shape == (4,) and counts.dtype == torch.int64 and not counts.any()
    with pytest.raises(ValueError, match="num_classes >= 0"):
        ops.new_state(-1, 7)


# ----- the compiled op as a torch op -----


def test_extension_is_built():
    if os.environ.get("SELECTIVITY_EXPECT_EXTENSION") != "1":
        pytest.skip("SELECTIVITY_EXPECT_EXTENSION is not 1")
    assert ops.has_extension(), f"selectivity._C failed to import: {ops._EXTENSION_ERROR}; run `make build`"


OPCHECK_INPUTS = [("nchw", torch.float32), ("channels_last", torch.bfloat16), ("2d", torch.float16),
                  ("hw_transposed", torch.float32)]


@needs_extension
@pytest.mark.parametrize("layout, dtype", OPCHECK_INPUTS)
def test_opcheck_accumulate(layout, dtype):
    gen = torch.Generator().manual_seed(0)
    act = make_act(layout, 5, 6, 3, 2, dtype, "relu", gen)
    torch.library.opcheck(torch.ops.selectivity.accumulate.default,
                          (act, torch.tensor([0, 2, 2, 1, 0]), *ops.new_state(4, 6)))


@needs_extension
def test_opcheck_selectivity_index():
    sums, counts = torch.rand(4, 6, dtype=torch.float64), torch.tensor([2, 0, 1, 3])
    torch.library.opcheck(torch.ops.selectivity.selectivity_index.default, (sums, counts, 1e-7))


@needs_extension
def test_ops_work_under_torch_compile(monkeypatch):
    monkeypatch.delenv("SELECTIVITY_FORCE_REFERENCE", raising=False)

    def step(act, labels, sums, counts):
        ops.accumulate(act, labels, sums, counts)
        return ops.selectivity_index(sums, counts)

    act, labels = torch.rand(6, 4, 3, 3).to(memory_format=torch.channels_last), torch.tensor([0, 1, 1, 2, 0, 0])
    eager_state, compiled_state = ops.new_state(3, 4), ops.new_state(3, 4)
    expected = step(act, labels, *eager_state)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(act, labels, *compiled_state)
    assert torch.equal(compiled_state[0], eager_state[0]) and torch.equal(compiled_state[1], eager_state[1])
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# ----- dispatch in ops.py -----


def test_force_reference_env_uses_the_reference(monkeypatch):
    calls = []
    monkeypatch.setenv("SELECTIVITY_FORCE_REFERENCE", "1")
    monkeypatch.setattr(ops, "accumulate_reference", lambda *a: calls.append("accumulate"))
    monkeypatch.setattr(ops, "selectivity_index_reference", lambda *a: calls.append("index"))
    ops.accumulate(*good_args())
    ops.selectivity_index(*ops.new_state(3, 5))
    assert calls == ["accumulate", "index"]


@needs_extension
def test_dispatch_uses_the_extension_when_built(monkeypatch):
    monkeypatch.delenv("SELECTIVITY_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(ops, "accumulate_reference", lambda *a: pytest.fail("used the reference"))
    monkeypatch.setattr(ops, "selectivity_index_reference", lambda *a: pytest.fail("used the reference"))
    act, labels, sums, counts = good_args()
    ops.accumulate(act, labels, sums, counts)
    r = ops.selectivity_index(sums, counts)
    assert isinstance(r, ops.SIResult) and counts.sum() == 4


def test_missing_extension_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.delenv("SELECTIVITY_FORCE_REFERENCE", raising=False)
    monkeypatch.setattr(ops, "_EXTENSION_ERROR", ImportError("No module named 'selectivity._C'"))
    monkeypatch.setattr(ops, "_warned_missing", False)
    act, labels, sums, counts = good_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # so only ops' own once-per-process logic can dedupe
        ops.accumulate(act, labels, sums, counts)
        ops.accumulate(act, labels, sums, counts)
        ops.selectivity_index(sums, counts)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "not built" in messages[0] and "make build" in messages[0]
    expected, _ = oracle_accumulate(act, labels, 3)
    np.testing.assert_allclose(sums.numpy(), 2 * expected, rtol=1e-12)  # the reference is float64 throughout


# ----- CUDA (runs where a GPU exists) -----


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_accumulate_and_index_match_oracle(backend, layout, dtype):
    gen = torch.Generator().manual_seed(1)
    for B, U, H, W, K in [(7, 33, 5, 3, 4), (64, 256, 16, 16, 10), (3, 70, 2, 2, 50)]:
        act = make_act(layout, B, U, H, W, dtype, "relu", gen, device="cuda")
        labels = torch.randint(0, K, (B,), generator=gen).cuda()
        sums, counts = ops.new_state(K, U, device="cuda")
        accumulate(backend, act, labels, sums, counts)
        assert_state_close(sums, counts, act, labels)
        assert_index_close(selectivity_index(backend, sums, counts), oracle_index(sums, counts, 1e-7))


def strided_act(layout, B, U, H, W, dtype, gen):
    """Layouts beyond make_act's: contiguous, but one element off 16-byte alignment."""
    base = torch.randn(B * U * H * W + 1, generator=gen, dtype=torch.float64).clamp_min(0).to(dtype).cuda()
    if layout == "misaligned_nchw":
        return base[1:].view(B, U, H, W)
    return base[1:].view(B, H, W, U).permute(0, 3, 1, 2)


# Each CUDA accumulate path and its fallbacks (csrc/ops/accumulate/cuda/accumulate_cuda.cu): (layout, B, U, H, W).
CUDA_PATHS = [
    ("channels_last", 5, 64, 7, 7),  # 16-byte packs, one pixel split
    ("channels_last", 3, 16, 40, 40),  # packs, several pixel splits
    ("channels_last", 4, 12, 3, 3),  # U not a multiple of the pack: one element a load
    ("2d", 6, 40, 1, 1),  # [B, U] in packs
    ("nchw", 5, 64, 7, 7),  # shared-memory tiles, one thread a plane
    ("nchw", 3, 16, 10, 10),  # tiles, two threads a plane
    ("nchw", 3, 24, 14, 14),  # tiles, four threads a plane
    ("nchw", 2, 8, 20, 20),  # maps over 256 pixels: a lane group a plane
    ("misaligned_nchw", 5, 64, 7, 7),  # not 16-byte aligned: no tiles
    ("misaligned_cl", 5, 64, 7, 7),  # not 16-byte aligned: no packs
]


@needs_cuda
@needs_extension
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout, B, U, H, W", CUDA_PATHS, ids=[f"{p[0]}-{p[2]}x{p[3]}x{p[4]}" for p in CUDA_PATHS])
def test_cuda_accumulate_paths_match_oracle(layout, B, U, H, W, dtype):
    gen = torch.Generator().manual_seed(3)
    if layout.startswith("misaligned"):
        act = strided_act(layout, B, U, H, W, dtype, gen)
        assert act.data_ptr() % 16 != 0
    else:
        act = make_act(layout, B, U, H, W, dtype, "relu", gen, device="cuda")
    labels = torch.randint(0, 3, (B,), generator=gen).cuda()
    sums, counts = ops.new_state(3, U, device="cuda")
    accumulate("extension", act, labels, sums, counts)
    accumulate("extension", act, labels, sums, counts)  # a second call adds to the first
    expected, expected_counts = oracle_accumulate(act, labels, 3)
    scale, _ = oracle_accumulate(act.abs(), labels, 3)
    assert (np.abs(sums.cpu().numpy() - 2 * expected) <= 2e-6 * scale + 1e-12).all()
    np.testing.assert_array_equal(counts.cpu().numpy(), 2 * expected_counts)


@needs_cuda
@needs_extension
def test_cuda_index_with_many_classes_absent_classes_and_ties():
    gen = torch.Generator().manual_seed(4)
    K, U = 1000, 70  # U not a multiple of the block's 32 units
    sums = torch.randint(0, 4, (K, U), generator=gen).double()  # small integers: many ties
    counts = torch.randint(0, 3, (K,), generator=gen)  # about a third of the classes absent
    counts[:40] = 0  # and none among the first ones
    result = selectivity_index("extension", sums.cuda(), counts.cuda())
    assert_index_close(result, oracle_index(sums, counts, 1e-7))


@needs_cuda
@needs_extension
def test_cuda_bad_label_is_reported_by_a_later_call():
    act, sums, counts = torch.rand(4, 5, 2, 2, device="cuda"), *ops.new_state(3, 5, device="cuda")
    torch.ops.selectivity.accumulate(act, torch.tensor([0, 9, 1, 2], device="cuda"), sums, counts)
    torch.cuda.synchronize()  # the flag is read without a sync; wait so this test is deterministic
    with pytest.raises(ValueError, match=r"labels out of range: label 9 is not in \[0, K\) with K = 3.*found on CUDA"):
        torch.ops.selectivity.accumulate(act, torch.tensor([0, 1, 1, 2], device="cuda"), sums, counts)
    assert counts.tolist() == [1, 1, 1]  # the bad image was skipped, the error cleared:
    torch.ops.selectivity.accumulate(act, torch.tensor([0, 1, 1, 2], device="cuda"), sums, counts)
    assert counts.tolist() == [2, 3, 2]


@needs_cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_device_mismatch_is_rejected(backend):
    act, labels, sums, counts = good_args()
    with pytest.raises(ValueError, match="must be on one device"):
        accumulate(backend, act.cuda(), labels.cuda(), sums, counts)
