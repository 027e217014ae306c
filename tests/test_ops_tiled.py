"""The tracker's ops on the tiled state (selectivity/ops.py: accumulate_means, index_cache,
si_from_cache): the kernels against the float64 reference, the incremental per-step SI against the full
reduction, and the decayed state against a direct recomputation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selectivity import ops

HYPOTHESIS = settings(max_examples=40, deadline=None)
needs_extension = pytest.mark.skipif(not ops.has_extension(), reason="selectivity._C is not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# A few values only, zeros among them: exact ties between classes and between units are common, as
# with dead ReLU units.
VALUES = torch.tensor([0.0, 0.0, 0.25, 0.5, 1.0, 3.0])


def draw_means(gen, B, N):
    m = VALUES[torch.randint(0, len(VALUES), (B, N), generator=gen)]
    if N > 1:
        m[:, 0] = 0.0  # a dead unit: every class mean is exactly 0
        m[:, -1] = m[:, 0 if N == 2 else 1]  # two units with the same activations
    return m


def dense(sums_row, N):
    return ops.tiled_to_dense(sums_row, 0, N)


@st.composite
def steps(draw):
    return dict(R=draw(st.integers(1, 3)), K=draw(st.integers(1, 12)), N=draw(st.integers(1, 70)),
                T=draw(st.sampled_from([1, 3, 8, 64])), weights=draw(st.lists(st.sampled_from([1.0, 0.5, 3.0]),
                                                                              min_size=1, max_size=4)),
                B=draw(st.integers(0, 9)), seed=draw(st.integers(0, 2 ** 31)))


@needs_extension
@HYPOTHESIS
@given(case=steps())
def test_accumulate_means_matches_the_reference_and_the_cache_the_full_reduction(case):
    gen = torch.Generator().manual_seed(case["seed"])
    R, K, N, T, B = case["R"], case["K"], case["N"], case["T"], case["B"]
    sums, counts = ops.new_tiled_state(R, K, N, T)
    ref_sums, ref_counts = sums.clone(), counts.clone()
    cache, ref_cache = ops.new_index_cache(sums), ops.new_index_cache(sums)
    rescans = torch.zeros(2, dtype=torch.int64)
    for w in case["weights"]:
        means, labels = draw_means(gen, B, N), torch.randint(0, K, (R, B), generator=gen)
        ops.accumulate_means(means, labels, sums, counts, w, cache, rescans)
        ops.accumulate_means_reference(means, labels, ref_sums, ref_counts, w, ref_cache)
        torch.testing.assert_close(sums, ref_sums, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(counts, ref_counts, rtol=1e-12, atol=0)
        full = ops.index_cache(sums[0], counts[0])
        # μ_max and the preferred class bit for bit, as the full reduction of the same state gives them.
        assert torch.equal(cache[:2], full[:2])
        torch.testing.assert_close(cache[2], full[2], rtol=1e-12, atol=1e-12)
        assert torch.equal(full[1], ref_cache[1])
        torch.testing.assert_close(full[[0, 2, 3]], ref_cache[[0, 2, 3]], rtol=1e-12, atol=1e-12)
        # second and the group bounds: between scans, upper bounds of the exact runner-up and group
        # maxima of the same state (the reference's divisions); after a full scan, those values.
        exact = ops.index_cache_reference(sums[0], counts[0])
        assert bool((cache[3] >= exact[3]).all()) and bool((cache[4:] >= exact[4:]).all())
        assert bool((full[3] >= exact[3]).all()) and bool((full[4:] >= exact[4:]).all())
        torch.testing.assert_close(full[3:], exact[3:], rtol=1e-14, atol=0)


@needs_extension
def test_incremental_si_equals_the_full_reduction_after_1000_steps_at_k_1000():
    """1,000 random steps at K = 1000: exact zeros, a dead unit, tied units, and classes first seen
    late (the label range grows until the last step). Small U keeps it fast."""
    K, N, B, steps = 1000, 40, 16, 1000
    gen = torch.Generator().manual_seed(0)
    sums, counts = ops.new_tiled_state(1, K, N, 16)
    cache, rescans = ops.new_index_cache(sums), torch.zeros(2, dtype=torch.int64)
    worst = 0.0
    for step in range(steps):
        seen = min(K, 20 + step)  # a new class can appear at every step
        labels = torch.randint(0, seen, (1, B), generator=gen)
        ops.accumulate_means(draw_means(gen, B, N), labels, sums, counts, 1.0, cache, rescans)
        if step % 97 == 0 or step == steps - 1:
            inc = ops.si_from_cache(cache, counts[0])
            full = ops.selectivity_index_reference(dense(sums[0], N), counts[0].long())
            assert torch.equal(inc.pref_class[:N], full.pref_class)
            for a, b in zip(inc[1:], full[1:]):
                worst = max(worst, float((a[:N].double() - b.double()).abs().max()))
            worst = max(worst, float((inc.si[:N] - full.si).abs().max()))
    assert worst <= 1e-12, worst
    assert int((counts[0] > 0).sum()) > 900  # classes kept appearing
    assert 0 < int(rescans[0]) < steps * N // 2  # rescans happened, and far from every unit every step


@needs_extension
def test_decayed_state_equals_a_direct_recomputation():
    """Weights λ^-t (the tracker's lazy scaling) give class means = Σ λ^(t_end - t) x / Σ λ^(t_end - t)."""
    K, N, B, lam = 7, 10, 5, 0.8
    gen = torch.Generator().manual_seed(1)
    sums, counts = ops.new_tiled_state(1, K, N, 8)
    cache = ops.new_index_cache(sums)
    history = []
    for t in range(30):
        means, labels = draw_means(gen, B, N) + torch.rand(B, N, generator=gen), torch.randint(0, K, (1, B), generator=gen)
        ops.accumulate_means(means, labels, sums, counts, lam ** -t, cache)
        history.append((means.double(), labels[0]))
    end = len(history) - 1
    direct_sums = torch.zeros(K, N, dtype=torch.float64)
    direct_counts = torch.zeros(K, dtype=torch.float64)
    for t, (means, labels) in enumerate(history):
        direct_sums.index_add_(0, labels, means * lam ** (end - t))
        direct_counts.index_add_(0, labels, torch.full((B,), lam ** (end - t), dtype=torch.float64))
    present = direct_counts > 0
    got_means = dense(sums[0], N)[present] / counts[0, present, None]
    torch.testing.assert_close(got_means, direct_sums[present] / direct_counts[present, None], rtol=1e-12, atol=1e-12)
    inc = ops.si_from_cache(cache, counts[0])
    # The full reduction of the directly decayed state: means from decayed sums and counts.
    means = direct_sums[present] / direct_counts[present, None]
    mu_max = means.max(0).values
    rest = (means.sum(0) - mu_max) / (int(present.sum()) - 1)
    torch.testing.assert_close(inc.si[:N], (mu_max - rest) / (mu_max + rest + 1e-7), rtol=1e-12, atol=1e-12)


@needs_extension
def test_bad_labels_and_shapes_are_one_line_errors_and_change_nothing():
    sums, counts = ops.new_tiled_state(2, 4, 10, 8)
    cache = ops.new_index_cache(sums)
    means = torch.rand(3, 10)
    with pytest.raises(ValueError, match=r"labels out of range: label 4 is not in \[0, K\) with K = 4"):
        ops.accumulate_means(means, torch.tensor([[0, 1, 2], [0, 4, 1]]), sums, counts, 1.0, cache)
    assert not sums.any() and not counts.any()
    with pytest.raises(ValueError, match=r"labels must be \[R, B\] = \[2, 3\]"):
        ops.accumulate_means(means, torch.tensor([0, 1, 2]), sums, counts)
    with pytest.raises(ValueError, match="does not fit 20 units"):
        ops.accumulate_means(torch.rand(3, 20), torch.zeros(2, 3, dtype=torch.int64), sums, counts)
    with pytest.raises(ValueError, match="cache must be contiguous float64"):
        ops.accumulate_means(means, torch.zeros(2, 3, dtype=torch.int64), sums, counts, 1.0, cache[:4])
    with pytest.raises(TypeError, match="means must be float32"):
        ops.accumulate_means(means.double(), torch.zeros(2, 3, dtype=torch.int64), sums, counts)


@needs_extension
def test_opcheck_tiled_ops():
    sums, counts = ops.new_tiled_state(2, 5, 11, 4)
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (2, 6), generator=gen)
    torch.library.opcheck(torch.ops.selectivity.accumulate_means.default,
                          (torch.rand(6, 11, generator=gen), labels, 2.0, sums, counts, ops.new_index_cache(sums),
                           torch.zeros(2, dtype=torch.int64)))
    torch.library.opcheck(torch.ops.selectivity.accumulate_means.default,
                          (torch.rand(6, 11, generator=gen), labels, 1.0, sums, counts, None, None))
    torch.library.opcheck(torch.ops.selectivity.index_cache.default, (sums[0], counts[0], ops.new_index_cache(sums)))
    torch.library.opcheck(torch.ops.selectivity.index_cache.default,
                          (sums[0], counts[0], ops.new_index_cache(sums, bounds=False)))
    cache = ops.index_cache(sums[0], counts[0])
    torch.library.opcheck(torch.ops.selectivity.layer_si_means.default, (cache, counts[0], 1e-7, None, [5, 6]))
    torch.library.opcheck(torch.ops.selectivity.si_from_cache.default, (cache, counts[0], 1e-7, None))


