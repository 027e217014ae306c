"""Linear minibatch CKA (selectivity/analyses/cka/cka.py): estimator properties, streaming, hooks;
the analyses' layer lists (selectivity/analyses/features.py over units.resolve_units)."""
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from selectivity.analyses.cka.cka import MinibatchCKA, cka_over_loader, gram, relu_active_fraction
from selectivity.analyses.features import LOGITS, collect_features, refuse_logits
from selectivity.errors import UnitsError
from selectivity.units import resolve_units


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests run thousands of tiny ops, for which OpenMP's thread hand-offs cost far more
    than the work on a loaded 2-core machine (measured: 28 s vs 0.7 s for the pair-loop test)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def naive_hsic(K: torch.Tensor, L: torch.Tensor) -> float:
    """HSIC_1 exactly as written in Nguyen et al. (2021), eq. 3, with ones vectors."""
    n = K.shape[0]
    K, L = K.clone(), L.clone()
    K.fill_diagonal_(0)
    L.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=K.dtype)
    value = (torch.trace(K @ L) + (one.T @ K @ one) * (one.T @ L @ one) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one.T @ K @ L @ one))
    return value.item() / (n * (n - 3))


def naive_cka(batches_a, batches_b) -> float:
    """Per-pair reference: uncentred fp64 Grams, HSIC averaged over batches, then the ratio."""
    kl = kk = ll = 0.0
    for x, y in zip(batches_a, batches_b):
        x, y = x.double().flatten(1), y.double().flatten(1)
        K, L = x @ x.T, y @ y.T
        kl, kk, ll = kl + naive_hsic(K, L), kk + naive_hsic(K, K), ll + naive_hsic(L, L)
    return kl / (kk * ll) ** 0.5


def cka(x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    m = MinibatchCKA(["x"], ["y"])
    step = batch or x.shape[0]
    for s in range(0, x.shape[0], step):
        m.update({"x": x[s:s + step]}, {"y": y[s:s + step]})
    return m.compute()[0, 0].item()


def related(n=96, p=20, q=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64) + 3.0
    y = torch.tanh(x[:, :q]) + 0.5 * torch.randn(n, q, generator=g, dtype=torch.float64)
    return x, y


def test_identical_features_give_one():
    x, _ = related()
    assert cka(x, x, batch=32) == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_maps_and_isotropic_scaling():
    x, y = related()
    q, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], dtype=torch.float64))
    base = cka(x, y, batch=32)
    assert cka(x @ q, y, batch=32) == pytest.approx(base, abs=1e-10)
    assert cka(7.5 * x, 0.01 * y, batch=32) == pytest.approx(base, abs=1e-10)


