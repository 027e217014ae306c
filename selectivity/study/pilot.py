"""The pilot: a few seeds of every condition, run before the main seeds and never used for a
verdict. From them the study takes SI's peak epoch (where "emerges then recedes" is read on the
main seeds) and, for every claim, the spread of its primary statistic, hence the n that gives 80 %
power at the effect its rule names. Each condition then runs the largest n of the claims that read
it, between N_MIN and N_CAP.

The record (``pilot.json`` in the study's directory, copied beside the findings) pins the rules'
fingerprint: once it exists, findings are only written under the same rules."""
from __future__ import annotations

import json
import math
import os

from selectivity.io import atomic_write_text
from selectivity.study import aggregate as agg
from selectivity.study import stats
from selectivity.study.claims import StudyData, claim_values, conditions_of
from selectivity.study.design import BASE
from selectivity.study.rules import RULES, fingerprint
from selectivity.train.config import ConfigError


def peak_epoch(data: StudyData) -> float:
    """The epoch of the largest mean-over-seeds SI of the α = 0 runs (the first on ties)."""
    c = agg.curve(list(data.runs.get(BASE, {}).values()), "si_mean")
    ok = [i for i in range(len(c.epochs)) if math.isfinite(c.mean[i])]
    return float(c.epochs[max(ok, key=lambda i: (c.mean[i], -i))]) if ok else math.nan


def plan(data: StudyData, n_min: int, n_cap: int) -> dict:
    """The pilot's record: its seeds, the peak epoch, per claim the spread and the n it needs,
    per condition the n it runs."""
    data.peak_epoch = peak_epoch(data)
    claims, per_condition = {}, {}
    for rule in RULES:
        values = claim_values(rule.id, data)[rule.stats[0]]
        p = stats.paired(values)
        need = stats.n_for_power(p.sd, rule.effect) if p.n >= 2 else None
        n = n_cap if need is None else min(max(need, n_min), n_cap)
        claims[rule.id] = {"pilot_n": p.n, "pilot_mean": _finite(p.summary.mean),
                           "pilot_sd": _finite(p.sd), "n_needed": need, "n": n}
        for c in conditions_of(rule.id):
            per_condition[c] = max(per_condition.get(c, n_min), n)
    seeds = sorted({s for rs in data.runs.values() for s in rs})
    return {"rules": fingerprint(), "seeds": seeds, "peak_epoch": _finite(data.peak_epoch),
            "n_min": n_min, "n_cap": n_cap, "claims": claims, "n": per_condition}


def _finite(x: float) -> float | None:
    """JSON has no NaN: an undefined value is null."""
    return x if x is not None and math.isfinite(x) else None


def fix(record: dict, path: str) -> dict:
    """Write the record the first time; later, refuse one whose rules changed, and return the
    record as first written (the pilot runs are deterministic, so it equals a recomputation)."""
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("rules") != record["rules"]:
            raise ConfigError(f"the verdict rules changed since the pilot ({path} pins rules "
                              f"{old.get('rules')}, these are {record['rules']}); rules are "
                              f"fixed before the main runs: restore them, or start a new study "
                              f"in another --out")
        if json.dumps(old, sort_keys=True) != json.dumps(record, sort_keys=True):
            raise ConfigError(f"the pilot's runs no longer give the record in {path} (a changed "
                              f"run or trainer); start a new study in another --out")
        return old
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return record