@needs_extension
def test_index_cache_without_bounds_equals_the_first_rows_of_the_full_cache():
    """compute()'s cache ([3, units]: μ_max, class, sum of means) is the full cache's μ_max and class
    bit for bit and its sum within rounding, also on dead units and ties; its sum of the exact means
    is never below μ_max, so μ_-max is not a rounding below 0; accumulate_means refuses it in one line."""
    gen = torch.Generator().manual_seed(5)
    for _, counts, sums_row in _caches_with_edge_cases(gen):
        lean = ops.index_cache(sums_row, counts, bounds=False)
        full = ops.index_cache(sums_row, counts)
        assert lean.shape[0] == 3 and torch.equal(lean[:2], full[:2])
        torch.testing.assert_close(lean[2], full[2], rtol=1e-14, atol=0)
        torch.testing.assert_close(lean, ops.index_cache_reference(sums_row, counts, bounds=False),
                                   rtol=1e-12, atol=1e-12)
        assert bool((ops.si_from_cache(lean, counts).mu_rest >= 0).all())
    # One class present per unit, means whose product with 1/count differs from the quotient in the
    # last bit: the sum of products could fall below μ_max; the exact sum cannot.
    sums, counts = ops.new_tiled_state(1, 2, 64, 8)
    ops.accumulate_means(torch.rand(3, 64, generator=gen) * 1e-5, torch.zeros(1, 3, dtype=torch.int64), sums,
                         counts)
    lean = ops.index_cache(sums[0], counts[0], bounds=False)
    assert bool((lean[2] >= lean[0]).all()) and bool((ops.si_from_cache(lean, counts[0]).mu_rest == 0).all())
    sums, counts = ops.new_tiled_state(1, 4, 10, 8)
    with pytest.raises(ValueError, match="needs a cache with bounds"):
        ops.accumulate_means(torch.rand(2, 10), torch.zeros(1, 2, dtype=torch.int64), sums, counts, 1.0,
                             ops.new_index_cache(sums, bounds=False))


