"""The claims the study tests on its training curves (docs/findings.md): SI emerges early and
recedes (paper 1), the α sweep (paper 2), early-only vs late regularization (paper 1's critical
period). Each returns its section of the findings: a table from the runs, the rule, the verdicts
and the figure."""
from __future__ import annotations

import math
import os

from selectivity.regularizer import parse_windows
from selectivity.study import aggregate as agg
from selectivity.study.design import (BASE, EARLY, LATE, MODERATE, POINT, POSITIVE, STRONG,
                                      STUDY_CLASSES)
from selectivity.study.figures import plot_alpha, plot_si, plot_windows
from selectivity.study.verdicts import verdict_interval


def null_key(runs) -> str:
    """The null to compare with: its 95 % quantile where the runs logged it, else its mean."""
    return "si_null_q95" if any(r.get("si_null_q95") is not None for run in runs
                                for r in run.val) else "si_null"


def claim_emergence(groups, figdir: str) -> str:
    runs = groups.get(BASE, [])
    if not runs:
        return "## SI emergence and recession\n\nNo α = 0 runs: nothing to test.\n"
    nk = null_key(runs)
    mean_curve = agg.curve(runs, "si_mean")
    ok = [i for i in range(len(mean_curve.epochs)) if math.isfinite(mean_curve.mean[i])]
    peak_i = max(ok, key=lambda i: mean_curve.mean[i]) if ok else None
    peak_epoch = float(mean_curve.epochs[peak_i]) if peak_i is not None else math.nan
    final_epoch = float(mean_curve.epochs[-1]) if len(mean_curve.epochs) else math.nan
    rows, excess, recess = [], None, None
    for layer in [None] + agg.layers_of(runs):
        name = layer or "mean over layers"
        key = "si_mean" if layer is None else "si"
        nkey = nk if layer is None else nk + "_layers"
        at_peak = [agg.at_epoch(r, peak_epoch, key, layer) for r in runs]
        null_peak = [agg.at_epoch(r, peak_epoch, nkey, layer) for r in runs]
        final = agg.final_values(runs, key, layer)
        d_null = agg.summarize([a - b for a, b in zip(at_peak, null_peak)
                                if a is not None and b is not None])
        d_rec = agg.summarize([a - b for a, b in zip(at_peak, final)
                               if a is not None and b is not None])
        peaks = agg.summarize([agg.peak(r, key, layer)[0] for r in runs])
        if layer is None:
            excess, recess = d_null, d_rec
        rows.append([name, agg.summarize([agg.at_epoch(r, 0.0, key, layer) for r in runs]).fmt(3),
                     agg.summarize(at_peak).fmt(3), agg.summarize(null_peak).fmt(3),
                     d_null.fmt(3), agg.summarize(final).fmt(3), d_rec.fmt(3), peaks.fmt(2)])
    v_em = verdict_interval(excess)
    if v_em == "supports" and not peak_epoch <= 0.5 * final_epoch:
        v_em = "inconclusive"  # above the null, but not *early*
    v_rec = verdict_interval(recess)
    if peak_i is not None and peak_i == len(mean_curve.epochs) - 1:
        v_rec = "contradicts"  # the mean curve peaks at the last evaluation: no recession
    fig = plot_si(runs, nk, os.path.join(figdir, "si_emergence.png"), peak_epoch, BASE)
    table = agg.markdown_table(
        ["layer", "SI at init", f"SI at epoch {peak_epoch:g}", f"null ({nk}) there",
         "SI − null", "final SI", "peak − final", "per-seed peak epoch"], rows)
    return f"""## SI emergence and recession (paper 1)

Paper 1 (Ranadive et al.): class selectivity emerges early in training and then recedes.

Condition `{BASE}` (no regularizer). The epoch of the peak is chosen on the mean-over-seeds curve
of the mean SI (epoch {peak_epoch:g} of {final_epoch:g}); every seed's values are read there.

{table}

**Rule.** Emergence: *supports* if the interval of (SI − null) at the peak lies above 0 and the
peak is in the first half of training; *contradicts* if it lies below 0; else *inconclusive*.
Recession: *supports* if the interval of (peak − final SI) lies above 0; *contradicts* if the mean
curve peaks at the last evaluation; else *inconclusive*. (Choosing the peak epoch on the same runs
biases peak − final upward; the interval is over seeds, not over that choice.)

| claim | verdict |
|---|---|
| SI emerges early, above the null | **{v_em}** |
| SI recedes after its peak | **{v_rec}** |

![SI over training]({fig})
"""


def windows_text(runs) -> str:
    """α = −10 on [0, 3) … as text; "–" for a condition without runs."""
    if not runs:
        return "–"
    ws = [w for w in parse_windows(runs[0].config.get("selectivity_reg") or []) if w.alpha != 0]
    if not ws:
        return "α = 0"
    return ", ".join(f"α = {w.alpha:g} on [{w.start:g}, "
                     f"{'end' if math.isinf(w.end) else format(w.end, 'g')})" for w in ws)


DELTA_HEADER = ["condition", "regularizer (epochs)", "seeds that did not learn", "final val acc1",
                "Δ acc1 vs α = 0 (points)", "final mean SI", "Δ SI vs α = 0"]
NOT_LEARNED = f"""A seed that *did not learn* ended below twice chance (val acc1 < {2 / STUDY_CLASSES:g}). Where
some seeds of a condition learned and some did not, its outcome has two modes, and a mean ±
t-interval over 3 seeds describes neither: such a condition's verdict is *inconclusive*
whatever its interval says, and the table shows how many seeds failed."""


