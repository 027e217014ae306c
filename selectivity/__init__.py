"""Class selectivity of every unit, measured, regularized and ablated in any training loop.

    import selectivity as sel
    tracker = sel.SelectivityTracker(model, num_classes=10)          # residual-block outputs
    reg = sel.SelectivityRegularizer(model, num_classes=10)
    for images, labels in loader:
        with tracker.track(labels):
            logits = model(images)
        loss = F.cross_entropy(logits, labels) - alpha * reg.term(labels)
        ...
    per_layer = tracker.compute()                                     # {layer: LayerSelectivity}

Which units: ``selectivity.units`` (presets ``blocks``/``relu``/``bn``, names, globs,
predicates). Measuring the network you mean: ``bn_statistics`` (BatchNorm statistics recomputed
before a measurement). The compiled kernels: ``accumulate``, ``selectivity_index``.
"""
from __future__ import annotations

from selectivity.errors import UnitsError
from selectivity.evaluation import BN_MODES, bn_statistics, recalibrate_bn
from selectivity.ops import SIResult, accumulate, has_extension, new_state, selectivity_index
from selectivity.regularizer import SelectivityRegularizer, selectivity_reg
from selectivity.tracker import LayerSelectivity, SelectivityTracker, summarize
from selectivity.unit_ranking import UnitRanking, rank_units
from selectivity.units import PRESETS, UnitHooks, count_units, resolve_units, unit_means

__version__ = "0.2.0"

__all__ = [
    "SelectivityTracker", "LayerSelectivity", "summarize",
    "SelectivityRegularizer", "selectivity_reg",
    "resolve_units", "UnitHooks", "count_units", "unit_means", "PRESETS", "UnitsError",
    "bn_statistics", "recalibrate_bn", "BN_MODES",
    "rank_units", "UnitRanking",
    "accumulate", "selectivity_index", "new_state", "SIResult", "has_extension",
    "__version__",
]