def _caches_with_edge_cases(gen):
    """(cache, counts) pairs: no class present, one class, several with dead units and ties."""
    out = []
    for K, steps in ((4, 0), (4, 1), (7, 6)):
        sums, counts = ops.new_tiled_state(1, K, 70, 8)
        for _ in range(steps):
            labels = torch.randint(0, K if steps > 1 else 1, (1, 5), generator=gen)
            ops.accumulate_means(draw_means(gen, 5, 70), labels, sums, counts)
        out.append((ops.index_cache(sums[0], counts[0]), counts[0], sums[0]))
    return out


@needs_extension
def test_si_from_cache_and_layer_means_ops_equal_the_reference():
    """The C++ ops: si_from_cache bit for bit as the Python reference (the same tensor ops), with
    and without a shift; layer_si_means (the per-step SI: its CPU kernel a loop, the ATen version
    with a shift) each layer's mean within 1e-15 of the reference's slice means."""
    gen = torch.Generator().manual_seed(5)
    lengths = [3, 50, 17]
    for cache, counts, sums in _caches_with_edge_cases(gen):
        for shift in (None, ops.lowest_class_means(sums, counts)):
            got = ops.si_from_cache(cache, counts, 1e-7, shift)
            ref = ops.si_from_cache_reference(cache, counts, 1e-7, shift)
            for a, b in zip(got, ref):
                assert torch.equal(a, b)
            layers = ops.layer_si_means(cache, counts, lengths, 1e-7, shift)
            expected = torch.stack([part.mean() for part in ref.si[:70].split(lengths)])
            torch.testing.assert_close(layers, expected, rtol=0, atol=1e-15)
            torch.testing.assert_close(ops.layer_si_means_reference(cache, counts, lengths, 1e-7, shift),
                                       expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="the layers have 71 units, the cache 64"):
        ops.layer_si_means(ops.new_index_cache(ops.new_tiled_state(1, 3, 60, 8)[0]), torch.zeros(3, dtype=torch.float64),
                           [71])


