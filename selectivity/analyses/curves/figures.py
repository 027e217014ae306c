"""Selectivity figures of runs (like paper 1's first figure): mean SI per stage against epoch
with the null's band (``plot_stages``), and a run's per-unit SI over evaluations
(``plot_heatmap``)."""
from __future__ import annotations

import os
from collections import OrderedDict

import matplotlib.pyplot as plt
import numpy as np

from selectivity.io import save_figure
from selectivity.train.models import stage_of


def plot_stages(runs: dict, path: str) -> None:
    """``runs``: {label: ``stage_series``}; a panel per stage, every run overlaid."""
    stages = list(OrderedDict.fromkeys(s for series in runs.values() for s in series))
    fig, axes = plt.subplots(1, len(stages), figsize=(3.6 * len(stages), 3.2), squeeze=False,
                             sharey=True)
    bands = set()
    for ax, stage in zip(axes[0], stages):
        for i, (run, series) in enumerate(runs.items()):
            if stage not in series:
                continue
            s, color = series[stage], f"C{i}"
            ep, null, top = map(np.asarray, (s["epoch"], s["null"], s["null_top"]))
            bands |= s["band"]
            lower = null if "sd" not in s["band"] else 2 * null - top  # ± s.d. for old records
            ax.fill_between(ep, lower, top, color=color, alpha=0.15, linewidth=0)
            ax.plot(ep, null, color=color, linestyle=":", linewidth=1)
            ax.plot(ep, s["si"], color=color, marker="o", markersize=3, label=run)
        ax.set_title(stage)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean class selectivity index")
    band = " to its 95 % quantile" if bands == {"q95"} else \
        " ± 1 s.d. over units" if bands == {"sd"} else ""
    axes[0][-1].legend(fontsize=7, title=f"dotted: shuffled-label null mean\nband:{band}",
                       title_fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_heatmap(run: str, evals: list[dict], path: str) -> None:
    """Per-unit SI (rows: units sorted by final SI within each stage) against evaluation."""
    names = list(evals[-1]["layers"])
    cols, order = [], []
    for name in names:
        final = evals[-1]["layers"][name]["si"].numpy()
        order.append(np.argsort(-final))
    for e in evals:
        cols.append(np.concatenate([e["layers"][n]["si"].numpy()[o] for n, o in zip(names, order)]))
    stage_starts, offset = OrderedDict(), 0
    for n, o in zip(names, order):
        stage_starts.setdefault(stage_of(n), offset)
        offset += len(o)
    mat = np.stack(cols, axis=1)
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(evals) + 2), 5))
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                   vmax=max(float(np.nanmax(mat)), 1e-6))
    ax.set_xticks(range(len(evals)))
    ax.set_xticklabels([f"{float(e['epoch']):.2g}" for e in evals], rotation=90, fontsize=7)
    ax.set_yticks(list(stage_starts.values()))
    ax.set_yticklabels(list(stage_starts), fontsize=8)
    for b in list(stage_starts.values())[1:]:
        ax.axhline(b - 0.5, color="white", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_title(f"per-unit SI: {os.path.basename(os.path.normpath(run))}", fontsize=9)
    fig.colorbar(im, ax=ax, label="SI")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