def test_not_invariant_to_general_invertible_maps():
    x, y = related()
    # Stretch one direction 100×: invertible, but it reweights the features' covariance.
    a = torch.eye(x.shape[1], dtype=torch.float64)
    a[0, 0] = 100.0
    assert abs(cka(x @ a, y, batch=32) - cka(x, y, batch=32)) > 0.05


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 20), n_batches=st.integers(1, 3), n_layers=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_all_pairs_equal_naive_pair_loop(n, n_batches, n_layers, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4, 4), (17,), (2, 3, 5), (8,)][:n_layers]
    # Post-ReLU-like features with a shared offset, in fp64 so only the algebra is compared.
    batches = [{f"l{i}": torch.relu(torch.randn(n, *s, generator=g, dtype=torch.float64)) + 0.5
                for i, s in enumerate(shapes)} for _ in range(n_batches)]
    names = list(batches[0])
    m = MinibatchCKA(names)
    for b in batches:
        m.update(b)
    got = m.compute()
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            want = naive_cka([f[a] for f in batches], [f[b] for f in batches])
            if torch.isfinite(torch.tensor(want)):
                assert got[i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_between_networks_is_the_off_diagonal_block():
    g = torch.Generator().manual_seed(1)
    a = {"a1": torch.randn(16, 6, generator=g), "a2": torch.randn(16, 2, 3, generator=g)}
    b = {"b1": torch.randn(16, 5, generator=g) + a["a1"][:, :5]}
    both = MinibatchCKA(["a1", "a2", "b1"])
    both.update({**a, **b})
    rect = MinibatchCKA(["a1", "a2"], ["b1"])
    rect.update(a, b)
    assert rect.compute().shape == (2, 1)
    torch.testing.assert_close(rect.compute(), both.compute()[:2, 2:])


def test_fp32_gram_is_accurate_for_large_mean_features():
    # Post-ReLU maps ride on a large shared mean. The fp32 path centres before its Gram, so it
    # matches the fp64 path; an uncentred fp32 Gram (torch_cka's) loses ~3 digits on this input.
    g = torch.Generator().manual_seed(2)
    x = (torch.relu(torch.randn(64, 4096, generator=g, dtype=torch.float64)) + 100).float()
    y = (x.double()[:, :300] * 0.1 + torch.randn(64, 300, generator=g, dtype=torch.float64)
         + 100).float()
    fp64 = cka(x.double(), y.double())
    assert cka(x, y) == pytest.approx(fp64, abs=1e-6)
    kx, ky = (x @ x.T).double(), (y @ y.T).double()
    uncentred = naive_hsic(kx, ky) / (naive_hsic(kx, kx) * naive_hsic(ky, ky)) ** 0.5
    assert abs(uncentred - fp64) > 1e-4  # the case above is a real test of precision


def _full_data_unbiased_hsic(x, y):
    """HSIC_1 on the whole sample in feature space (O(N·p·q), no N×N Gram)."""
    n = x.shape[0]
    sx, sy = (x * x).sum(1), (y * y).sum(1)                 # diagonals of K and L
    trace = ((x.T @ y) ** 2).sum() - (sx * sy).sum()        # tr(K̃L̃)
    kx, ly = x @ x.sum(0) - sx, y @ y.sum(0) - sy           # K̃1, L̃1
    return ((trace + kx.sum() * ly.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (kx @ ly))
            / (n * (n - 3))).item()


def _full_data_cka(x, y):
    return _full_data_unbiased_hsic(x, y) / (
        _full_data_unbiased_hsic(x, x) * _full_data_unbiased_hsic(y, y)) ** 0.5


@pytest.mark.parametrize("dependent", [True, False])
def test_streamed_estimate_converges_to_full_data_estimate(dependent):
    # Every minibatch HSIC_1 is unbiased for the population HSIC, so the mean over many small
    # batches approaches the full-data unbiased CKA. Tolerance: 4 standard errors, estimated from
    # 10 disjoint groups of batches (not a guessed number). The biased minibatch CKA (centred
    # Grams with diagonals) must miss by far more than that when X and Y are independent.
    g = torch.Generator().manual_seed(3)
    n, n_batches, groups = 16, 200, 10
    x = torch.randn(n * n_batches, 6, generator=g, dtype=torch.float64) + 2
    noise = torch.randn(n * n_batches, 4, generator=g, dtype=torch.float64)
    y = (x[:, :4] * 0.5 + noise) if dependent else noise
    per = n_batches // groups * n
    group_ckas = torch.tensor([cka(x[i:i + per], y[i:i + per], batch=n)
                               for i in range(0, x.shape[0], per)])
    se = group_ckas.std().item() / groups ** 0.5
    streamed = cka(x, y, batch=n)
    assert abs(streamed - _full_data_cka(x, y)) < 4 * se
    if not dependent:
        hb = torch.zeros(3, dtype=torch.float64)
        for s in range(0, x.shape[0], n):
            kx, ly = gram(x[s:s + n]), gram(y[s:s + n])
            hb += torch.stack([(kx * ly).sum(), (kx * kx).sum(), (ly * ly).sum()])
        biased = (hb[0] / (hb[1] * hb[2]).sqrt()).item()
        assert biased - streamed > 10 * se


def test_bad_input_errors_are_specific():
    m = MinibatchCKA(["a", "b"])
    with pytest.raises(KeyError, match="'b'"):
        m.update({"a": torch.randn(8, 3)})
    with pytest.raises(ValueError, match="at least 4"):
        m.update({"a": torch.randn(3, 3), "b": torch.randn(3, 3)})
    with pytest.raises(ValueError, match="batch sizes"):
        m.update({"a": torch.randn(8, 3), "b": torch.randn(9, 3)})
    with pytest.raises(RuntimeError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="two networks"):
        MinibatchCKA(["a"], ["b"]).update({"a": torch.randn(8, 3)})


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 3), relu=nn.ReLU(), pool=nn.AdaptiveAvgPool2d(1),
        flat=nn.Flatten(), fc=nn.Linear(4, 3)))


def test_collect_features_returns_the_named_layers_and_removes_hooks():
    net = small_net()
    x = torch.randn(5, 3, 8, 8)
    with collect_features(net, ["relu", "flat"]) as run:
        feats = run(x)
    assert list(feats) == ["relu", "flat", LOGITS]
    torch.testing.assert_close(feats["relu"], torch.relu(net.conv(x)))
    torch.testing.assert_close(feats["flat"], torch.relu(net.conv(x)).mean((2, 3)))
    torch.testing.assert_close(feats[LOGITS], net(x))
    assert all(not m._forward_hooks for m in net.modules())


