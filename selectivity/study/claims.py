"""Each claim's per-seed statistics (rules.py names them), from the study's runs and the analyses
of its α = 0 checkpoints. The same functions serve the pilot (its spreads size the study), the
main seeds (the verdicts) and each half of them (the split-half check).

Comparisons between conditions are paired: the same seed (same initialisation and data order) in
both. Accuracy and SI differences are taken over the seeds that learned in both conditions; the
seeds that did not learn are counted as rates (``rates``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from selectivity.analyses.cka.cka import LOGITS
from selectivity.analyses.cka.run import entry
from selectivity.study import aggregate as agg
from selectivity.study import stats
from selectivity.study.analysis_values import HIGH, LOW, orientation_values
from selectivity.study.design import BASE, COMPARISONS, STUDY_CLASSES
from selectivity.study.rules import RATE_LEVEL, RULES, verdict


@dataclass
class StudyData:
    """The runs {condition: {seed: Run}}, the analyses {tool: {seed: {epoch: values}}} of the
    α = 0 seeds, and the epoch of SI's peak (chosen on the pilot)."""
    runs: dict
    analyses: dict = field(default_factory=dict)
    peak_epoch: float = math.nan

    def seeds(self, condition: str) -> list:
        return sorted(self.runs.get(condition, {}))

    def restrict(self, seeds) -> "StudyData":
        keep = set(seeds)
        return replace(self, runs={c: {s: r for s, r in rs.items() if s in keep}
                                   for c, rs in self.runs.items()},
                       analyses={t: {s: v for s, v in per.items() if s in keep}
                                 for t, per in self.analyses.items()})


def final(data: StudyData, condition: str, key: str) -> dict:
    return {s: agg.record_value(r.final, key) if r.val else None
            for s, r in data.runs.get(condition, {}).items()}


def learned(data: StudyData, condition: str) -> dict:
    """{seed: whether the final val acc1 reached twice chance}."""
    return {s: a is not None and a >= 2.0 / STUDY_CLASSES
            for s, a in final(data, condition, "acc1").items()}


def rates(data: StudyData, condition: str) -> tuple[int, int]:
    """(seeds that did not learn, seeds)."""
    ok = learned(data, condition)
    return sum(not v for v in ok.values()), len(ok)


def _learned_delta(data, a, b, key) -> dict:
    la, lb = learned(data, a), learned(data, b)
    va, vb = final(data, a, key), final(data, b, key)
    return stats.differences({s: v for s, v in va.items() if la.get(s) and lb.get(s)}, vb)


def _emergence(data) -> dict:
    runs = data.runs.get(BASE, {})
    at = {s: agg.at_epoch(r, data.peak_epoch, "si_mean") for s, r in runs.items()}
    null = {s: agg.at_epoch(r, data.peak_epoch, "si_null_q95") for s, r in runs.items()}
    return {"si_minus_null": stats.differences(at, null),
            "peak_minus_final": stats.differences(at, final(data, BASE, "si_mean"))}


def _ablation(data) -> dict:
    per = data.analyses.get("ablate", {})

    def gap(auc, e):
        c = auc.get(e, {})
        return c["random"] - c["selective"] if {"random", "selective"} <= set(c) else None

    early, late = {}, {}
    for s, auc in per.items():
        trained = sorted(e for e in auc if e > 0)
        if trained:
            early[s], late[s] = gap(auc, trained[0]), gap(auc, trained[-1])
    return {"early": early, "late": late, "interaction": stats.differences(early, late)}


def stage_logit_cka(rec: dict, key: str = "matrix") -> dict:
    """{stage: CKA(stage output, logits)} of one cka.jsonl record (``key="random_init"``: the
    freshly initialised network's)."""
    out = {}
    for r in rec["rows"]:
        if r != LOGITS:
            v = entry(rec, r, LOGITS, key)
            out[r] = float(v) if v is not None and math.isfinite(v) else None
    return out


def cka_mean(rec: dict | None, key: str = "matrix"):
    vals = [v for v in stage_logit_cka(rec, key).values() if v is not None] if rec else []
    return sum(vals) / len(vals) if vals else None


def _cka(data) -> dict:
    early, fin, init = {}, {}, {}
    for s, recs in data.analyses.get("cka", {}).items():
        trained = sorted(e for e in recs if e > 0)
        if trained:
            early[s], fin[s] = cka_mean(recs[trained[0]]), cka_mean(recs[trained[-1]])
            init[s] = cka_mean(recs[trained[0]], "random_init")
    return {"early_minus_final": stats.differences(early, fin),
            "early_minus_random_init": stats.differences(early, init)}


def _orientation(data) -> dict:
    out = {k: {} for k in ("low", "high", "rise", "loss", "shift")}
    for s, recs in data.analyses.get("orientation", {}).items():
        vals = {e: orientation_values(r) for e, r in recs.items()}
        if not vals:
            continue
        last, first = vals[max(vals)], vals.get(0.0)
        out["low"][s] = last.excess(LOW)
        out["high"][s] = last.excess(HIGH)
        out["rise"][s] = None if first is None else _minus(last.gosi(LOW), first.gosi(LOW))
        out["loss"][s] = _minus(last.ablation.get(("loss", "top")),
                                last.ablation.get(("loss", "bottom")))
        out["shift"][s] = _minus(last.ablation.get(("shift", "bottom")),
                                 last.ablation.get(("shift", "top")))
    return out


def _minus(a, b):
    return None if a is None or b is None else a - b


def claim_values(rule_id: str, data: StudyData) -> dict:
    """{statistic: {seed: value}} of one claim."""
    if rule_id in ("emergence", "recession"):
        return _emergence(data)
    if rule_id in COMPARISONS:
        a, b = COMPARISONS[rule_id]
        return {"acc": _learned_delta(data, a, b, "acc1"),
                "si": _learned_delta(data, a, b, "si_mean")}
    if rule_id.startswith("ablation"):
        return _ablation(data)
    if rule_id == "cka":
        return _cka(data)
    if rule_id.startswith("orientation"):
        return _orientation(data)
    raise KeyError(f"no statistics for claim {rule_id!r}")


@dataclass
class ClaimResult:
    rule: object
    stats: dict         # {statistic: stats.Paired}
    verdict: str


def peak_in_first_half(data: StudyData) -> bool:
    epochs = [float(r.config.get("epochs", 0)) for rs in data.runs.values() for r in rs.values()]
    return bool(epochs) and data.peak_epoch <= 0.5 * max(epochs)


def worse_by_rates(data: StudyData, rule_id: str) -> int:
    """+1 if the first condition of a comparison fails (does not learn) significantly more often
    than the second (Fisher, two-sided p < RATE_LEVEL), −1 if less often, else 0."""
    if rule_id not in COMPARISONS:
        return 0
    (ka, na), (kb, nb) = (rates(data, c) for c in COMPARISONS[rule_id])
    p = stats.fisher(ka, na, kb, nb)
    if not (p < RATE_LEVEL):
        return 0
    return 1 if ka / na > kb / nb else -1


def evaluate(data: StudyData) -> dict:
    """{rule id: ClaimResult} over the seeds ``data`` holds."""
    out = {}
    first_half = peak_in_first_half(data)
    for rule in RULES:
        st = {k: stats.paired(v) for k, v in claim_values(rule.id, data).items()}
        out[rule.id] = ClaimResult(rule, st, verdict(rule, st, first_half,
                                                     worse_by_rates(data, rule.id)))
    return out


def conditions_of(rule_id: str) -> tuple:
    """The conditions a claim reads (its rates and its n)."""
    return COMPARISONS.get(rule_id, (BASE,))
