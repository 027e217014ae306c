"""A run's selectivity as training recorded it: the per-evaluation records ``RUN/selectivity/*.pt``
(``load_evals``) and their mean SI per stage against epoch, with the label-shuffled null
(``stage_series``)."""
from __future__ import annotations

import glob
import os
from collections import OrderedDict

import numpy as np
import torch

from selectivity.errors import CheckpointError
from selectivity.train.models import stage_of


def load_evals(run: str) -> list[dict]:
    """The run's per-evaluation selectivity records, in training order."""
    files = glob.glob(os.path.join(run, "selectivity", "*.pt"))
    if not files:
        raise CheckpointError(f"no selectivity records in {run}/selectivity; train with "
                              f"track: true (the default) first")
    evals = [_load_record(f) for f in files]
    return sorted(evals, key=lambda e: e["step"])


def _load_record(path: str) -> dict:
    try:
        record = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 — torn, foreign or unreadable: any of torch's errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read selectivity record {path}: {first}") from None
    if not (isinstance(record, dict) and isinstance(record.get("layers"), dict)
            and "step" in record and "epoch" in record):
        raise CheckpointError(f"not a selectivity record (no epoch, step and layers): {path}")
    return record


def _stage_null(layers: list[dict]):
    """(null mean, band top, band kind) of a stage at one evaluation, or None without a null.

    ``si_null`` is [P, U] (P permutations): the stage's mean SI under each permutation (blocks
    weighted equally, as for the SI itself) gives P values, reported as their mean and 95 %
    quantile (as the val records' ``si_null`` / ``si_null_q95``). Older records hold one
    permutation as [U]: mean and + one s.d. over the units, as these figures showed before."""
    nulls = [l.get("si_null") for l in layers]
    if any(n is None for n in nulls):
        return None
    if all(n.dim() == 2 for n in nulls):
        per_perm = torch.stack([n.double().mean(1) for n in nulls]).mean(0)  # [P]
        return (float(per_perm.mean()), float(torch.quantile(per_perm, 0.95)), "q95")
    units = torch.cat([n.double().flatten() for n in nulls])
    return float(units.mean()), float(units.mean() + units.std()), "sd"


def stage_series(evals: list[dict]) -> "OrderedDict[str, dict]":
    """stage → {epoch, si (mean over blocks, each block weighted equally), null mean, band top,
    band kind} (see ``_stage_null``)."""
    out = OrderedDict()
    for e in evals:
        by_stage = OrderedDict()
        for name, layer in e["layers"].items():
            by_stage.setdefault(stage_of(name), []).append(layer)
        for stage, layers in by_stage.items():
            s = out.setdefault(stage, {"epoch": [], "si": [], "null": [], "null_top": [],
                                       "band": set()})
            s["epoch"].append(float(e["epoch"]))
            s["si"].append(np.mean([float(l["si"].mean()) for l in layers]))
            null = _stage_null(layers)
            s["null"].append(np.nan if null is None else null[0])
            s["null_top"].append(np.nan if null is None else null[1])
            if null is not None:
                s["band"].add(null[2])
    return out
