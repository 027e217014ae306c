"""Linear minibatch CKA with the unbiased HSIC estimator (Nguyen, Raghu & Kornblith 2021).

For a minibatch of n images, each layer's output flattened per image is X [n, p] and its Gram
matrix is K = X Xᵀ with the diagonal zeroed. The unbiased estimator is

    HSIC_1(K, L) = [tr(KL) + (1ᵀK1)(1ᵀL1)/((n−1)(n−2)) − 2/(n−2)·1ᵀKL1] / (n(n−3)),

it is averaged over minibatches, and CKA = HSIC(K,L) / sqrt(HSIC(K,K)·HSIC(L,L)). Every
minibatch term is unbiased for the HSIC of the distribution its n images were drawn from, so
when the batches are random samples of the data the average converges to the full-data value as
batches accumulate, at any batch size (the biased estimator does not). When they are not — the
val split of an ImageFolder lists images class by class and an unshuffled loader keeps that
order — each batch estimates the HSIC *within* one or two classes, and the average converges to
a different, biased number. The analyses therefore draw val batches in a fixed shuffled order
(selectivity/analyses/common.py ``val_loader``); docs/analyses.md gives the size of the effect.

Why this is fast (torch_cka recomputes every Gram inside its layer-pair loop and keeps every hooked
feature map alive):
- each layer's Gram is computed once per batch, inside the forward hook, so the feature map can be
  freed as soon as the forward pass moves on (memory O(L·n²), not O(L·n·p));
- all pairs come from one stack of Grams G [L, n, n] with two small matmuls: for symmetric Grams
  tr(K_i K_j) = Σ K_i ⊙ K_j (flattened G @ Gᵀ) and 1ᵀK_iK_j1 = (K_i1)·(K_j1), so no n×n×n
  product is ever formed.
"""
from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from selectivity.analyses.common import eval_no_grad
from selectivity.analyses.features import LOGITS, base_name, collect_features
from selectivity.errors import UnitsError
from selectivity.units import UnitHooks, resolve_units


# ---------------------------------------------------------------- the estimator

@contextlib.contextmanager
def _ieee_fp32_matmul():
    """Full-precision fp32 matmuls (no TF32) for the duration: TF32 keeps 10 mantissa bits, which
    is far too few for Gram entries that the HSIC terms then subtract from each other."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def gram(features: torch.Tensor) -> torch.Tensor:
    """Linear Gram matrix [n, n] of a batch [n, ...] (each image flattened), in fp32 or fp64.

    Precision: the columns are centred over the batch before the product. The unbiased HSIC is
    exactly invariant to that (it changes K by a1ᵀ + 1aᵀ + c·11ᵀ, which the estimator cancels),
    but it removes the large shared mean of post-ReLU features, which would otherwise dominate
    every Gram entry and cancel only in the HSIC sums, in fp32 (tools/bench_cka.py measures both
    against an all-fp64 run; docs/analyses.md has the figures). The Gram is fp32 (fp16/bf16
    inputs are upcast; fp64 stays fp64) so the dominant n²·p product runs at full speed on GPUs whose fp64 rate is a small fraction of fp32;
    the HSIC terms are then formed in fp64, where their remaining cancellation is harmless.
    """
    if features.dim() < 2:
        raise ValueError(f"features must be [n, ...] with a per-image feature axis, "
                         f"got shape {tuple(features.shape)}")
    x = features.detach()
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        x = x.permute(0, 2, 3, 1)  # NHWC view is contiguous; feature order does not matter
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.reshape(x.shape[0], -1).to(dtype)
    x = x - x.mean(0, keepdim=True)
    with _ieee_fp32_matmul():
        k = x @ x.T
    return (k + k.T) * 0.5  # exactly symmetric, which the trace identity below relies on


def hsic_matrix(grams: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC_1 for every pair of a stack of Gram matrices [L, n, n] → [L, L] float64."""
    if grams.dim() != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"grams must be [L, n, n], got shape {tuple(grams.shape)}")
    n = grams.shape[1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 images per batch, got {n}")
    k = grams.to(torch.float64, copy=True)
    k.diagonal(dim1=1, dim2=2).zero_()
    flat = k.reshape(k.shape[0], n * n)
    trace = flat @ flat.T                 # tr(K_i K_j) for symmetric Grams
    rows = k.sum(2)                       # K_i 1
    totals = rows.sum(1)                  # 1ᵀ K_i 1
    cross = rows @ rows.T                 # 1ᵀ K_i K_j 1
    return (trace + torch.outer(totals, totals) / ((n - 1) * (n - 2))
            - cross * (2.0 / (n - 2))) / (n * (n - 3))


def _pick(tensors: Mapping[str, torch.Tensor], names: Sequence[str], what: str):
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"{what} has no entry {missing[0]!r}; it has: {', '.join(tensors)}")
    return [tensors[n] for n in names]