def _mixed(groups, name) -> bool:
    """Some seeds of the condition learned and some did not."""
    runs = groups.get(name, [])
    return 0 < len(agg.not_learned(runs, STUDY_CLASSES)) < len(runs)


def _delta_rows(groups, names):
    base = groups.get(BASE, [])
    b_acc, b_si = agg.final_values(base, "acc1"), agg.final_values(base, "si_mean")
    rows, deltas = [], {}
    for name in names:
        runs = groups.get(name, [])
        acc, si = agg.final_values(runs, "acc1"), agg.final_values(runs, "si_mean")
        d_acc, d_si = agg.difference(acc, b_acc), agg.difference(si, b_si)
        deltas[name] = (d_acc, d_si, agg.summarize(si), agg.summarize(b_si))
        failed = len(agg.not_learned(runs, STUDY_CLASSES))
        rows.append([name, windows_text(runs), f"{failed} of {len(runs)}", agg.summarize(acc).fmt(4),
                     d_acc.fmt(2, 100) if d_acc.n else "–",
                     agg.summarize(si).fmt(3), d_si.fmt(3) if d_si.n else "–"])
    return rows, deltas


def _rule(groups, name, d_acc, supports: bool, contradicts: bool) -> str:
    """An α-sweep verdict: *inconclusive* without an interval of Δ acc1 or where the condition's
    seeds have two modes (some learned, some did not)."""
    if d_acc.n < 2 or not math.isfinite(d_acc.half) or _mixed(groups, name):
        return "inconclusive"
    return "supports" if supports else "contradicts" if contradicts else "inconclusive"


def claim_alpha(groups, figdir: str) -> str:
    names = [n for n in (BASE, MODERATE, STRONG, POSITIVE)]
    rows, d = _delta_rows(groups, names)

    # Each rule's "supports" and "contradicts" exclude each other, so their order does not matter.
    d_acc, d_si, _, _ = d[MODERATE]
    v_moderate = _rule(groups, MODERATE, d_acc, d_si.high < 0 and d_acc.low > -2 * POINT,
                       d_acc.high < -2 * POINT or d_si.low > 0)
    d_acc, _, si, b_si = d[STRONG]
    v_strong = _rule(groups, STRONG, d_acc,
                     si.mean <= 0.5 * b_si.mean and d_acc.high < 0 and d_acc.low > -5 * POINT,
                     d_acc.low > 0 or d_acc.high < -10 * POINT)
    d_acc, d_si, _, _ = d[POSITIVE]
    v_positive = _rule(groups, POSITIVE, d_acc, d_si.low > 0 and d_acc.high < 0, d_acc.low > 0)

    fig = plot_alpha(groups, names, os.path.join(figdir, "alpha_sweep.png"))
    table = agg.markdown_table(DELTA_HEADER, rows)
    return f"""## The α sweep (paper 2)

Paper 2 (Leavitt & Morcos): lowering class selectivity (α < 0) costs little accuracy; driving it
near 0 costs about 2 points; raising it (α > 0) hurts.

{table}

Δ: difference of the means, with a Welch 95 % interval (seeds are not paired across conditions).
{NOT_LEARNED}

**Rule.** α = −1: *supports* if Δ SI's interval is below 0 and Δ acc1's lower end is above −2
points; *contradicts* if Δ acc1's interval is below −2 points or Δ SI's is above 0.
α = −10: *supports* if its mean SI is at most half the α = 0 mean SI and Δ acc1's interval lies in
(−5, 0) points; *contradicts* if it lies above 0 or below −10 points. α = +10: *supports* if Δ SI's
interval is above 0 and Δ acc1's below 0; *contradicts* if Δ acc1's is above 0. Else *inconclusive*.

| claim | verdict |
|---|---|
| α = −1 lowers SI at little cost (> −2 points) | **{v_moderate}** |
| α = −10 (SI near 0) costs a few points | **{v_strong}** |
| α = +10 raises SI and hurts | **{v_positive}** |

![α sweep]({fig})
"""


def claim_windows(groups, figdir: str) -> str:
    rows, _ = _delta_rows(groups, [BASE, EARLY, LATE])
    early = agg.final_values(groups.get(EARLY, []), "acc1")
    late = agg.final_values(groups.get(LATE, []), "acc1")
    d = agg.difference(late, early)
    v = "inconclusive" if _mixed(groups, EARLY) or _mixed(groups, LATE) else verdict_interval(d)
    fig = plot_windows(groups, (BASE, EARLY, LATE), os.path.join(figdir, "windows.png"))
    table = agg.markdown_table(DELTA_HEADER, rows)
    return f"""## Early-only vs late regularization (paper 1's critical period)

Paper 1 (Ranadive et al.): regularizing selectivity away early in training hurts the final
accuracy; the same regularization later does not.

Both windows have the same α and the same length; the early one is followed by more epochs
without regularization than the late one, so a lasting early cost is not a lack of time to
recover.

{table}

Late − early final val acc1: {d.fmt(2, 100)} points (Welch 95 % interval).
{NOT_LEARNED}

**Rule.** *supports* if the interval of (late − early) lies above 0; *contradicts* if below 0;
else *inconclusive* (and *inconclusive* where either window has seeds that did and did not learn).

| claim | verdict |
|---|---|
| early-only regularization costs more than late | **{v}** |

![windows]({fig})
"""
