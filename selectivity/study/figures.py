"""The figures of the reproducible study (tools/reproduce.py): curves as the mean over seeds with
a 95 % interval band (selectivity/study/aggregate.py), every figure saying its n."""
from __future__ import annotations

import math
import os
from collections import OrderedDict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from selectivity.study import aggregate as agg  # noqa: E402
from selectivity.io import save_figure  # noqa: E402
from selectivity.regularizer import parse_windows  # noqa: E402


def _save(fig, path: str) -> str:
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _n_note(runs) -> str:
    return f"n = {len(runs)} seeds; band: {agg.INTERVAL}"


def plot_si(runs, nk: str, path: str, peak_epoch: float, base: str) -> str:
    """Mean SI with its null, then one panel per stage (its layers, each with its band)."""
    stages = OrderedDict()
    for layer in agg.layers_of(runs):
        stages.setdefault(layer.split(".")[0], []).append(layer)
    fig, axes = plt.subplots(1, 1 + len(stages), figsize=(4.2 * (1 + len(stages)), 3.4),
                             squeeze=False)
    axes = axes[0]
    agg.plot_band(axes[0], agg.curve(runs, "si_mean"), "val mean SI")
    agg.plot_band(axes[0], agg.curve(runs, nk), f"null ({nk})", color="gray", linestyle=":")
    axes[0].axvline(peak_epoch, color="k", linewidth=0.6, linestyle="--")
    axes[0].set_ylabel("mean SI over layers")
    for ax, (stage, layers) in zip(axes[1:], stages.items()):
        for i, layer in enumerate(layers):
            agg.plot_band(ax, agg.curve(runs, "si", layer), layer, color=f"C{i % 10}",
                          marker=None)
        ax.set_ylabel(f"mean SI, {stage}")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.suptitle(f"{base}: {_n_note(runs)}; dashed: the peak of the mean curve", fontsize=8)
    return _save(fig, path)


def plot_alpha(groups, names, path: str) -> str:
    pts = []
    for name in names:
        runs = groups.get(name, [])
        if runs:
            ws = parse_windows(runs[0].config.get("selectivity_reg") or [])
            alpha = ws[0].alpha if ws else 0.0
            pts.append((alpha, agg.summarize(agg.final_values(runs, "acc1")),
                        agg.summarize(agg.final_values(runs, "si_mean")), len(runs)))
    pts.sort(key=lambda p: p[0])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, idx, label, scale in ((axes[0], 1, "final val top-1 (%)", 100),
                                  (axes[1], 2, "final val mean SI", 1)):
        x = [p[0] for p in pts]
        y = [p[idx].mean * scale for p in pts]
        e = [(p[idx].half if math.isfinite(p[idx].half) else 0) * scale for p in pts]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("α  (loss = CE − α·SI)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"final values, mean ± 95 % t-interval over seeds "
                 f"(n = {', '.join(str(p[3]) for p in pts)})", fontsize=8)
    return _save(fig, path)


def _checkpoint_axes(axes) -> None:
    for ax in axes:
        ax.set_xlabel("checkpoint epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)


def plot_ablation(per_seed, epochs, path: str, base: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for i, cond in enumerate(("selective", "random", "least")):
        agg.plot_band(axes[0], agg.curve_from(epochs, lambda e: [a[e].get(cond) for a in per_seed
                                                                 if e in a]), cond, f"C{i}")
    diff = agg.curve_from(epochs, lambda e: [a[e]["random"] - a[e]["selective"] for a in per_seed
                                             if e in a and {"random", "selective"} <= set(a[e])])
    agg.plot_band(axes[1], diff, "random − selective", "C3")
    axes[1].axhline(0, color="k", linewidth=0.6)
    axes[0].set_ylabel("ablation AUC (normalized accuracy)")
    axes[1].set_ylabel("AUC random − AUC selective")
    _checkpoint_axes(axes)
    fig.suptitle(f"{base}: n = {len(per_seed)} seeds; band: {agg.INTERVAL}", fontsize=8)
    return _save(fig, path)


def plot_windows(groups, names, path: str) -> str:
    """``names``: the conditions to draw (the unregularized one, then the windows)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, name in enumerate(names):
        runs = groups.get(name, [])
        if not runs:
            continue
        color = f"C{i}"
        agg.plot_band(axes[0], agg.curve(runs, "acc1"), f"{name} (n = {len(runs)})", color, 100)
        agg.plot_band(axes[1], agg.curve(runs, "si_mean"), name, color)
        for w in parse_windows(runs[0].config.get("selectivity_reg") or []):
            if w.alpha != 0:
                end = w.end if math.isfinite(w.end) else runs[0].config.get("epochs", w.start)
                for ax in axes:
                    ax.axvspan(w.start, end, color=color, alpha=0.08)
    axes[0].set_ylabel("val top-1 (%)")
    axes[1].set_ylabel("val mean SI")
    for ax in axes:
        ax.set_xlabel("epoch (shaded: α ≠ 0)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mean over seeds; band: {agg.INTERVAL}", fontsize=8)
    return _save(fig, path)
