"""The numbers the study reads from its analysis tools' records (the tools run as subprocesses,
analysis_runs.py): the ablation's area under the normalized-accuracy curve, and orientation
selectivity by layer group with its ablation (paper 3)."""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass

from selectivity.analyses.orientation.run import layer_groups

LOW, HIGH = ("stem", "layer1"), ("layer3",)  # the layer groups paper 3's "low" and "high" mean here


def _v(x) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else None


def ablation_auc(path: str) -> dict:
    """{epoch: {condition: AUC}} from one ablation.jsonl: AUC = mean normalized accuracy over the
    grid (as tools/ablate.py reports it), then the mean over stages."""
    acc = defaultdict(list)
    with open(os.path.join(path, "ablation.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r.get("norm_acc1") is not None and r.get("epoch") is not None:
                acc[(round(float(r["epoch"]), 6), r.get("stage"), r.get("condition"))].append(
                    r["norm_acc1"])
    by_stage = defaultdict(lambda: defaultdict(list))
    for (epoch, _stage, cond), vals in acc.items():
        by_stage[epoch][cond].append(sum(vals) / len(vals))
    return {e: {c: sum(v) / len(v) for c, v in conds.items()} for e, conds in by_stage.items()}


@dataclass
class Orientation:
    """One orientation.jsonl record reduced to the study's numbers: gOSI of the live units and
    its permuted control per layer group; after ablating each low layer's top or bottom half by
    gOSI, the val loss increase and the centred shift invariance of the higher stage outputs
    ({("loss" | "shift", "top" | "bottom"): value}, means over the low layers)."""
    gosi_by_group: dict
    control_by_group: dict
    ablation: dict
    shift_base: float | None

    def gosi(self, groups) -> float | None:
        return _mean([self.gosi_by_group.get(g) for g in groups])

    def excess(self, groups) -> float | None:
        g, c = self.gosi(groups), _mean([self.control_by_group.get(x) for x in groups])
        return None if g is None or c is None else g - c


def _higher_shift(entry: dict) -> float | None:
    """The mean centred shift invariance over the stage outputs above the low layers (the
    ablated layers' own stage is damaged directly, not through its shift invariance)."""
    sic = entry.get("shift_invariance_centered") or {}
    return _mean([_v(x) for layer, x in sic.items() if layer not in LOW])


def orientation_values(rec: dict) -> Orientation:
    groups = {layer: g for g, members in layer_groups(list(rec["layers"])).items()
              for layer in members}
    gosi, control = defaultdict(list), defaultdict(list)
    for layer, st in rec["layers"].items():
        gosi[groups[layer]].append(_v(st.get("gosi_mean")))
        control[groups[layer]].append(_v(st.get("control_gosi_mean")))
    abl = defaultdict(list)
    for row in rec.get("ablation") or []:
        if groups.get(row["layer"]) in LOW:
            abl[("loss", row["group"])].append(_v(row.get("loss_increase")))
            abl[("shift", row["group"])].append(_higher_shift(row))
    return Orientation({g: _mean(v) for g, v in gosi.items()},
                       {g: _mean(v) for g, v in control.items()},
                       {k: _mean(v) for k, v in abl.items()},
                       _higher_shift(rec.get("baseline") or {}))
