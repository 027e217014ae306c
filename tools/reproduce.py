#!/usr/bin/env python
"""One command for the small-scale study: train conditions × seeds, test each claim, write findings.

    python tools/reproduce.py [--out runs/reproduce] [--seeds 0 1 2] [--jobs 2]
    python tools/reproduce.py --tiny --out /tmp/repro_tiny      # CI: the same path, in minutes

Trains every condition of configs/study/ (ResNet-20 on digits_hard: α = 0, the α grid, and
paper 1's early-only / late windows of equal length) for every seed with tools/study.py's runner
(resumable: finished runs are skipped, unfinished ones resumed), then writes

  <docs>/findings.md         a table per claim: our value ± its 95 % t-interval over seeds and n,
                             the paper's statement, and a verdict (supports / contradicts /
                             inconclusive) decided by the rule printed beside the table;
  <docs>/findings/*.png      the figures it cites (mean over seeds, 95 % band).

``<docs>`` is ``docs/`` for the full study and the ``--out`` directory with ``--tiny`` (a tiny run
never overwrites the committed findings). Every number in findings.md comes from the runs; nothing
is typed. ``--tiny`` keeps every condition and every step of the analysis but trains 1 epoch at
16 px on 2 seeds, the α windows scaled to the shorter training: its numbers test the pipeline, not
the papers. ``--analyse-only`` skips training and writes the findings from the runs there are.

The claims measured on checkpoints run tools/ablate.py, tools/cka.py and tools/orientation.py on
every α = 0 seed, ``RUN --out <out>/analysis/<tool>/<seed>`` with bounded arguments (resumable too:
a finished one is skipped; tools/reproduce_analyses.py).
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

from selectivity.study import aggregate as agg
from selectivity.train.config import ConfigError, load_config, to_dict
from selectivity.errors import run_cli
from selectivity.study.figures import plot_alpha, plot_si, plot_windows
from selectivity.regularizer import parse_windows

import study  # noqa: E402  (tools/study.py: the runner)
from reproduce_analyses import (claim_ablation, claim_cka, claim_orientation,
                                verdict_interval)

CONDITIONS = os.path.join(ROOT, "configs", "study")
BASE, MODERATE, STRONG, POSITIVE, EARLY, LATE = ("alpha_0", "alpha_m1", "alpha_m10", "alpha_p10",
                                                 "early_m10", "late_m10")
# The tiny mode: the same conditions and analysis, small enough for CI on 2 cores. At 16 px and
# one epoch the evaluations cost as much as the training, hence fewer BatchNorm-calibration images,
# no second val pass with the running statistics, and 3 evaluations inside the epoch.
TINY = {"epochs": 1, "image_size": 16, "eval_every_steps": 22, "eval_batch_size": 540,
        "bn_images": 256, "eval_running_bn": False}
TINY_SEEDS = [0, 1]
POINT = 0.01  # one accuracy point
STUDY_CLASSES = 10  # digits_hard, the study's dataset (configs/study/)


# ----- conditions --------------------------------------------------------------------------------


def scale_windows(windows: list, factor: float) -> list:
    """Windows with start/end multiplied by ``factor`` (the tiny mode's shorter training)."""
    out = []
    for w in windows:
        d = {"alpha": w.alpha, "start": w.start * factor}
        if math.isfinite(w.end):
            d["end"] = w.end * factor
        out.append(d)
    return out


def study_conditions(tiny: bool) -> "OrderedDict[str, dict]":
    paths = sorted(glob.glob(os.path.join(CONDITIONS, "*.yaml")))
    if not paths:
        raise ConfigError(f"no condition configs in {CONDITIONS}")
    out = OrderedDict()
    for path in paths:
        cfg = to_dict(load_config(path))
        if tiny:
            factor = TINY["epochs"] / cfg["epochs"]
            cfg.update(TINY)
            cfg["selectivity_reg"] = scale_windows(parse_windows(cfg["selectivity_reg"]), factor)
        cfg["threads"] = 1  # several single-threaded runs side by side
        out[os.path.splitext(os.path.basename(path))[0]] = {
            k: v for k, v in cfg.items() if k not in study.PER_RUN}
    return out


# ----- claims ------------------------------------------------------------------------------------


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


def claim_alpha(groups, figdir: str) -> str:
    names = [n for n in (BASE, MODERATE, STRONG, POSITIVE)]
    rows, d = _delta_rows(groups, names)

    def v_moderate():
        d_acc, d_si, _, _ = d[MODERATE]
        if d_acc.n < 2 or not math.isfinite(d_acc.half) or _mixed(groups, MODERATE):
            return "inconclusive"
        if d_si.high < 0 and d_acc.low > -2 * POINT:
            return "supports"
        if d_acc.high < -2 * POINT or d_si.low > 0:
            return "contradicts"
        return "inconclusive"

    def v_strong():
        d_acc, _, si, b_si = d[STRONG]
        if d_acc.n < 2 or not math.isfinite(d_acc.half) or _mixed(groups, STRONG):
            return "inconclusive"
        if d_acc.low > 0 or d_acc.high < -10 * POINT:
            return "contradicts"
        if si.mean <= 0.5 * b_si.mean and d_acc.high < 0 and d_acc.low > -5 * POINT:
            return "supports"
        return "inconclusive"

    def v_positive():
        d_acc, d_si, _, _ = d[POSITIVE]
        if d_acc.n < 2 or not math.isfinite(d_acc.half) or _mixed(groups, POSITIVE):
            return "inconclusive"
        if d_si.low > 0 and d_acc.high < 0:
            return "supports"
        if d_acc.low > 0:
            return "contradicts"
        return "inconclusive"

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
| α = −1 lowers SI at little cost (> −2 points) | **{v_moderate()}** |
| α = −10 (SI near 0) costs a few points | **{v_strong()}** |
| α = +10 raises SI and hurts | **{v_positive()}** |

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


# ----- the command -------------------------------------------------------------------------------


def write_findings(groups, docs: str, command: str, tiny: bool, out: str, jobs: int) -> str:
    figdir = os.path.join(docs, "findings")
    sections = [claim_emergence(groups, figdir), claim_alpha(groups, figdir),
                claim_windows(groups, figdir)]
    base = groups.get(BASE, [])
    sections += [claim(base, BASE, out, figdir, jobs)
                 for claim in (claim_ablation, claim_cka, claim_orientation)]
    ns = ", ".join(f"`{k}` {len(v)}" for k, v in groups.items())
    cfg = next(iter(groups.values()))[0].config if groups else {}
    head = f"""# Findings of the small-scale study

Generated by `{command}`; do not edit by hand (rerun the command). {'**Tiny mode**: a pipeline check, too short to test the papers; its verdicts mean nothing.' if tiny else ''}

Setup: `{cfg.get('model')}` on `{cfg.get('dataset')}` at {cfg.get('image_size')} px,
{cfg.get('epochs')} epoch(s), BatchNorm at evaluation: `{cfg.get('bn_mode', 'running (older runs)')}`.
Runs (seeds) per condition: {ns}. Every interval is a {agg.INTERVAL}; n is the number of seeds that had the value.
"""
    text = head + "\n" + "\n".join(sections)
    os.makedirs(docs, exist_ok=True)
    path = os.path.join(docs, "findings.md")
    from selectivity.train.checkpoint import atomic_write_text
    atomic_write_text(path, text)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "reproduce"),
                   help="the study's run directory (default runs/reproduce)")
    p.add_argument("--docs", help="where findings.md and findings/ go (default: docs/, or --out "
                                  "with --tiny)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (tiny: 0 1)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--tiny", action="store_true", help="the CI version (minutes)")
    p.add_argument("--analyse-only", action="store_true", help="no training; findings only")
    args = p.parse_args(argv)
    seeds = args.seeds or (TINY_SEEDS if args.tiny else [0, 1, 2])
    if not args.tiny and len(seeds) < 3:
        raise ConfigError(f"the study needs at least 3 seeds for its intervals, got {seeds}")
    docs = args.docs or (args.out if args.tiny else os.path.join(ROOT, "docs"))
    conditions = study_conditions(args.tiny)
    t0 = time.time()
    if not args.analyse_only:
        failed = study.run_study(conditions, seeds, args.out, args.jobs)
        if failed:
            print(f"error: {len(failed)} run(s) failed ({', '.join(failed)}); rerun the same "
                  f"command to resume them", file=sys.stderr)
            sys.exit(1)
    t_train = time.time() - t0
    run_dirs = [os.path.join(args.out, c, f"s{s}") for c in conditions for s in seeds]
    run_dirs = [d for d in run_dirs if os.path.exists(os.path.join(d, "config.yaml"))]
    if not run_dirs:
        raise ConfigError(f"no runs in {args.out}; run without --analyse-only first")
    groups = OrderedDict()
    for cond in conditions:  # group by the study's own condition names (its folders)
        runs = [agg.load_run(d) for d in run_dirs if os.path.basename(os.path.dirname(d)) == cond]
        if runs:
            groups[cond] = runs
    command = "python tools/reproduce.py" + (" --tiny" if args.tiny else "")
    path = write_findings(groups, docs, command, args.tiny, args.out, args.jobs)
    print(f"wrote {path} and {os.path.join(docs, 'findings')}/ "
          f"(training {t_train:.0f} s, total {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
