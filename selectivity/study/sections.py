"""The findings' sections for the papers' claims: per claim group a table of paired values over
the main seeds, the rules and the verdicts (findings.py puts them together)."""
from __future__ import annotations

import math
import os

from selectivity.regularizer import parse_windows
from selectivity.study import aggregate as agg
from selectivity.study import stats
from selectivity.study.claims import (StudyData, claim_values, cka_mean, conditions_of, final,
                                      learned, rates)
from selectivity.study.design import BASE, COMPARISONS
from selectivity.study.figures import plot_ablation, plot_alpha, plot_si, plot_windows
from selectivity.study.rules import RULES, rule_text
from selectivity.train.config import from_dict
from selectivity.train.trainer import lr_factor

PAPER = {
    "emergence": "Paper 1 (Ranadive et al.): class selectivity emerges early in training and then "
                 "recedes.",
    "alpha": "Paper 2 (Leavitt & Morcos): lowering class selectivity (α < 0) costs little "
             "accuracy; driving it near 0 costs a few points; raising it (α > 0) hurts.",
    "windows": "Paper 1: suppressing selectivity from epoch 0 on is detrimental; from a later "
               "epoch on it has little effect on the final accuracy.",
    "ablation": "Paper 1: early in training, ablating the most class-selective units hurts more "
                "than ablating random ones; the difference shrinks later.",
    "cka": "Paper 1: early in training the network is close to a linear regime (its code: "
           "linear CKA between stage outputs and logits).",
    "orientation": "Paper 3 (Ukita): orientation-selective units exist in low and high layers; "
                   "their selectivity in low layers rises with training; ablating them hurts "
                   "generalization, partly by breaking the higher layers' shift invariance.",
}
SECTIONS = {"emergence": "SI emergence and recession (paper 1)",
            "alpha": "The α sweep (paper 2)",
            "windows": "When the regularizer starts (paper 1's critical period)",
            "ablation": "Ablation: selective vs random units (paper 1)",
            "cka": "CKA linearity (paper 1)",
            "orientation": "Orientation selectivity (paper 3)"}


def unit_scale(rule) -> tuple[float, int]:
    return (100.0, 2) if rule.unit == "points" else (1.0, 3)


def fmt_p(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:.2g}"


def windows_text(cfg: dict) -> str:
    ws = [w for w in parse_windows(cfg.get("selectivity_reg") or []) if w.alpha != 0]
    if not ws:
        return "α = 0"
    return ", ".join(f"α = {w.alpha:g} on [{w.start:g}, "
                     f"{'end' if math.isinf(w.end) else format(w.end, 'g')})" for w in ws)


def _lr_text(cfg: dict, steps_per_epoch: int) -> str:
    """The learning rate at each window's start and end (the trainer's own schedule)."""
    c = from_dict(cfg)
    out = []
    for w in parse_windows(cfg.get("selectivity_reg") or []):
        if w.alpha == 0:
            continue
        end = min(w.end, c.epochs)
        lr = [c.lr * lr_factor(c, min(int(round(e * steps_per_epoch)),
                                      c.epochs * steps_per_epoch - 1), steps_per_epoch)
              for e in (w.start, end)]
        out.append(f"{lr[0]:.3g} → {lr[1]:.3g}")
    return ", ".join(out) or "–"


def _steps_per_epoch(data: StudyData) -> int:
    for rs in data.runs.values():
        for r in rs.values():
            if r.val and r.final.get("epoch"):
                return int(round(r.final["step"] / r.final["epoch"]))
    return 1


def config_of(data: StudyData, condition: str) -> dict:
    rs = data.runs.get(condition, {})
    return next(iter(rs.values())).config if rs else {}


def _rate_note(data: StudyData, rule_id: str) -> str:
    """One line where seeds failed: both conditions' rates and Fisher's test between them."""
    conds = conditions_of(rule_id)
    got = [(c, *rates(data, c)) for c in conds]
    if not any(k for _, k, _ in got):
        return ""
    parts = [f"`{c}` {k} of {n}" for c, k, n in got]
    p = stats.fisher(got[0][1], got[0][2], got[1][1], got[1][2]) if len(got) == 2 else math.nan
    return f"- `{rule_id}`: did not learn {', '.join(parts)}; Fisher p = {fmt_p(p)}.\n"


def _rate_notes(data: StudyData, ids) -> str:
    notes = "".join(_rate_note(data, i) for i in ids)
    return ("\n**Seeds that did not learn** (where the rates differ at p < 0.05 they decide the "
            "comparison of accuracy, see the rule):\n" + notes) if notes else ""


