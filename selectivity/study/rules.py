"""The study's verdict rules, fixed before its main runs.

Every claim names its statistics (per-seed paired values, claims.py), the one whose spread sizes
the study (``primary``) and the effect the rule names (``effect``, in that statistic's units): the
pilot chooses n for 80 % power at that effect, and a claim whose achieved 95 % half-width exceeds it
is *underpowered*. The pilot's record (pilot.py) stores ``fingerprint()``: findings from main runs
whose rules differ from the pilot's are refused, so no threshold can follow the main data.

Verdict kinds (each needs n ≥ 2; else *inconclusive*; *supports* and *contradicts* exclude each
other):

- ``above``: *supports* if the primary's interval lies above 0, *contradicts* if below 0;
- ``early_above``: ``above``, and *supports* needs the pilot's peak in the first half of training;
- ``both_above``: ``above`` for every statistic: *supports* if all lie above 0, *contradicts* if
  any lies below 0;
- ``mild`` (Δ acc, Δ SI): *supports* if Δ SI lies below 0 and Δ acc's lower end is above
  −effect; *contradicts* if Δ acc lies below −effect or Δ SI above 0;
- ``little`` (Δ acc): *supports* if Δ acc's lower end is above −effect; *contradicts* if it lies
  below −effect;
- ``costs`` (Δ acc, Δ SI): *supports* if Δ SI lies below 0 and Δ acc inside (−COSTS_MAX, 0);
  *contradicts* if Δ acc lies above 0 or below −COSTS_RUINS;
- ``hurts`` (Δ acc, Δ SI): *supports* if Δ SI lies above 0 and Δ acc below 0; *contradicts* if
  Δ acc lies above 0.

Seeds that did not learn decide first. Δ acc is over the seeds that learned in both conditions;
where one condition fails more often than the other (Fisher's exact test, two-sided p <
RATE_LEVEL), the comparison of accuracy is decided by the rates instead: the condition that fails
more is the worse one, as if its Δ acc lay below every threshold (and Δ SI, over the seeds that
learned, is not required).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

POINT = 0.01        # one accuracy point
COSTS_MAX = 0.05    # "costs a few points": less than 5
COSTS_RUINS = 0.10  # more than 10 points is not "a few"
RATE_LEVEL = 0.05   # Fisher's exact test on the rates of seeds that did not learn
VERDICTS = ("supports", "contradicts", "inconclusive")


@dataclass(frozen=True)
class Rule:
    id: str
    section: str            # the findings section it belongs to
    claim: str              # as the verdict table states it
    kind: str               # one of the kinds above
    stats: tuple            # the statistics it reads, primary first (claims.py names them)
    effect: float           # the effect it names, in the primary's units
    unit: str               # the primary's unit, for the text


def _delta(id, section, claim, kind, effect=2 * POINT):
    return Rule(id, section, claim, kind, ("acc", "si"), effect, "points")


RULES = (
    Rule("emergence", "emergence", "SI emerges early, above the null (α = 0)", "early_above",
         ("si_minus_null",), 0.02, "SI"),
    Rule("recession", "emergence", "SI recedes after its peak (α = 0)", "above",
         ("peak_minus_final",), 0.02, "SI"),
    _delta("alpha_m1", "alpha", "α = −1 lowers SI at little cost (> −2 points)", "mild"),
    _delta("alpha_m3", "alpha", "α = −3 lowers SI at little cost (> −2 points)", "mild"),
    _delta("alpha_m10", "alpha", "α = −10 (SI near 0) costs a few points (0 to 5)", "costs"),
    _delta("alpha_p1", "alpha", "α = +1 raises SI and hurts accuracy", "hurts"),
    _delta("alpha_p3", "alpha", "α = +3 raises SI and hurts accuracy", "hurts"),
    Rule("from_e2", "windows", "α = −10 from epoch 2 on costs less than from epoch 0 on",
         "above", ("acc",), 2 * POINT, "points"),
    Rule("from_e4", "windows", "α = −10 from epoch 4 on costs less than from epoch 0 on",
         "above", ("acc",), 2 * POINT, "points"),
    Rule("late_start", "windows", "α = −10 from epoch 4 on has little effect (> −2 points vs α = 0)",
         "little", ("acc",), 2 * POINT, "points"),
    Rule("equal_windows", "windows", "α = −10 on [0, 2) costs more than on [4, 6)", "above",
         ("acc",), 2 * POINT, "points"),
    Rule("ablation_early", "ablation", "at the first trained checkpoint, selective units matter "
         "more than random ones", "above", ("early",), 0.02, "AUC"),
    Rule("ablation_interaction", "ablation", "... and the gap is larger early than at the end",
         "above", ("interaction",), 0.02, "AUC"),
    Rule("cka", "cka", "stage outputs are closer to the logits (CKA) early than at the end",
         "above", ("early_minus_final",), 0.05, "CKA"),
    Rule("orientation_exists", "orientation", "orientation-selective units (above the control) "
         "in low and high layers", "both_above", ("low", "high"), 0.02, "gOSI"),
    Rule("orientation_rises", "orientation", "low layers' orientation selectivity rises with "
         "training", "above", ("rise",), 0.02, "gOSI"),
    Rule("orientation_loss", "orientation", "ablating low layers' selective half raises val loss "
         "more than the other half", "above", ("loss",), 0.05, "nats"),
    Rule("orientation_shift", "orientation", "... and lowers the higher layers' shift invariance "
         "more", "above", ("shift",), 0.02, "correlation"),
)
BY_ID = {r.id: r for r in RULES}


def fingerprint() -> str:
    """A hash of every rule and threshold (what the pilot's record pins)."""
    blob = json.dumps({"rules": [asdict(r) for r in RULES],
                       "constants": [POINT, COSTS_MAX, COSTS_RUINS, RATE_LEVEL]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ok(s) -> bool:
    return s is not None and s.n >= 2 and math.isfinite(s.summary.half)


def verdict(rule: Rule, stats: dict, peak_in_first_half: bool = True, worse: int = 0) -> str:
    """``stats``: {statistic name: stats.Paired} of the claim; ``worse``: +1 if the first
    condition of an accuracy comparison fails significantly more often than the second, −1 if
    less often, 0 otherwise (then the paired intervals decide)."""
    if worse and rule.stats[0] == "acc":
        return _by_rates(rule, worse)
    got = [stats.get(k) for k in rule.stats]
    if not all(_ok(s) for s in got):
        return "inconclusive"
    lo = [s.summary.low for s in got]
    hi = [s.summary.high for s in got]
    e = rule.effect
    if rule.kind in ("above", "early_above"):
        if lo[0] > 0:
            return "supports" if rule.kind == "above" or peak_in_first_half else "inconclusive"
        return "contradicts" if hi[0] < 0 else "inconclusive"
    if rule.kind == "both_above":
        if all(x > 0 for x in lo):
            return "supports"
        return "contradicts" if any(x < 0 for x in hi) else "inconclusive"
    if rule.kind == "little":
        return "supports" if lo[0] > -e else "contradicts" if hi[0] < -e else "inconclusive"
    acc_lo, si_lo, acc_hi, si_hi = lo[0], lo[1], hi[0], hi[1]
    if rule.kind == "mild":
        if si_hi < 0 and acc_lo > -e:
            return "supports"
        return "contradicts" if acc_hi < -e or si_lo > 0 else "inconclusive"
    if rule.kind == "costs":
        if si_hi < 0 and acc_hi < 0 and acc_lo > -COSTS_MAX:
            return "supports"
        return "contradicts" if acc_lo > 0 or acc_hi < -COSTS_RUINS else "inconclusive"
    if rule.kind == "hurts":
        if si_lo > 0 and acc_hi < 0:
            return "supports"
        return "contradicts" if acc_lo > 0 else "inconclusive"
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def _by_rates(rule: Rule, worse: int) -> str:
    """The verdict when the rates of not learning differ: the first condition's Δ acc counts as
    below every threshold (``worse`` > 0) or above 0 (``worse`` < 0)."""
    if rule.kind in ("above", "little", "mild"):
        return "contradicts" if worse > 0 else "supports"
    if rule.kind == "costs":  # a collapse is not "a few points", nor is doing better
        return "contradicts"
    if rule.kind == "hurts":
        return "supports" if worse > 0 else "contradicts"
    raise ValueError(f"rule kind {rule.kind!r} compares no accuracies")


def rule_text(rule: Rule) -> str:
    """The rule in words, with its thresholds."""
    e = rule.effect * (100 if rule.unit == "points" else 1)
    unit = " points" if rule.unit == "points" else f" {rule.unit}"
    k = rule.kind
    if k in ("above", "early_above"):
        extra = " and the pilot's peak epoch is in the first half of training" \
            if k == "early_above" else ""
        return (f"*supports* if the interval lies above 0{extra}; *contradicts* if below 0; "
                f"named effect {e:g}{unit}")
    if k == "both_above":
        return (f"*supports* if every interval ({', '.join(rule.stats)}) lies above 0; "
                f"*contradicts* if any lies below 0; named effect {e:g}{unit}")
    if k == "little":
        return (f"*supports* if Δ acc1's lower end is above −{e:g} points; *contradicts* if its "
                f"interval lies below −{e:g}")
    if k == "mild":
        return (f"*supports* if Δ SI lies below 0 and Δ acc1's lower end is above −{e:g} "
                f"points; *contradicts* if Δ acc1 lies below −{e:g} or Δ SI above 0")
    if k == "costs":
        return (f"*supports* if Δ SI lies below 0 and Δ acc1 inside (−{COSTS_MAX / POINT:g}, 0) "
                f"points; *contradicts* if Δ acc1 lies above 0 or below "
                f"−{COSTS_RUINS / POINT:g}; named effect {e:g} points")
    if k == "hurts":
        return (f"*supports* if Δ SI lies above 0 and Δ acc1 below 0; *contradicts* if Δ acc1 "
                f"lies above 0; named effect {e:g} points")
    raise ValueError(f"unknown rule kind {k!r}")
