"""Linear minibatch CKA, ours (selectivity/analyses/cka/) vs torch_cka, on the same models, layers
and images (what tools/bench_cka.py prints; its docstring says how).

If torch_cka is not installed, ``PairLoopCKA``, a faithful re-implementation of its algorithm,
stands in (a pair loop that recomputes both Grams for every pair, keeps every hooked feature map,
fp32 sums), and the output says so.
"""
from __future__ import annotations

import copy
import time
import warnings
from functools import partial
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from selectivity.analyses.cka.cka import cka_over_loader
from selectivity.analyses.features import base_name, collect_features
from selectivity.train.models import build_model
from selectivity.units import UnitHooks, resolve_units

DEFAULT_LAYERS = {"resnet20": ["relu", "layer1", "layer2", "layer3", "fc"],
                  "resnet18": ["layer1", "layer2", "layer3", "layer4", "fc"]}


class PairLoopCKA:
    """torch_cka 0.21's algorithm (CKA.compare), for when the package is not installed."""

    def __init__(self, model1, model2, model1_layers, model2_layers):
        self.models, self.features = (model1, model2), ({}, {})
        self.sizes = (len(model1_layers), len(model2_layers))
        # torch_cka hooks the named modules and keeps each one's last output; the package's one
        # hook mechanism does the same here (a repeated call reports name#k: keep the name).
        self.hooks = [UnitHooks(model, resolve_units(model, names, order="given",
                                                     names_first=True),
                                partial(self._log, side))
                      for side, (model, names) in enumerate(((model1, model1_layers),
                                                             (model2, model2_layers)))]

    def _log(self, side, name, out):
        self.features[side][base_name(name)] = out

    @staticmethod
    def _hsic(K, L):
        n = K.shape[0]
        ones = torch.ones(n, 1, dtype=K.dtype)  # dtype: so it also runs on fp64 copies
        result = torch.trace(K @ L)
        result += ((ones.t() @ K @ ones @ ones.t() @ L @ ones) / ((n - 1) * (n - 2))).item()
        result -= ((ones.t() @ K @ L @ ones) * 2 / (n - 2)).item()
        return (1 / (n * (n - 3)) * result).item()

    def compare(self, loader):
        hsic = torch.zeros(*self.sizes, 3)
        for x, *_ in loader:
            self.features[0].clear()
            self.features[1].clear()
            self.models[0](x)
            self.models[1](x)
            for i, feat1 in enumerate(self.features[0].values()):
                X = feat1.flatten(1)
                K = X @ X.t()
                K.fill_diagonal_(0.0)
                hsic[i, :, 0] += self._hsic(K, K) / len(loader)
                for j, feat2 in enumerate(self.features[1].values()):
                    Y = feat2.flatten(1)
                    L = Y @ Y.t()
                    L.fill_diagonal_(0)
                    hsic[i, j, 1] += self._hsic(K, L) / len(loader)
                    hsic[i, j, 2] += self._hsic(L, L) / len(loader)
        self.hsic_matrix = hsic[:, :, 1] / (hsic[:, :, 0].sqrt() * hsic[:, :, 2].sqrt())

    def export(self):
        return {"CKA": self.hsic_matrix}


def reference_impl():
    """(name, class) of the implementation to compare against."""
    try:
        from torch_cka import CKA
        from importlib.metadata import version
        return f"torch_cka {version('torch_cka')}", CKA
    except Exception as err:  # not installed, or broken with this torch
        return (f"torch_cka unavailable ({type(err).__name__}: {err}); using a faithful "
                "re-implementation of its pair-loop algorithm"), None


def run_reference(cls, model_a, model_b, layers, loader):
    a = copy.deepcopy(model_a)  # its hooks are never removed: work on copies
    b = a if model_b is model_a else copy.deepcopy(model_b)  # CKA(model, model) within one net
    if cls is None:
        cka = PairLoopCKA(a, b, layers, layers)
    else:
        cka = cls(a, b, model1_name="A", model2_name="B", model1_layers=layers,
                  model2_layers=layers, device="cpu")
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cka.compare(loader)
    return time.perf_counter() - start, cka.export()["CKA"].double()


def run_ours(model_a, model_b, layers, loader):
    start = time.perf_counter()
    _, matrix = cka_over_loader(model_a, loader, layers, include_logits=False,
                                model_b=None if model_b is model_a else model_b)
    return time.perf_counter() - start, matrix


class Replay(nn.Module):
    """Stands in for a network whose features were cached: fed a batch of batch indices, each
    named child (an Identity) emits that batch's cached feature map, so both implementations'
    hooks see the real features while the forward pass costs nothing. Times on replays are the
    CKA work alone, free of the forward passes' run-to-run noise."""

    def __init__(self, cached: list[dict[str, torch.Tensor]]):
        super().__init__()
        self.cached, self.names = cached, list(cached[0])
        for name in self.names:
            self.add_module(name, nn.Identity())

    def forward(self, index):
        feats = self.cached[int(index[0])]
        for name in self.names:
            out = getattr(self, name)(feats[name])
        return out


