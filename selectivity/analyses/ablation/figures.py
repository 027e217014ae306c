"""Ablation figures from ``run.ablation_rows`` rows: normalised accuracy against k
per checkpoint, and its area under the curve against epoch."""
from __future__ import annotations

import os
from collections import OrderedDict

import matplotlib.pyplot as plt
import numpy as np

from selectivity.analyses.ablation import ablation as A
from selectivity.io import save_figure

COLORS = {"selective": "C3", "random": "C7", "least": "C0"}


def _grid_x(rows):
    uniform = all(r["k"] is not None for r in rows)
    if uniform:
        return "k", "units ablated per block"
    return "fraction", "fraction of units ablated"


def plot_curves(rows, scope, path):
    rows = [r for r in rows if r["stage"] == scope]
    ckpts = list(OrderedDict.fromkeys((r["epoch"], r["step"]) for r in rows))
    ncol = min(len(ckpts), 6)
    nrow = -(-len(ckpts) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.3 * nrow), squeeze=False,
                             sharex=True, sharey=True)
    key, xlabel = _grid_x(rows)
    for ax, (epoch, step) in zip(axes.flat, ckpts):
        rs = [r for r in rows if r["epoch"] == epoch and r["step"] == step]
        for cond in A.CONDITIONS:
            cr = sorted((r for r in rs if r["condition"] == cond), key=lambda r: r[key])
            if not cr:
                continue
            x = np.array([r[key] for r in cr], float)
            y = np.array([r["norm_acc1"] if r["norm_acc1"] is not None else np.nan for r in cr])
            ax.plot(x, y, marker="o", markersize=2.5, color=COLORS[cond], label=cond, lw=1.2)
            if cond == "random" and cr[0].get("norm_acc1_draws"):
                d = np.array([[v if v is not None else np.nan for v in r["norm_acc1_draws"]]
                              for r in cr])
                ax.fill_between(x, d.min(1), d.max(1), color=COLORS[cond], alpha=0.25, lw=0)
        acc0 = rs[0]["acc1_unablated"]
        ax.axhline(1.0, color="k", lw=0.5, alpha=0.4)
        near_chance = acc0 < 2 * rs[0].get("chance", 0.0)
        if near_chance:  # acc / acc0 is noise when acc0 is about chance
            ax.set_facecolor("0.93")
        ax.set_title(f"epoch {epoch:.3g} (acc {acc0:.2f}{', ~chance' if near_chance else ''})",
                     fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(ckpts):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("acc / unablated acc", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    axes.flat[0].legend(fontsize=7, title="random: band = range over draws", title_fontsize=6)
    fig.suptitle(f"ablation in {scope} ({rows[0]['mode']}, BN {rows[0].get('bn_mode', 'running')}; "
                 f"ranked on {rows[0]['rank_images']} "
                 f"train images, evaluated on {rows[0]['images']} val images)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)


def plot_auc(rows, path):
    table = A.auc_table(rows)
    acc0 = {(r["epoch"], r["step"], r["stage"]): r["acc1_unablated"] for r in rows}
    chance_of = {(r["epoch"], r["step"], r["stage"]): r.get("chance", 0.0) for r in rows}
    scopes = list(OrderedDict.fromkeys(k[2] for k in table))
    fig, axes = plt.subplots(1, len(scopes), figsize=(3.6 * len(scopes), 3.2), squeeze=False,
                             sharey=True)
    for ax, scope in zip(axes[0], scopes):
        keys = [k for k in table if k[2] == scope]
        ep = np.array([k[0] for k in keys])
        near = np.array([acc0[k] < 2 * chance_of[k] for k in keys], dtype=bool)
        for cond in A.CONDITIONS:
            if cond not in table[keys[0]]:
                continue
            m = np.array([table[k][cond][0] for k in keys])
            sd = np.array([table[k][cond][1] for k in keys])
            ax.plot(ep, m, marker="o", markersize=3, color=COLORS[cond], label=cond)
            ax.plot(ep[near], m[near], "o", markersize=6, markerfacecolor="none",
                    markeredgecolor="k", markeredgewidth=0.6)
            if cond == "random":
                ax.fill_between(ep, m - sd, m + sd, color=COLORS[cond], alpha=0.25, lw=0)
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_title(scope)
        ax.set_xlabel("epoch (linear below 1, log above)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("AUC (mean normalized acc over the grid)")
    axes[0][-1].legend(fontsize=7, title="random: ± s.d. over draws\nringed: unablated acc "
                       "< 2x chance", title_fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)


def write_figures(rows, fig_dir) -> list[str]:
    """ablation_curves_<stage>.png per stage and ablation_auc.png into ``fig_dir``."""
    written = [plot_curves(rows, scope, os.path.join(fig_dir, f"ablation_curves_{scope}.png"))
               for scope in OrderedDict.fromkeys(r["stage"] for r in rows)]
    return written + [plot_auc(rows, os.path.join(fig_dir, "ablation_auc.png"))]
