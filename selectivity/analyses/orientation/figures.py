"""Orientation figures from ``run.orientation_records`` records: gOSI
distributions against the permuted control, mean gOSI by epoch, the ablation by gOSI halves,
and shift invariance."""
from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np

from selectivity.analyses.common import measured_epochs
from selectivity.io import save_figure
from selectivity.analyses.orientation.run import CENTRED, TUNED, layer_groups


def _near(records, epochs):
    picked = set(measured_epochs(epochs, [r["epoch"] for r in records], "--plot-epochs"))
    return [r for r in records if r["epoch"] in picked]


def _live(rec, layer, key):
    d = rec["layers"][layer]
    dead = set(d["dead_units"])
    return np.array([v for i, v in enumerate(d[key]) if i not in dead], float)


def plot_distributions(records, layers, plot_epochs, title, path):
    shown = _near(records, plot_epochs) if plot_epochs else \
        [records[i] for i in sorted({0, len(records) // 2, len(records) - 1})]
    ncols = min(5, len(layers))
    nrows = -(-len(layers) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.6 * nrows), squeeze=False,
                             sharey=True)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, layers):
        for k, rec in enumerate(shown):
            for offset, key, color in ((-0.2, "gosi", "C0"), (0.2, "control_gosi", "0.6")):
                vals = _live(rec, name, key)
                pos = k + offset
                if vals.size >= 2 and vals.std() > 0:
                    parts = ax.violinplot([vals], positions=[pos], widths=0.38, showmedians=True)
                    for body in parts["bodies"]:
                        body.set_facecolor(color)
                        body.set_alpha(0.6)
                    for line in ("cbars", "cmins", "cmaxes", "cmedians"):
                        parts[line].set_color(color)
                elif vals.size:
                    ax.plot([pos] * vals.size, vals, "o", color=color, markersize=3)
        ax.axhline(TUNED, color="k", linestyle=":", linewidth=0.8)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([f"ep {r['epoch']:.3g}" for r in shown], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[:, 0]:
        ax.set_ylabel("gOSI (live units)")
    handles = [plt.Rectangle((0, 0), 1, 1, color="C0", alpha=0.6),
               plt.Rectangle((0, 0), 1, 1, color="0.6", alpha=0.6)]
    fig.legend(handles, ["gOSI", "permuted control"], loc="upper right", fontsize=8)
    fig.suptitle(f"{title}; dotted: gOSI = {TUNED} (tuned)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return save_figure(fig, path)


def plot_by_epoch(records, layers, title, path):
    ep = [r["epoch"] for r in records]
    groups = layer_groups(layers)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.3), squeeze=False,
                             sharey=True)
    for ax, (group, names) in zip(axes[0], groups.items()):
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(names)))
        for c, name in zip(colors, names):
            g = [r["layers"][name]["gosi_mean"] for r in records]
            ctl = [r["layers"][name]["control_gosi_mean"] for r in records]
            ax.plot(ep, [np.nan if v is None else v for v in g], marker="o", markersize=3,
                    color=c, label=name)
            ax.plot(ep, [np.nan if v is None else v for v in ctl], "--", color=c, linewidth=1)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean gOSI of live units")
    fig.suptitle(f"{title}; dashed: permuted control", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_ablation(records, layers, title, path):
    """Top row, at the last ablated epoch: loss increase (± SEM) and accuracy drop per layer, top vs
    bottom half. Bottom row (several ablated epochs): top − bottom loss increase vs epoch."""
    ablated = [r for r in records if r["ablation"]]
    last = ablated[-1]
    rows = {(a["layer"], a["group"]): a for a in last["ablation"]}
    x = np.arange(len(layers))
    trend = len(ablated) > 1
    width = max(4.5, 0.45 * len(layers) + 1.5)
    fig = plt.figure(figsize=(2 * width, 7.0 if trend else 3.8))
    grid = fig.add_gridspec(2 if trend else 1, 2)
    axes = [fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])]
    for k, (group, color) in enumerate((("top", "C3"), ("bottom", "C0"))):
        inc = [_nan(rows[(n, group)]["loss_increase"]) for n in layers]
        sem = [_nan(rows[(n, group)]["loss_increase_sem"]) for n in layers]
        drop = [_nan(rows[(n, group)]["acc_drop"]) for n in layers]
        label = f"{group} half by gOSI"
        axes[0].bar(x + (k - 0.5) * 0.38, inc, 0.38, yerr=sem, color=color, label=label,
                    capsize=2)
        axes[1].bar(x + (k - 0.5) * 0.38, drop, 0.38, color=color, label=label)
    for ax, ylabel in zip(axes, ("val loss increase (mean ± SEM per image)", "val accuracy drop")):
        ax.set_xticks(x)
        ax.set_xticklabels(layers, rotation=60, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"ablation at epoch {last['epoch']:.3g}", fontsize=9)
    axes[0].legend(fontsize=7)
    if trend:
        ax = fig.add_subplot(grid[1, :])
        ep = [r["epoch"] for r in ablated]
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(layers)))
        for c, name in zip(colors, layers):
            diff = []
            for r in ablated:
                by = {a["group"]: a["loss_increase"] for a in r["ablation"] if a["layer"] == name}
                diff.append(_nan(by["top"]) - _nan(by["bottom"]))
            ax.plot(ep, diff, color=c, marker="o", markersize=3, label=name)
        ax.axhline(0, color="k", linewidth=0.6)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss increase: top − bottom half", fontsize=8)
        ax.set_title("> 0: the orientation-selective half matters more", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_shift(records, layers, shift_layers, shift, title, path):
    """Left: centred shift invariance per shift layer vs epoch (raw, dotted). Right: centred shift
    invariance of the highest shift layer after ablating each layer's top / bottom half."""
    ep = [r["epoch"] for r in records]
    ablated = [r for r in records if r["ablation"]]
    fig, axes = plt.subplots(1, 2 if ablated else 1, figsize=(11 if ablated else 5, 3.6),
                             squeeze=False)
    axes = axes[0]
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(shift_layers)))
    for c, name in zip(colors, shift_layers):
        axes[0].plot(ep, [_nan(r["baseline"][CENTRED][name]) for r in records], marker="o",
                     markersize=3, color=c, label=name)
        axes[0].plot(ep, [_nan(r["baseline"]["shift_invariance"][name]) for r in records], ":",
                     color=c, linewidth=1)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel(f"shift invariance ({shift} px)")
    axes[0].set_title("no ablation; solid: unit means removed, dotted: raw", fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if ablated:
        last, top_layer = ablated[-1], shift_layers[-1]
        rows = {(a["layer"], a["group"]): a for a in last["ablation"]}
        x = np.arange(len(layers))
        for k, (group, color) in enumerate((("top", "C3"), ("bottom", "C0"))):
            axes[1].bar(x + (k - 0.5) * 0.38,
                        [_nan(rows[(n, group)][CENTRED][top_layer]) for n in layers], 0.38,
                        color=color, label=f"{group} half by gOSI ablated")
        axes[1].axhline(_nan(last["baseline"][CENTRED][top_layer]), color="k", linestyle="--",
                        linewidth=1, label="no ablation")
        axes[1].set_xticks(x)
        axes[1].set_xticklabels(layers, rotation=60, fontsize=7)
        axes[1].set_ylabel(f"shift invariance of {top_layer} (centred)", fontsize=8)
        axes[1].set_xlabel("ablated layer")
        axes[1].set_title(f"epoch {last['epoch']:.3g}", fontsize=9)
        axes[1].grid(alpha=0.3, axis="y")
        axes[1].set_ylim(top=1.18)  # room for the legend above the bars (values are ≤ 1)
        axes[1].legend(fontsize=7, ncol=3, loc="upper center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _nan(v):
    return np.nan if v is None else v


def write_figures(records, layers, shift_layers, shift, title, fig_dir, plot_epochs=None):
    """Every orientation figure into ``fig_dir`` (the ablation one when something was
    ablated); their paths."""
    title = f"{title} (BN: {records[0].get('bn_mode', '?')})"
    written = [plot_distributions(records, layers, plot_epochs, title,
                                  os.path.join(fig_dir, "orientation_gosi.png")),
               plot_by_epoch(records, layers, title,
                             os.path.join(fig_dir, "orientation_gosi_by_epoch.png"))]
    if any(r["ablation"] for r in records):
        written.append(plot_ablation(records, layers, title,
                                     os.path.join(fig_dir, "orientation_ablation.png")))
    written.append(plot_shift(records, layers, shift_layers, shift, title,
                              os.path.join(fig_dir, "orientation_shift.png")))
    return written
