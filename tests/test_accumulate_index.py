"""selectivity.ops.accumulate_index: accumulate + selectivity_index in one op, the CPU kernel updating
the index from the classes a batch touched (csrc/cpu_accumulate_index.cpp).

It must equal the two ops it replaces after every batch: the state bit for bit, pref_class and mu_max
bit for bit, mu_rest and si to rounding (its total is updated by differences). The two ops are
themselves checked against a numpy oracle in test_ops.py.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selectivity import ops
from test_ops import DTYPES, LAYOUTS, make_act, needs_cuda, needs_extension

pytestmark = needs_extension
HYPOTHESIS = settings(max_examples=60, deadline=None)


def index_of(sums, counts, eps=1e-7):
    return ops.SIResult(*torch.ops.selectivity.selectivity_index(sums, counts, eps))


def assert_identical(a, b):
    """Bit for bit, NaN included."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def assert_same_index(result, expected):
    assert torch.equal(result.pref_class, expected.pref_class)
    assert_identical(result.mu_max, expected.mu_max)
    torch.testing.assert_close(result.mu_rest, expected.mu_rest, rtol=1e-9, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(result.si, expected.si, rtol=1e-9, atol=1e-12, equal_nan=True)


class Pair:
    """One state fed by accumulate_index, a twin fed by accumulate; compared after every batch."""

    def __init__(self, K, U):
        self.state, self.twin = ops.new_state(K, U), ops.new_state(K, U)
        self.cache = ops.new_index_cache(self.state[0])

    def step(self, act, labels, eps=1e-7):
        result = ops.accumulate_index(act, labels, *self.state, self.cache, eps)
        torch.ops.selectivity.accumulate(act, labels, *self.twin)
        assert_identical(self.state[0], self.twin[0])
        assert torch.equal(self.state[1], self.twin[1])
        assert_same_index(result, index_of(*self.twin, eps))
        return result


@st.composite
def runs(draw):
    """A run of batches: few classes (ties, absent ones) to many (rescans across class groups)."""
    K = draw(st.sampled_from([1, 2, 3, 7, 12, 40, 150]))
    U, B = draw(st.integers(1, 40)), draw(st.integers(1, 9))
    H, W = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    layout, dtype = draw(st.sampled_from(LAYOUTS)), draw(st.sampled_from(DTYPES))
    values = draw(st.sampled_from(["normal", "relu", "zeros", "integers"]))
    steps = draw(st.integers(1, 8))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    narrow = draw(st.booleans())  # labels from a few classes first, the rest appearing later
    batches = []
    for t in range(steps):
        high = max(1, min(K, 2 + t)) if narrow else K
        labels = torch.randint(0, high, (B,), generator=gen)
        batches.append((make_act(layout, B, U, H, W, dtype, values, gen), labels))
    return K, U, batches, draw(st.sampled_from([0.0, 1e-7, 0.5]))


@HYPOTHESIS
@given(run=runs())
def test_equals_accumulate_then_selectivity_index_after_every_batch(run):
    K, U, batches, eps = run
    pair = Pair(K, U)
    for act, labels in batches:
        pair.step(act, labels, eps)


@pytest.mark.parametrize("values", ["relu", "integers"])
def test_network_sized_run(values):
    # K = 1000 classes (32 groups of 32), units in several 256-unit tiles, classes seen a few times
    # each: the regime where the best class falls most often and units are rescanned.
    gen = torch.Generator().manual_seed(5)
    K, U, B = 1000, 600, 64
    pair = Pair(K, U)
    for _ in range(40):
        pair.step(make_act("channels_last", B, U, 2, 2, torch.float32, values, gen),
                  torch.randint(0, K, (B,), generator=gen))


def test_a_state_changed_elsewhere_is_seen():
    gen = torch.Generator().manual_seed(1)
    K, U = 20, 30
    pair = Pair(K, U)
    batch = lambda: (make_act("nchw", 6, U, 3, 3, torch.float32, "relu", gen), torch.randint(0, K, (6,), generator=gen))
    for _ in range(3):
        pair.step(*batch())
    # accumulate on the same state (a custom op: bumps no tensor version)
    act, labels = batch()
    ops.accumulate(act, labels, *pair.state)
    ops.accumulate(act, labels, *pair.twin)
    pair.step(*batch())
    # in-place torch ops: a reset, and a copy as a checkpoint load or the DDP reduction does
    for s in (*pair.state, *pair.twin):
        s.zero_()
    pair.step(*batch())
    other = ops.new_state(K, U)
    ops.accumulate(*batch(), *other)
    for mine, theirs in zip((*pair.state, *pair.twin), (*other, *other)):
        mine.copy_(theirs)
    pair.step(*batch())


def test_empty_batches():
    K, U = 4, 5
    pair = Pair(K, U)
    empty = (torch.zeros(0, U, 2, 2), torch.zeros(0, dtype=torch.int64))
    r = pair.step(*empty)  # nothing present: si 0, pref -1
    assert (r.pref_class == -1).all() and not r.si.any()
    pair.step(torch.rand(3, U, 2, 2), torch.tensor([2, 0, 2]))
    pair.step(*empty)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_give_selectivity_index_results(bad):
    gen = torch.Generator().manual_seed(2)
    K, U = 6, 9
    pair = Pair(K, U)
    pair.step(make_act("nchw", 5, U, 2, 2, torch.float32, "relu", gen), torch.randint(0, K, (5,), generator=gen))
    act = make_act("nchw", 5, U, 2, 2, torch.float32, "relu", gen)
    act[1, 3, 0, 0] = bad
    pair.step(act, torch.randint(0, K, (5,), generator=gen))
    pair.step(make_act("nchw", 5, U, 2, 2, torch.float32, "relu", gen), torch.randint(0, K, (5,), generator=gen))


def test_bad_input_changes_nothing():
    sums, counts = ops.new_state(3, 4)
    cache = ops.new_index_cache(sums)
    ops.accumulate_index(torch.rand(2, 4), torch.tensor([0, 1]), sums, counts, cache)
    before = [t.clone() for t in (sums, counts, cache.table)]
    with pytest.raises(ValueError, match=r"labels out of range: label 3 is not in \[0, K\) with K = 3"):
        ops.accumulate_index(torch.rand(2, 4), torch.tensor([0, 3]), sums, counts, cache)
    assert all(torch.equal(a, b) for a, b in zip(before, (sums, counts, cache.table)))
    with pytest.raises(ValueError, match=r"cache must be \[4 \+ G, U\] with G >= 1 and U = 4"):
        ops.accumulate_index(torch.rand(2, 4), torch.tensor([0, 1]), sums, counts,
                             ops.new_index_cache(ops.new_state(3, 5)[0]))
    with pytest.raises(TypeError, match="cache must be float64"):
        ops.accumulate_index(torch.rand(2, 4), torch.tensor([0, 1]), sums, counts,
                             ops.IndexCache(cache.table.float()))
    with pytest.raises(TypeError, match="labels must be int64"):
        ops.accumulate_index(torch.rand(2, 4), torch.tensor([0, 1], dtype=torch.int32), sums, counts, cache)


def test_opcheck():
    sums, counts = ops.new_state(5, 7)
    cache = ops.new_index_cache(sums)
    for rebuild in (True, False):
        torch.library.opcheck(torch.ops.selectivity.accumulate_index,
                              (torch.rand(4, 7, 3, 3), torch.tensor([0, 4, 4, 1]), sums, counts, cache.table,
                               1e-7, rebuild))


def test_reference_path_is_the_two_references(monkeypatch):
    monkeypatch.setenv("SELECTIVITY_FORCE_REFERENCE", "1")
    sums, counts = ops.new_state(3, 4)
    act, labels = torch.rand(5, 4, 2, 2), torch.tensor([0, 2, 2, 1, 0])
    result = ops.accumulate_index(act, labels, sums, counts, ops.new_index_cache(sums))
    ref_sums, ref_counts = ops.new_state(3, 4)
    ops.accumulate_reference(act, labels, ref_sums, ref_counts)
    expected = ops.selectivity_index_reference(ref_sums, ref_counts)
    assert torch.equal(sums, ref_sums) and all(torch.equal(a, b) for a, b in zip(result, expected))


@needs_cuda
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(4)
    K, U = 50, 70
    cpu, cuda = ops.new_state(K, U), ops.new_state(K, U, "cuda")
    cpu_cache, cuda_cache = ops.new_index_cache(cpu[0]), ops.new_index_cache(cuda[0])
    for _ in range(5):
        act = make_act("channels_last", 16, U, 4, 4, torch.float32, "relu", gen)
        labels = torch.randint(0, K, (16,), generator=gen)
        a = ops.accumulate_index(act, labels, *cpu, cpu_cache)
        b = ops.accumulate_index(act.cuda(), labels.cuda(), *cuda, cuda_cache)
        torch.testing.assert_close(cuda[0].cpu(), cpu[0], rtol=1e-6, atol=1e-9)
        assert torch.equal(cuda[1].cpu(), cpu[1])
        np.testing.assert_allclose(b.si.cpu().numpy(), a.si.numpy(), rtol=1e-5, atol=1e-7)