# ----- claim sections ----------------------------------------------------------------------------


def _verdict_rows(results: dict, section: str) -> str:
    rows = []
    for rule in RULES:
        if rule.section != section:
            continue
        r = results[rule.id]
        scale, digits = unit_scale(rule)
        primary = r.stats.get(rule.stats[0])
        rows.append([rule.claim, primary.fmt(digits, scale) if primary else "–",
                     f"**{r.verdict}**"])
    return agg.markdown_table(["claim", "primary statistic (paired, 95 % t; tests two-sided)",
                               "verdict"], rows)


def _rules(section: str) -> str:
    return "\n".join(f"- `{r.id}` ({', '.join(r.stats)}): {rule_text(r)}."
                     for r in RULES if r.section == section)


def emergence_section(data, results, figdir) -> str:
    runs = list(data.runs.get(BASE, {}).values())
    e = data.peak_epoch
    rows = []
    for layer in [None] + agg.layers_of(runs):
        key = "si_mean" if layer is None else "si"
        nkey = "si_null_q95" if layer is None else "si_null_q95_layers"
        at = {r.seed: agg.at_epoch(r, e, key, layer) for r in runs}
        null = {r.seed: agg.at_epoch(r, e, nkey, layer) for r in runs}
        fin = {r.seed: agg.record_value(r.final, key, layer) for r in runs}
        init = {r.seed: agg.at_epoch(r, 0.0, key, layer) for r in runs}
        rows.append([layer or "**mean over layers**", stats.paired(init).summary.fmt(3),
                     stats.paired(at).summary.fmt(3), stats.paired(null).summary.fmt(3),
                     stats.paired(stats.differences(at, null)).summary.fmt(3),
                     stats.paired(fin).summary.fmt(3),
                     stats.paired(stats.differences(at, fin)).summary.fmt(3)])
    fig = plot_si(runs, "si_null_q95", os.path.join(figdir, "si_emergence.png"), e, BASE) \
        if runs else None
    table = agg.markdown_table(["layer", "SI at init", f"SI at epoch {e:g}", "null (q95) there",
                                "SI − null", "final SI", "peak − final"], rows)
    return f"""## {SECTIONS['emergence']}

{PAPER['emergence']}

Condition `{BASE}`, main seeds. The peak epoch ({e:g}) was chosen on the pilot seeds' mean curve
and is read here on seeds that did not choose it; "peak − final" is paired within a seed.

{table}

**Rules.**
{_rules('emergence')}

{_verdict_rows(results, 'emergence')}
""" + (f"\n![SI over training]({fig})\n" if fig else "")


def _delta_table(data, ids) -> str:
    rows = []
    for rid in ids:
        a, b = COMPARISONS[rid]
        la = learned(data, a)
        acc = {s: v for s, v in final(data, a, "acc1").items() if la.get(s)}
        si = {s: v for s, v in final(data, a, "si_mean").items() if la.get(s)}
        d = claim_values(rid, data)
        k, n = rates(data, a)
        rows.append([f"`{a}` − `{b}`", windows_text(config_of(data, a)), f"{k} of {n}",
                     stats.paired(acc).summary.fmt(4), stats.paired(d["acc"]).fmt(2, 100),
                     stats.paired(si).summary.fmt(3), stats.paired(d["si"]).fmt(3)])
    return agg.markdown_table(["comparison", "regularizer", "did not learn",
                               "final val acc1 (learned)", "Δ acc1 (points, paired)",
                               "final mean SI (learned)", "Δ SI (paired)"], rows)


def alpha_section(data, results, figdir) -> str:
    ids = [r.id for r in RULES if r.section == "alpha"]
    names = [BASE] + [COMPARISONS[i][0] for i in ids]
    groups = {c: list(data.runs.get(c, {}).values()) for c in names}
    fig = plot_alpha(groups, names, os.path.join(figdir, "alpha_sweep.png"))
    notes = _rate_notes(data, ids)
    return f"""## {SECTIONS['alpha']}

{PAPER['alpha']}

{_delta_table(data, ids)}
{notes}

**Rules.**
{_rules('alpha')}

{_verdict_rows(results, 'alpha')}

![α sweep]({fig})
"""


