"""docs/findings.md: the design (pilot, n, rules), then one section per claim group with paired
intervals, rates and verdicts, the split-half check and the collapse diagnostics; the figures in
``findings/`` beside it. Every number comes from the runs; nothing is typed, and nothing that
varies between two runs of the command (timings) is written, so a rerun reproduces it exactly."""
from __future__ import annotations

import math
import os

from selectivity.io import atomic_write_text
from selectivity.regularizer import parse_windows
from selectivity.study import aggregate as agg
from selectivity.study import stats
from selectivity.study.claims import (StudyData, conditions_of, evaluate, learned, rates,
                                      worse_by_rates)
from selectivity.study.design import BASE, RUN_CORE_MINUTES
from selectivity.study.rules import RULES
from selectivity.study.sections import (ablation_section, alpha_section, cka_section, config_of,
                                        emergence_section, fmt_p, orientation_section, unit_scale,
                                        windows_section, windows_text)

# ----- the design: pilot, n, power ---------------------------------------------------------------


def design_section(data: StudyData, pilot: dict, results: dict) -> str:
    rows = []
    for rule in RULES:
        p, r = pilot["claims"][rule.id], results[rule.id]
        scale, digits = unit_scale(rule)
        primary = r.stats.get(rule.stats[0])
        need = p["n_needed"]
        binds = need is None or need > pilot["n_cap"]
        half = primary.summary.half if primary else math.nan
        status = "decides" if math.isfinite(half) and half <= rule.effect else None
        if status is None and worse_by_rates(data, rule.id):
            (ka, na), (kb, nb) = (rates(data, c) for c in conditions_of(rule.id))
            status = (f"decided by the rates of not learning ({ka} of {na} vs {kb} of {nb}, "
                      f"Fisher p = {fmt_p(stats.fisher(ka, na, kb, nb))})")
        if status is None:
            sd = primary.sd if primary else math.nan
            more = stats.n_for_power(sd, rule.effect) if math.isfinite(sd) else None
            n_now = primary.n if primary else 0
            if more is None:
                status = f"**underpowered at n = {n_now}**; spread unknown or > 1000 seeds"
            else:
                extra = max(more - n_now, 0) * len(conditions_of(rule.id))
                status = (f"**underpowered at n = {n_now}**: needs n ≈ {more} ({extra} more "
                          f"runs, ≈ {extra * RUN_CORE_MINUTES:g} core-minutes)")
        rows.append([rule.id, f"`{rule.stats[0]}`", f"{rule.effect * scale:g} {rule.unit}",
                     f"{p['pilot_n']}", "–" if p["pilot_sd"] is None
                     else f"{p['pilot_sd'] * scale:.{digits}f}",
                     "–" if need is None else str(need),
                     f"{min(pilot['n'][c] for c in conditions_of(rule.id))}"
                     + (" (cap)" if binds else ""),
                     f"{half * scale:.{digits}f}" if math.isfinite(half) else "–", status])
    table = agg.markdown_table(
        ["claim", "primary statistic", "named effect", "pilot n", "pilot sd",
         "n for 80 % power", "n run (paired)", "achieved half-width", "status"], rows)
    per_cond = ", ".join(f"`{c}` {n}" for c, n in pilot["n"].items())
    return f"""## The design: pilot, power, n

Pilot seeds {', '.join(map(str, pilot['seeds']))} ran every condition first; they chose SI's peak
epoch (**{'–' if pilot['peak_epoch'] is None else format(pilot['peak_epoch'], 'g')}**) and each claim's n,
and enter no verdict. For each claim the
pilot's spread (sd) of its primary statistic gives the n of a two-sided paired t-test at 5 % with
80 % power for the effect the rule names; each condition runs the largest n of the claims that
read it, at least {pilot['n_min']} and at most {pilot['n_cap']} (the cap). The rules
(`selectivity/study/rules.py`, fingerprint `{pilot['rules']}`) were fixed with the pilot: the
record `findings/pilot.json` pins them and the study refuses to write findings under other rules.
Nothing stops early: every condition runs its n, whatever its intervals look like.

Seeds run (main, seeds 0 … n − 1): {per_cond}.

A claim *decides* when its achieved 95 % half-width is at most its named effect; otherwise it is
*underpowered* at its n, with the n the main runs' spread says it would need and what that costs.

{table}
"""


# ----- rates -------------------------------------------------------------------------------------


def rates_section(data: StudyData) -> str:
    k0, n0 = rates(data, BASE)
    rows = []
    for cond in data.runs:
        k, n = rates(data, cond)
        lo, hi = stats.clopper_pearson(k, n)
        rows.append([cond, windows_text(config_of(data, cond)), f"{k} of {n}",
                     f"{k / n:.2f} [{lo:.2f}, {hi:.2f}]" if n else "–",
                     "–" if cond == BASE else fmt_p(stats.fisher(k, n, k0, n0))])
    return f"""## Seeds that did not learn

A seed *did not learn* when its final val acc1 is below twice chance (0.2). Such seeds and the
seeds that learned form two modes, so they are counted as a rate with its exact (Clopper–Pearson)
95 % interval and compared with α = 0 by Fisher's exact test (two-sided); accuracy and SI
differences below are over the seeds that learned in both conditions, with their n. Where the two
conditions of an accuracy comparison fail at rates that differ at p < 0.05 (Fisher), the rates
decide it: the condition that fails more often is the worse one, whatever the seeds that learned
say (`selectivity/study/rules.py`).

{agg.markdown_table(["condition", "regularizer", "did not learn", "rate [95 % CI]",
                     "Fisher p vs alpha_0"], rows)}
"""