def replays(models, layers, loader):
    """A Replay per model, and a loader of batch indices in place of the images."""
    cached = [[], []]
    with torch.no_grad():
        for side, model in enumerate(models):
            with collect_features(model, layers, include_logits=False) as run:
                cached[side] = [run(x) for x, _ in loader]
    bs, n = loader.batch_size, len(loader.dataset)
    index = TensorDataset(torch.arange(n) // bs, torch.zeros(n, dtype=torch.long))
    return [Replay(c) for c in cached], DataLoader(index, batch_size=bs)


def timed(ref_cls, models, layers, loader, repeats):
    """Interleaved repeats (background load hits both alike) of ours and the reference; returns
    ({'ours', 'theirs'}: (min, max) seconds, {'ours', 'theirs'}: CKA matrix)."""
    times, out = {"ours": [], "theirs": []}, {}
    for _ in range(repeats):
        t, out["ours"] = run_ours(*models, layers, loader)
        times["ours"].append(t)
        t, out["theirs"] = run_reference(ref_cls, *models, layers, loader)
        times["theirs"].append(t)
    return {k: (min(v), max(v)) for k, v in times.items()}, out


def bench(model_name: str = "resnet20", layers: Sequence[str] | None = None,
          batch_size: int = 64, batches: int = 4, repeats: int = 5, within: bool = False,
          threads: int = 1, echo: Callable[[str], None] = print) -> dict:
    """Two freshly initialised networks (seeds 0 and 1; ``within``: the first with itself) on
    random 32×32 images: the CKA work alone and end to end, ours vs the reference, and both
    against an all-fp64 run. The lines go to ``echo``; returns {"work", "end_to_end": {"ours",
    "theirs": (min, max) seconds}, "max_abs_diff": {...}}."""
    torch.set_num_threads(threads)
    layers = layers or DEFAULT_LAYERS.get(model_name, ["layer1", "layer2", "layer3", "fc"])
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(model_name, 10, small_stem=True).eval())
    if within:
        models[1] = models[0]
    g = torch.Generator().manual_seed(0)
    n = batch_size * batches
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n, dtype=torch.long))
    loader = DataLoader(data, batch_size=batch_size)
    ref_name, ref_cls = reference_impl()

    replay_models, index_loader = replays(models, layers, loader)
    if within:
        replay_models[1] = replay_models[0]
    work, _ = timed(ref_cls, replay_models, layers, index_loader, repeats)
    total, cka = timed(ref_cls, models, layers, loader, repeats)
    models64 = [copy.deepcopy(m).double() for m in models]
    if within:
        models64[1] = models64[0]
    loader64 = [(x.double(), y) for x, y in loader]
    _, exact = run_ours(*models64, layers, loader64)
    # torch_cka's own algorithm in fp64: separates its estimator from its fp32 precision.
    _, pair_loop64 = run_reference(None, *models64, layers, loader64)

    echo(f"reference: {ref_name}")
    pairing = "A's layers × A's" if within else "×2 (seeds 0, 1), A's layers × B's"
    echo(f"{model_name} {pairing} {layers}, {batches} batches of {batch_size} random 32×32 "
         f"images, {torch.get_num_threads()} thread(s), min of {repeats} repeats")
    for label, t in (("CKA work (cached features)", work), ("end to end (with forwards)", total)):
        (o, o_max), (r, r_max) = t["ours"], t["theirs"]
        echo(f"  {label}: ours {o:.3f} s, torch_cka {r:.3f} s, ours ÷ torch_cka = "
             f"{o / r:.3f}   (slowest repeats {o_max:.3f} s, {r_max:.3f} s)")
    diffs = {name: (a - b).abs().max().item() for name, (a, b) in {
        "ours_vs_torch_cka": (cka["ours"], cka["theirs"]), "ours_vs_fp64": (cka["ours"], exact),
        "torch_cka_vs_fp64": (cka["theirs"], exact),
        "torch_cka_algorithm_fp64_vs_fp64": (pair_loop64, exact)}.items()}
    echo(f"  max |ours − torch_cka|                     = {diffs['ours_vs_torch_cka']:.2e}")
    echo(f"  max |ours − fp64 reference|                = {diffs['ours_vs_fp64']:.2e}")
    echo(f"  max |torch_cka − fp64 reference|           = {diffs['torch_cka_vs_fp64']:.2e}")
    echo(f"  max |torch_cka algorithm in fp64 − fp64 ref| = "
         f"{diffs['torch_cka_algorithm_fp64_vs_fp64']:.2e}")
    echo("  fp64 reference: our estimator on float64 copies of the models and images.")
    echo("  torch_cka forms uncentred fp32 Grams: their large shared mean cancels only inside")
    echo("  its HSIC sums, in fp32.")
    return {"work": work, "end_to_end": total, "max_abs_diff": diffs}