def test_reference_fallback_gives_the_kernels_results(monkeypatch):
    """SELECTIVITY_FORCE_REFERENCE=1 (or no extension) runs the reference through the same calls."""
    monkeypatch.setenv("SELECTIVITY_FORCE_REFERENCE", "1")
    gen = torch.Generator().manual_seed(3)
    sums, counts = ops.new_tiled_state(1, 6, 9, 4)
    cache = ops.new_index_cache(sums)
    for _ in range(5):
        ops.accumulate_means(draw_means(gen, 4, 9), torch.randint(0, 6, (1, 4), generator=gen), sums, counts, 1.0, cache)
    full = ops.selectivity_index_reference(dense(sums[0], 9), counts[0].long())
    inc = ops.si_from_cache(cache, counts[0])
    assert torch.equal(inc.pref_class[:9], full.pref_class)
    torch.testing.assert_close(inc.si[:9], full.si, rtol=1e-12, atol=1e-12)


@needs_cuda
@needs_extension
def test_cuda_tiled_ops_match_the_cpu():
    gen = torch.Generator().manual_seed(4)
    R, K, N, B = 2, 50, 300, 32
    cpu, gpu = ops.new_tiled_state(R, K, N), ops.new_tiled_state(R, K, N, device="cuda")
    cpu_cache, gpu_cache = ops.new_index_cache(cpu[0]), ops.new_index_cache(gpu[0])
    for step in range(40):
        means, labels = draw_means(gen, B, N), torch.randint(0, min(K, 5 + step), (R, B), generator=gen)
        ops.accumulate_means(means, labels, *cpu, 1.0, cpu_cache)
        ops.accumulate_means(means.cuda(), labels.cuda(), *gpu, 1.0, gpu_cache)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(gpu[1].cpu(), cpu[1])
    full = ops.index_cache(gpu[0][0], gpu[1][0])
    assert torch.equal(gpu_cache[:2], full[:2])
    assert torch.equal(full[1].cpu(), ops.index_cache(cpu[0][0], cpu[1][0])[1])
    lengths = [100, 150, 50]  # the per-step SI: the ATen version on the GPU, the CPU kernel's loop
    torch.testing.assert_close(ops.layer_si_means(gpu_cache, gpu[1][0], lengths).cpu(),
                               ops.layer_si_means(cpu_cache, cpu[1][0], lengths), rtol=0, atol=1e-12)