def test_unknown_layer_names_the_layer_and_the_valid_ones():
    # The one resolver's error (selectivity/units/resolve.py): the name asked for and the modules there.
    with pytest.raises(UnitsError, match=r"no module named 'layer9'.*modules conv, relu, pool, "
                                         r"flat, fc"):
        with collect_features(small_net(), ["layer9"]):
            pass
    with pytest.raises(UnitsError, match="named twice"):
        with collect_features(small_net(), ["relu", "relu"]):
            pass


def staged_net():
    """A stem ``relu`` module beside ReLUs inside two stages."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(3, 4, 1), relu=nn.ReLU(),
        layer1=nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()),
        layer2=nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(4, 3)))


def test_layer_lists_resolve_in_the_order_given_with_names_before_presets():
    # One resolver (units.resolve_units) for every layer name. The analyses list layers: in the
    # order given, each glob expanding in module order, and a module's own name before a preset
    # of the same name. Its default (the tracker's units) is the union in module order, presets
    # first; both are pinned here.
    net = staged_net()
    listed = dict(order="given", names_first=True)
    assert list(resolve_units(net, ["fc", "layer*", "relu"], **listed)) == \
        ["fc", "layer1", "layer2", "relu"]
    assert list(resolve_units(net, ["fc", "layer*", "relu"])) == \
        ["relu", "layer1", "layer1.1", "layer2", "layer2.1", "fc"]
    assert list(resolve_units(net, "relu", names_first=True)) == ["relu"]
    assert list(resolve_units(net, "relu")) == ["relu", "layer1.1", "layer2.1"]
    assert list(resolve_units(net, ["layer2", "layer1"], order="given")) == ["layer2", "layer1"]
    with pytest.raises(UnitsError, match=r"layer 'layer1' is named twice"):
        resolve_units(net, ["layer1", "layer*"], **listed)
    assert list(resolve_units(net, ["layer1", "layer*"])) == ["layer1", "layer2"]  # a union
    with collect_features(net, ["layer2", "relu"]) as run:  # the analyses' hooks list so too
        assert list(run(torch.randn(2, 3, 4, 4))) == ["layer2", "relu", LOGITS]
    # The model output is always the last row: a user's list may not name it.
    with pytest.raises(UnitsError, match="'logits' is always included; leave it out"):
        refuse_logits(["layer1", LOGITS])
    refuse_logits(["layer1"])
    refuse_logits(None)


def test_cka_over_loader_within_and_between():
    net = small_net().train()
    g = torch.Generator().manual_seed(4)
    loader = [(torch.randn(8, 3, 8, 8, generator=g), torch.zeros(8)) for _ in range(3)]
    (rows, cols), within = cka_over_loader(net, loader, ["relu", "flat"], max_batches=2)
    assert rows == cols == ["relu", "flat", LOGITS] and within.dtype == torch.float64
    torch.testing.assert_close(within.diagonal(), torch.ones(3, dtype=torch.float64))
    assert net.training  # mode restored
    manual = MinibatchCKA(rows)
    with collect_features(net.eval(), ["relu", "flat"]) as run, torch.no_grad():
        for images, _ in loader[:2]:
            manual.update(run(images))
    torch.testing.assert_close(within, manual.compute())
    (rows_b, cols_b), between = cka_over_loader(net, loader, ["relu", "flat"], max_batches=2,
                                                model_b=net, layer_names_b=["conv"])
    assert (rows_b, cols_b) == (["relu", "flat", LOGITS], ["conv", LOGITS])
    torch.testing.assert_close(between[:, 1], within[:, 2])


def test_relu_active_fraction_counts_positive_outputs():
    net = nn.Sequential(OrderedDict(ident=nn.Identity(), relu=nn.ReLU()))
    a = torch.tensor([[1.0, -1.0, 0.0, 2.0], [3.0, 0.5, -2.0, -0.1]])  # 4 of 8 positive
    b = torch.tensor([[-1.0, -1.0, -1.0, 5.0]])                       # 1 of 4 positive
    frac = relu_active_fraction(net, [(a, None), (b, None)], ["ident", "relu"])
    assert frac == {"ident": pytest.approx(5 / 12), "relu": pytest.approx(5 / 12)}
    assert relu_active_fraction(net, [(a, None), (b, None)], ["relu"], max_batches=1) == \
        {"relu": pytest.approx(0.5)}
