"""Units and their class selectivity: the layers that hold the units, and the units' ranking.

Step 1 of the ablation protocol (selectivity/analyses/ablation/): **rank** the units of every
tracked layer by class selectivity (SI from class means, the fused ops of selectivity/ops.py) on a
*ranking split* (selectivity/train/splits.py), never on the data the accuracy is then measured
on. The ranking also keeps each unit's mean activation over the split (the ``mode="mean"`` fill).

Layers and units. A *layer* is any module whose forward output ``[B, U, H, W]`` or ``[B, U]``
holds U units (a channel's activation is its spatial mean, as everywhere in this project). By
default the layers are the residual blocks (their post-ReLU outputs, the units the tracker
measures); any model can name its own with a units spec of selectivity/units/
(``resolve_units``, the one resolver of layer names).

Ranking, the ranking split and the ablations all raise ``AblationError`` (selectivity/errors.py,
importable from here too), the one error class that tools/ablate.py reports.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Iterable

import torch
from torch import nn

from selectivity import ops
from selectivity.errors import AblationError  # noqa: F401  (importable from here too)
from selectivity.tracker import EPS, SelectivityTracker
from selectivity.units import resolve_units


# ---------------------------------------------------------------------------- ranking

@dataclasses.dataclass
class UnitRanking:
    """One layer's units as measured on the ranking split (float64/int64, on the CPU)."""
    si: torch.Tensor          # [U] selectivity index
    pref_class: torch.Tensor  # [U] preferred class
    mean: torch.Tensor        # [U] mean activation over all ranking images (the "mean" fill)
    order: torch.Tensor       # [U] unit indices, most selective first (ties: lower index first)
    images: int

    @property
    def units(self) -> int:
        return int(self.si.numel())

    def most(self, k: int) -> torch.Tensor:
        return self.order[:k]

    def least(self, k: int) -> torch.Tensor:
        return self.order.flip(0)[:k]


def ranking_from_state(sums: torch.Tensor, counts: torch.Tensor, eps: float = EPS) -> UnitRanking:
    """A ``UnitRanking`` from fused per-class sums/counts (``ops.accumulate``)."""
    r = ops.selectivity_index(sums, counts, eps)
    si = r.si.double().cpu()
    n = int(counts.sum())
    mean = (sums.sum(0) / max(n, 1)).double().cpu()
    order = torch.sort(-si, stable=True).indices
    return UnitRanking(si, r.pref_class.cpu(), mean, order, n)


@torch.no_grad()
def rank_units(model: nn.Module, loader: Iterable, layers="blocks", num_classes: int | None = None,
               eps: float = EPS) -> "OrderedDict[str, UnitRanking]":
    """SI (and mean activation) of every unit of ``layers`` over ``loader`` (eval mode, no grad).

    ``loader`` yields ``(images, labels)`` on the model's device. ``layers``: a units spec
    (selectivity/units/; default every residual block). ``num_classes``: taken from
    ``loader.num_classes`` when not given.
    """
    layers = resolve_units(model, layers)
    K = num_classes if num_classes is not None else getattr(loader, "num_classes", None)
    if K is None:
        raise AblationError("rank_units needs num_classes (the loader has no .num_classes)")
    tracker = SelectivityTracker(model, K, layers, eps=eps)
    # Eval mode for a model in training mode; a model already set up for measuring (e.g. inside
    # bn_statistics(model, "batch"), BatchNorm in train mode) keeps every module's flag.
    flags = [m.training for m in model.modules()]
    if model.training:
        model.eval()
    try:
        for images, labels in loader:
            with tracker.track(labels):
                model(images)
    finally:
        tracker.remove()
        for m, t in zip(model.modules(), flags):
            m.training = t
    states = tracker.states.states
    missing = [n for n in layers if n not in states]
    if missing:
        raise AblationError(f"layers never ran in the forward pass: {', '.join(missing)}")
    return OrderedDict((n, ranking_from_state(*states[n], eps)) for n in layers)