def windows_section(data, results, figdir) -> str:
    ids = [r.id for r in RULES if r.section == "windows"]
    spe = _steps_per_epoch(data)
    conds = [BASE, "alpha_m10", "from_e2_m10", "from_e4_m10", "early_m10", "late_m10"]
    lr_rows = [[f"`{c}`", windows_text(config_of(data, c)), _lr_text(config_of(data, c), spe)]
               for c in conds if c in data.runs]
    groups = {c: list(data.runs.get(c, {}).values()) for c in conds}
    fig = plot_windows(groups, conds, os.path.join(figdir, "windows.png"))
    notes = _rate_notes(data, ids)
    return f"""## {SECTIONS['windows']}

{PAPER['windows']}

Paper 1's own protocol compares α < 0 *from epoch 0 on* with *from a later epoch on*; here the
later starts are epoch 2 (early-ish) and epoch 4 (mid-training) of 8. The equal windows (same α,
same length, different position) are this project's earlier design, kept beside it. The cosine
schedule gives each window a different learning rate:

{agg.markdown_table(["condition", "regularizer", "learning rate at window start → end"], lr_rows)}

{_delta_table(data, ids)}
{notes}

**Rules.**
{_rules('windows')}

{_verdict_rows(results, 'windows')}

![windows]({fig})
"""


def ablation_section(data, results, figdir) -> str:
    per = data.analyses.get("ablate", {})
    epochs = sorted({e for a in per.values() for e in a})
    rows = []
    for e in epochs:
        def vals(cond):
            return {s: a[e].get(cond) for s, a in per.items() if e in a}
        rows.append([f"{e:g}", stats.paired(vals("selective")).summary.fmt(3),
                     stats.paired(vals("random")).summary.fmt(3),
                     stats.paired(stats.differences(vals("random"), vals("selective"))).fmt(3)])
    fig = plot_ablation(list(per.values()), epochs, os.path.join(figdir, "ablation.png"), BASE) \
        if epochs else None
    return f"""## {SECTIONS['ablation']}

{PAPER['ablation']}

`tools/ablate.py` on every `{BASE}` main seed at the first trained checkpoint and the final one;
AUC = the normalized accuracy (ablated / unablated) averaged over the grid of ablated fractions,
then over the stages (lower = the ablation hurts more). `early` is (AUC random − AUC selective) at
the first checkpoint, `interaction` is `early` minus the same gap at the final checkpoint, paired
within a seed.

{agg.markdown_table(["epoch", "AUC selective", "AUC random", "random − selective"], rows)}

**Rules.**
{_rules('ablation')}

{_verdict_rows(results, 'ablation')}
""" + (f"\n![ablation]({fig})\n" if fig else "")


def cka_section(data, results, figdir) -> str:
    per = data.analyses.get("cka", {})
    epochs = sorted({e for recs in per.values() for e in recs})
    rows = [[f"{e:g}", stats.paired({s: cka_mean(r.get(e)) for s, r in per.items()}).summary.fmt(3),
             stats.paired({s: cka_mean(r.get(e), "random_init")
                           for s, r in per.items()}).summary.fmt(3)] for e in epochs]
    d = claim_values("cka", data)
    return f"""## {SECTIONS['cka']}

{PAPER['cka']}

`tools/cka.py` on every `{BASE}` main seed: CKA(stage output, logits), the mean over stages. The
"fresh random init" baseline is a newly initialised network *per seed* (seeded from the run's
seed), so its interval is over as many initialisations as seeds. Early = the first trained
checkpoint. Early − random init (paired): {stats.paired(d['early_minus_random_init']).fmt(3)}.

{agg.markdown_table(["epoch", "CKA with logits (trained)", "fresh random init"], rows)}

**Rules.**
{_rules('cka')}

{_verdict_rows(results, 'cka')}
"""


def orientation_section(data, results, figdir) -> str:
    d = claim_values("orientation_exists", data)
    rows = [[k, stats.paired(v).fmt(3)] for k, v in d.items()]
    return f"""## {SECTIONS['orientation']}

{PAPER['orientation']}

`tools/orientation.py` on every `{BASE}` main seed: gOSI of each live unit to sinusoidal gratings
against a per-unit permuted control, per layer group (low: stem, layer1; high: layer3). `low` and
`high`: gOSI − control at the final checkpoint; `rise`: the low layers' gOSI, final − epoch 0;
`loss`: val loss increase after ablating the low layers' top half by gOSI minus after their bottom
half; `shift`: the higher stage outputs' centred shift invariance after ablating the bottom half
minus after the top half. All paired within a seed.

{agg.markdown_table(["statistic", "value (paired, 95 % t)"], rows)}

**Rules.**
{_rules('orientation')}

{_verdict_rows(results, 'orientation')}
"""


