"""Figures and a table for selectivity-regularizer runs (tools/plot_regularization.py): the runs
grouped into conditions (aggregate: equal configs but for the seed), every value the mean over a
condition's seeds with its 95 % Student-t interval. A condition whose α is one constant from epoch
0 on (or no regularizer: α = 0) is a point of the α sweep; any other is a window condition."""
from __future__ import annotations

import math
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from selectivity.errors import DataError  # noqa: E402
from selectivity.io import save_figure  # noqa: E402
from selectivity.regularizer import parse_windows  # noqa: E402
from selectivity.study import aggregate as agg  # noqa: E402


def load_condition(label: str, runs: list) -> dict:
    """A condition (runs equal but for their seed): its α windows and its runs."""
    for run in runs:
        if not run.val:
            raise DataError(f"{run.path} has no val records in metrics.jsonl; train it first")
    windows = parse_windows(runs[0].config.get("selectivity_reg") or [])
    active = [w for w in windows if w.alpha != 0]
    if not active:
        const = 0.0
    elif len(active) == 1 and active[0].start == 0 and math.isinf(active[0].end):
        const = active[0].alpha
    else:
        const = None
    return {"name": label, "windows": windows, "const_alpha": const, "runs": runs}


def load_conditions(dirs: list[str]) -> list[dict]:
    try:
        groups = agg.load_groups(dirs)
    except agg.AggregateError as e:
        raise DataError(str(e)) from None
    return [load_condition(label, runs) for label, runs in groups.items()]


def describe(windows) -> str:
    parts = [f"α={w.alpha:g} [{w.start:g}, {'∞' if math.isinf(w.end) else f'{w.end:g}'})"
             for w in windows if w.alpha != 0]
    return ", ".join(parts) if parts else "α=0"


def _fmt(s: agg.Summary) -> str:
    if s.n == 0:
        return "–"
    return f"{s.mean:.4f}" if s.n == 1 else f"{s.mean:.4f} ± {s.half:.4f}"


def last_si_reg(run):
    si_reg = [t["si_reg"] for t in run.train if t.get("si_reg") is not None]
    return si_reg[-1] if si_reg else None


def table(conds: list[dict]) -> str:
    rows = ["| condition | α windows (epochs) | epoch | val acc1 | val si_mean | si_null | "
            "train si_reg (last) | n |", "|---|---|---|---|---|---|---|---|"]
    for c in conds:
        runs = c["runs"]
        epochs = sorted({r.final["epoch"] for r in runs})
        rows.append(f"| {c['name']} | {describe(c['windows'])} | "
                    f"{', '.join(f'{e:g}' for e in epochs)} | "
                    f"{_fmt(agg.summarize(agg.final_values(runs, 'acc1')))} | "
                    f"{_fmt(agg.summarize(agg.final_values(runs, 'si_mean')))} | "
                    f"{_fmt(agg.summarize(agg.final_values(runs, 'si_null')))} | "
                    f"{_fmt(agg.summarize([last_si_reg(r) for r in runs]))} | {len(runs)} |")
    return "\n".join(rows) + f"\n\n± : {agg.INTERVAL}; n: seeds"


def _err(s: agg.Summary, scale=1.0) -> float:
    return s.half * scale if math.isfinite(s.half) else 0.0