class MinibatchCKA:
    """Streamed linear CKA between layers, accumulated over minibatches.

    ``MinibatchCKA(names)`` compares the layers of one network with each other (square matrix);
    ``MinibatchCKA(names, names_b)`` compares network A's layers (rows) with network B's (columns)
    — ``update(feats_a, feats_b)`` then takes both networks' features for the same images.
    Each minibatch counts equally in the average (as in the paper and torch_cka).
    """

    def __init__(self, layer_names: Sequence[str], layer_names_b: Sequence[str] | None = None):
        self.rows = list(layer_names)
        self.cols = list(layer_names_b) if layer_names_b is not None else list(self.rows)
        self.between = layer_names_b is not None
        if not self.rows or not self.cols:
            raise ValueError("MinibatchCKA needs at least one layer name on each side")
        self._hsic_sum: torch.Tensor | None = None  # [M, M] float64 over the stacked layers
        self.batches = 0

    def update(self, features: Mapping[str, torch.Tensor],
               features_b: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one minibatch of features ({name: [n, ...]}, the same n images for every layer)."""
        self._check_b(features_b)
        grams_b = None if features_b is None else {
            name: gram(x) for name, x in zip(self.cols, _pick(features_b, self.cols, "features_b"))}
        self.update_grams({name: gram(x) for name, x in
                           zip(self.rows, _pick(features, self.rows, "features"))}, grams_b)

    def update_grams(self, grams: Mapping[str, torch.Tensor],
                     grams_b: Mapping[str, torch.Tensor] | None = None) -> None:
        """Add one minibatch given each layer's Gram (from ``gram``), e.g. computed in a hook."""
        self._check_b(grams_b)
        stack = _pick(grams, self.rows, "grams")
        if self.between:
            stack += _pick(grams_b, self.cols, "grams_b")
        sizes = {g.shape[0] for g in stack}
        if len(sizes) != 1:
            raise ValueError(f"all layers must see the same images; "
                             f"got batch sizes {sorted(sizes)}")
        device = stack[0].device
        hsic = hsic_matrix(torch.stack([g.to(device) for g in stack]))
        self._hsic_sum = hsic if self._hsic_sum is None else self._hsic_sum + hsic
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """CKA matrix [len(rows), len(cols)], float64 on the CPU.

        An entry is NaN where a layer's HSIC with itself is not positive (a constant layer, e.g.
        all units dead): CKA is 0/0 there.
        """
        if self._hsic_sum is None:
            raise RuntimeError("MinibatchCKA.compute() called before any update()")
        hsic = (self._hsic_sum / self.batches).cpu()
        self_hsic = hsic.diagonal()
        r = len(self.rows)
        col = slice(r, None) if self.between else slice(0, r)
        denom = torch.sqrt(torch.outer(self_hsic[:r], self_hsic[col]))
        return hsic[:r, col] / denom

    def _check_b(self, b) -> None:
        if self.between and b is None:
            raise ValueError("this MinibatchCKA compares two networks: "
                             "pass network B's features too")
        if not self.between and b is not None:
            raise ValueError("this MinibatchCKA compares layers within one network; "
                             "construct it with layer_names_b to compare two networks")


def _batches(loader, max_batches, min_size=1):
    """The images of the first ``max_batches`` batches; batches of fewer than ``min_size`` images
    (a short last batch) are skipped but still count towards ``max_batches``."""
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            return
        if batch[0].shape[0] >= min_size:
            yield batch[0]


MIN_BATCH = 4  # the unbiased HSIC needs n ≥ 4


def cka_over_loader(model: nn.Module, loader, layer_names: Sequence[str],
                    max_batches: int | None = None, model_b: nn.Module | None = None,
                    layer_names_b: Sequence[str] | None = None, include_logits: bool = True
                    ) -> tuple[tuple[list[str], list[str]], torch.Tensor]:
    """Linear minibatch CKA over a loader of ``(images, labels)`` already on the model's device.

    Within one network (``model_b`` None): the square matrix between ``layer_names`` (+ logits).
    Between two networks: rows are ``model``'s layers, columns ``model_b``'s (``layer_names_b``,
    default the same names), both fed the same images. Runs in eval mode under no_grad and restores
    each model's mode. Returns ``((row_names, col_names), matrix)`` with a float64 CPU matrix.
    A batch of fewer than 4 images (e.g. the short last batch of a split) is skipped: the unbiased
    estimator is undefined there. It is an error if every batch is that small.
    """
    extra = [LOGITS] if include_logits else []
    rows = list(layer_names) + extra
    if model_b is None:
        if layer_names_b is not None:
            raise ValueError("layer_names_b given without model_b")
        cka, cols = MinibatchCKA(rows), rows
    else:
        names_b = list(layer_names if layer_names_b is None else layer_names_b)
        cols = names_b + extra
        cka = MinibatchCKA(rows, cols)
    models = (model,) if model_b is None else (model, model_b)
    with eval_no_grad(*models), contextlib.ExitStack() as stack:
        run_a = stack.enter_context(collect_features(model, layer_names, include_logits, gram))
        run_b = None if model_b is None else stack.enter_context(
            collect_features(model_b, names_b, include_logits, gram))
        for images in _batches(loader, max_batches, MIN_BATCH):
            cka.update_grams(run_a(images), None if run_b is None else run_b(images))
    if not cka.batches:
        raise ValueError(f"no batch of at least {MIN_BATCH} images: the unbiased HSIC needs them")
    return (rows, cols), cka.compute()


def relu_active_fraction(model: nn.Module, loader, layer_names: Sequence[str],
                         max_batches: int | None = None) -> dict[str, float]:
    """Fraction of a layer's outputs that are > 0 over a loader: a direct proxy for linearity.

    A network whose ReLUs are (almost) all active computes an (almost) linear function of its
    input. Counted per element of the output (all images, units and positions); eval mode, no_grad.
    """
    names = list(layer_names)
    active = dict.fromkeys(names, 0)
    total = dict.fromkeys(names, 0)
    with eval_no_grad(model), collect_features(model, names, include_logits=False,
                                             reduce=lambda y: ((y > 0).sum(), y.numel())) as run:
        for images in _batches(loader, max_batches):
            for name, (count, numel) in run(images).items():
                active[name] = active[name] + count  # stays on the device: no sync per batch
                total[name] += numel
    if not any(total.values()):
        raise ValueError("the loader yielded no batches")
    return {n: float(active[n]) / total[n] for n in names}


class ReluActivity:
    """Active fraction of every ReLU inside each named module, accumulated over forward passes.

    Yielded by ``count_relu_activity``. For a layer name L, the ReLUs counted are the ``nn.ReLU``
    modules named L or L.* (so a stage ``layer2`` covers every ReLU of its blocks, and a ReLU module
    names itself). Every call of a ReLU counts (torchvision blocks call one ``relu`` module two or
    three times), element by element: all images, units and positions. ``F.relu`` calls inside a
    ``forward`` are not modules and are not seen.
    """

    def __init__(self, layer_names: Sequence[str]):
        self.names = list(layer_names)
        self.active: dict[str, object] = dict.fromkeys(self.names, 0)
        self.total: dict[str, int] = dict.fromkeys(self.names, 0)
        self.relus: dict[str, list[str]] = {n: [] for n in self.names}

    def fractions(self) -> dict[str, float]:
        """{layer: fraction of ReLU outputs > 0}; NaN for a layer with no ReLU module or no data."""
        return {n: float(self.active[n]) / self.total[n] if self.total[n] else math.nan
                for n in self.names}


@contextlib.contextmanager
def count_relu_activity(model: nn.Module, layer_names: Sequence[str]) -> Iterator[ReluActivity]:
    """Hook every ``nn.ReLU`` inside the named modules and count its positive outputs while the
    caller runs forward passes; yields a ``ReluActivity``. The fraction of active ReLUs is a direct
    proxy for linearity: with every ReLU active, a ReLU network computes a linear function. Counts
    stay on the model's device until ``fractions()`` (no sync per batch). Hooks removed on exit."""
    # Unknown names: the usual error.
    acc = ReluActivity(resolve_units(model, list(layer_names), order="given", names_first=True))
    try:
        relus = resolve_units(model, "relu")
    except UnitsError:  # no ReLU module at all: every fraction is NaN
        relus = OrderedDict()
    owners: dict[str, list[str]] = {}
    for relu in relus:
        for layer in acc.names:
            if relu == layer or relu.startswith(layer + "."):
                owners.setdefault(relu, []).append(layer)
                acc.relus[layer].append(relu)

    def count(reported, output):
        layers = owners[base_name(reported)]  # every call of a ReLU counts
        positive, numel = (output > 0).sum(), output.numel()
        for layer in layers:
            acc.active[layer] = acc.active[layer] + positive
            acc.total[layer] += numel

    if not owners:
        yield acc
        return
    with UnitHooks(model, OrderedDict((n, relus[n]) for n in owners), count):
        yield acc