# ----- split halves and collapse -----------------------------------------------------------------


def split_half_section(halves: tuple[dict, dict], seeds: tuple[list, list]) -> str:
    rows, agree = [], 0
    for rule in RULES:
        a, b = halves[0][rule.id].verdict, halves[1][rule.id].verdict
        agree += a == b
        rows.append([rule.id, a, b, "yes" if a == b else "**no**"])
    return f"""## Split-half check

Every rule run again on two disjoint halves of the main seeds (first half: seeds
{', '.join(map(str, seeds[0])) or '–'}; second: {', '.join(map(str, seeds[1])) or '–'}; a
condition with fewer seeds contributes what it has). Agreement: **{agree} of {len(RULES)}** claims
get the same verdict from both halves. (Each half has half the n, so an *inconclusive* half beside
a decided one is expected where the full n is just enough.)

{agg.markdown_table(["claim", "first half", "second half", "agree"], rows)}
"""


def collapse_section(data: StudyData) -> str:
    rows = []
    for cond in data.runs:
        cfg = config_of(data, cond)
        if not [w for w in parse_windows(cfg.get("selectivity_reg") or []) if w.alpha != 0]:
            continue
        ok = learned(data, cond)
        for group, want in (("learned", True), ("did not learn", False)):
            runs = [r for s, r in data.runs[cond].items() if ok.get(s) is want]
            if not runs:
                continue

            def peak(key, upto=math.inf):
                return [max((t[key] for t in r.train if key in t and t.get("epoch", 0) <= upto),
                            default=None) for r in runs]
            first_dead = [next((t["epoch"] for t in r.train
                                if t.get("reg_silent_frac", 0) >= 0.5), None) for r in runs]
            dead = [e for e in first_dead if e is not None]
            rows.append([f"`{cond}`", group, str(len(runs)),
                         _median(peak("reg_grad_norm", 1.0)), _median(peak("reg_grad_norm")),
                         _median(peak("reg_silent_frac")),
                         f"{len(dead)} of {len(runs)}" + (f" (median epoch {_median(dead)})"
                                                          if dead else "")])
    if not rows:
        return ""
    return f"""## Why strong α collapses some seeds: the regularizer's gradient

SI's gradient through a unit's class means scales as 1/(μ_max + μ_−max + ε), huge for near-silent
units (ε = 1e-7). The trainer logs, per log interval, the largest norm of the term's gradient over
the units' per-image means (`reg_grad_norm`, ‖∂(α·SI_reg)/∂A‖) and the largest fraction of
near-silent units in a minibatch (`reg_silent_frac`: μ_max + μ_−max < 1e-3). Medians over the
seeds of each group; the last column counts seeds in which half the units went near-silent.

{agg.markdown_table(["condition", "seeds", "n", "grad norm, max in epoch < 1",
                     "grad norm, max", "near-silent fraction, max",
                     "half the units near-silent"], rows)}
"""


def _median(values) -> str:
    v = sorted(x for x in values if x is not None and math.isfinite(x))
    if not v:
        return "–"
    m = v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])
    return f"{m:.3g}"


# ----- the document ------------------------------------------------------------------------------


def write_findings(data: StudyData, pilot: dict, docs: str, command: str, tiny: bool) -> str:
    """``data``: the main seeds' runs and analyses (peak epoch from the pilot). Returns the path
    of findings.md."""
    figdir = os.path.join(docs, "findings")
    results = evaluate(data)
    seeds = sorted({s for rs in data.runs.values() for s in rs})
    half = (seeds[: len(seeds) // 2], seeds[len(seeds) // 2:])
    halves = (evaluate(data.restrict(half[0])), evaluate(data.restrict(half[1])))
    cfg = config_of(data, BASE)
    verdicts = agg.markdown_table(
        ["claim", "verdict", "first half", "second half"],
        [[f"{r.claim} (`{r.id}`)", f"**{results[r.id].verdict}**", halves[0][r.id].verdict,
          halves[1][r.id].verdict] for r in RULES])
    head = f"""# Findings of the small-scale study

Generated by `{command}`; do not edit by hand (rerun the command). {'**Tiny mode**: a pipeline check, too short to test the papers; its verdicts mean nothing.' if tiny else ''}

Setup: `{cfg.get('model')}` on `{cfg.get('dataset')}` at {cfg.get('image_size')} px,
{cfg.get('epochs')} epoch(s), batch {cfg.get('batch_size')}, lr {cfg.get('lr')} ({cfg.get('schedule')}),
BatchNorm at evaluation: `{cfg.get('bn_mode', 'recalibrate')}`.

Every condition runs the same seeds (same initialisation and data order), so every comparison is a
**paired difference per seed**: its mean ± the 95 % t half-width (n), with the Wilcoxon
signed-rank and sign tests' two-sided p-values beside it.

## Verdicts

{verdicts}
"""
    sections = [head, design_section(data, pilot, results), rates_section(data),
                emergence_section(data, results, figdir), alpha_section(data, results, figdir),
                windows_section(data, results, figdir), ablation_section(data, results, figdir),
                cka_section(data, results, figdir), orientation_section(data, results, figdir),
                split_half_section(halves, half), collapse_section(data)]
    os.makedirs(figdir, exist_ok=True)
    path = os.path.join(docs, "findings.md")
    atomic_write_text(path, "\n".join(s for s in sections if s))
    return path