def plot_alpha(conds: list[dict], path: str) -> bool:
    pts = sorted((c for c in conds if c["const_alpha"] is not None),
                 key=lambda c: c["const_alpha"])
    if len({c["const_alpha"] for c in pts}) < 2:
        return False
    a = np.array([c["const_alpha"] for c in pts])
    acc = [agg.summarize(agg.final_values(c["runs"], "acc1")) for c in pts]
    si = [agg.summarize(agg.final_values(c["runs"], "si_mean")) for c in pts]
    null = [agg.summarize(agg.final_values(c["runs"], "si_null")) for c in pts]
    lin = max(min(abs(x) for x in a if x != 0) if any(a != 0) else 1.0, 1e-6)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].errorbar(a, [s.mean * 100 for s in acc], yerr=[_err(s, 100) for s in acc],
                     marker="o", capsize=3)
    axes[0].set_ylabel("final val top-1 (%)")
    axes[1].errorbar(a, [s.mean for s in si], yerr=[_err(s) for s in si], marker="o", capsize=3,
                     label="val si_mean")
    axes[1].errorbar(a, [s.mean for s in null], yerr=[_err(s) for s in null], marker=".",
                     linestyle=":", color="gray", capsize=2, label="label-shuffled null")
    base = [s for c, s in zip(pts, si) if c["const_alpha"] == 0]
    if base and math.isfinite(base[0].mean):
        axes[1].axhline(0.5 * base[0].mean, color="C3", linewidth=0.8,
                        linestyle="--", label="½ × si_mean at α = 0")
    axes[1].set_ylabel("final val mean SI")
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xscale("symlog", linthresh=lin)
        ax.set_xticks(a)
        ax.set_xticklabels([f"{x:g}" for x in a], fontsize=7)
        ax.axvline(0, color="k", linewidth=0.5)
        ax.set_xlabel("α  (loss = CE − α·SI;  α < 0 suppresses selectivity)")
        ax.grid(alpha=0.3)
    epochs = sorted({r.final["epoch"] for c in pts for r in c["runs"]})
    ns = sorted({len(c["runs"]) for c in pts})
    fig.suptitle(f"selectivity regularizer, constant α (final epoch "
                 f"{', '.join(map(str, epochs))}; seeds per point n = {', '.join(map(str, ns))};"
                 f" bars: 95 % t-interval)", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    return True


def plot_curves(conds: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for i, c in enumerate(conds):
        color = f"C{i % 10}"
        label = f"{c['name']}: {describe(c['windows'])} (n = {len(c['runs'])})"
        agg.plot_band(axes[0], agg.curve(c["runs"], "acc1"), label, color, 100)
        agg.plot_band(axes[1], agg.curve(c["runs"], "si_mean"), None, color)
        agg.plot_band(axes[1], agg.curve(c["runs"], "si_null"), None, color, linestyle=":",
                      marker=None)
        tr = [t for t in c["runs"][0].train if t.get("si_reg") is not None]
        if tr:  # the first seed's minibatch term (train records are not aligned across seeds)
            axes[2].plot([t["epoch"] for t in tr], [t["si_reg"] for t in tr], color=color,
                         linewidth=1)
        for w in c["windows"]:
            if w.alpha != 0 and w.start > 0:
                for ax in axes:
                    ax.axvline(w.start, color=color, linewidth=0.8, linestyle="--", alpha=0.6)
    axes[0].set_ylabel("val top-1 (%)")
    axes[1].set_ylabel("val mean SI (dotted: shuffled null)")
    axes[2].set_ylabel("train minibatch SI_reg (first seed)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dashed: a window starts; band: 95 % t over seeds",
                   title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def report(runs: list[str], out: str | None = None, curves: bool = False) -> tuple[str, list]:
    """Draw the figures of the runs into ``out`` (default: figures/ in the runs' common parent
    directory, which must not itself be a run): reg_alpha.png where the constant-α conditions hold
    at least two values of α, reg_curves.png where a window condition is present (or ``curves``).
    Returns (the table, one markdown row per condition; the figures written)."""
    runs_dirs = [r for r in runs if os.path.isdir(r) and
                 os.path.basename(os.path.normpath(r)) != "figures"]
    for r in runs:
        if not os.path.isdir(r):
            raise DataError(f"run directory not found: {r}")
    conds = load_conditions(runs_dirs)
    if not out:
        parent = os.path.commonpath([os.path.dirname(os.path.abspath(r)) for r in runs_dirs])
        if os.path.exists(os.path.join(parent, "config.yaml")):
            raise DataError(f"the runs' common parent {parent} is itself a run; "
                            f"choose an output directory with --out")
        out = os.path.join(parent, "figures")
    os.makedirs(out, exist_ok=True)
    written = []
    path = os.path.join(out, "reg_alpha.png")
    if plot_alpha(conds, path):
        written.append(path)
    if curves or any(c["const_alpha"] is None for c in conds):
        path = os.path.join(out, "reg_curves.png")
        plot_curves(conds, path)
        written.append(path)
    conds.sort(key=lambda c: (c["const_alpha"] is None, c["const_alpha"] or 0, c["name"]))
    return table(conds), written
