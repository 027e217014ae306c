"""CKA figures from ``run.cka_records`` records: heatmaps per epoch, curves against epoch,
active ReLUs. The random-initialisation baseline (``record["random_init"]``) is in every one:
the last heatmap panel, and a dashed line of the curve's colour in the curve figures."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from selectivity.analyses.cka.cka import LOGITS
from selectivity.analyses.cka.run import entry
from selectivity.errors import CheckpointError
from selectivity.io import save_figure
from selectivity.train.runs import nearest_epoch


def _epochs_to_show(records, wanted):
    if wanted:
        picked = {nearest_epoch(e, [r["epoch"] for r in records], "the measured epochs")
                  for e in wanted}
        keep = [r for r in records if r["epoch"] in picked]
        if not keep:
            raise CheckpointError(f"--heatmap-epochs: none of {wanted} was measured")
        return keep
    if len(records) <= 12:
        return records
    idx = np.unique(np.linspace(0, len(records) - 1, 12).round().astype(int))
    return [records[i] for i in idx]


def _matrix(m):
    return np.array([[np.nan if v is None else v for v in row] for row in m], float)


def plot_heatmaps(records, title, path, wanted=None):
    """The matrix at each shown epoch, and the random-init baseline's as the last panel."""
    shown = _epochs_to_show(records, wanted)
    base = records[0].get("random_init")
    panels = [(f"epoch {r['epoch']:.3g}", r["matrix"], r) for r in shown]
    if base is not None:
        panels.append((f"random init (seed {base['seed']})", base["matrix"], records[0]))
    ncols = min(4, len(panels))
    nrows = -(-len(panels) // ncols)
    size = len(shown[0]["rows"])
    cell = max(2.6, 0.45 * size + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols + 1.0, cell * nrows + 0.4),
                             squeeze=False)
    im = None
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, matrix, r) in zip(axes.flat, panels):
        mat = _matrix(matrix)
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        ax.set_xticks(range(len(r["cols"])))
        ax.set_xticklabels(r["cols"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(r["rows"])))
        ax.set_yticklabels(r["rows"], fontsize=7)
        ax.set_title(label, fontsize=9)
        if size <= 8:
            for (i, j), v in np.ndenumerate(mat):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    fig.suptitle(f"{title} (BN: {records[0].get('bn_mode', '?')})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax, label="linear CKA")
    return save_figure(fig, path)


def _baseline(ax, records, row, col, color):
    if records[0].get("random_init") is not None:
        ax.axhline(entry(records[0], row, col, "random_init"), color=color, linestyle="--",
                   linewidth=1, alpha=0.8)


def plot_curves(records, layers, between, title, path):
    """CKA(layer, logits) and CKA of consecutive layers against epoch (between two runs:
    CKA(A's layer, B's same layer)); dashed: the random-init baseline of each curve."""
    ep = [r["epoch"] for r in records]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(layers) + 1))
    if between:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for c, name in zip(colors, layers + [LOGITS]):
            ax.plot(ep, [entry(r, name, name) for r in records], marker="o", markersize=3,
                    color=c, label=name)
            _baseline(ax, records, name, name, c)
        ax.set_ylabel("CKA(A's layer, B's same layer)")
        axes = [ax]
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for c, name in zip(colors, layers):
            axes[0].plot(ep, [entry(r, name, LOGITS) for r in records], marker="o",
                         markersize=3, color=c, label=name)
            _baseline(axes[0], records, name, LOGITS, c)
        axes[0].set_ylabel("linear CKA")
        axes[0].set_title("CKA(layer, logits)", fontsize=9)
        for c, (a, b) in zip(colors, zip(layers, layers[1:] + [LOGITS])):
            axes[1].plot(ep, [entry(r, a, b) for r in records], marker="o", markersize=3,
                         color=c, label=f"{a} ↔ {b}")
            _baseline(axes[1], records, a, b, c)
        axes[1].set_title("CKA between consecutive layers", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="dashed: random init", title_fontsize=7)
    fig.suptitle(f"{title} (BN: {records[0].get('bn_mode', '?')})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_relu(records, layers, labels, path):
    """Fraction of active ReLUs per layer against epoch; dashed: the random-init network's."""
    ep = [r["epoch"] for r in records]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(layers) + 1))  # as in plot_curves
    base = records[0].get("random_init") or {}
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for key, style, label in (("relu_active", "-", labels[0]), ("relu_active_b", "-.", labels[1])):
        if records[0].get(key) is None:
            continue
        for c, name in zip(colors, layers):
            vals = [r[key][name] for r in records]
            if all(v is None or not np.isfinite(v) for v in vals):
                continue
            ax.plot(ep, [np.nan if v is None else v for v in vals], style, marker="o",
                    markersize=3, color=c, label=f"{name} ({label})" if labels[1] else name)
            b = (base.get(key) or {}).get(name)
            if b is not None and np.isfinite(b):
                ax.axhline(b, color=c, linestyle="--", linewidth=1, alpha=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of ReLU outputs > 0")
    ax.set_title("active ReLUs per layer (1 = linear); dashed: random init", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def write_figures(records, layers, between, title, fig_dir, prefix, heatmap_epochs=None):
    """The three CKA figures into ``fig_dir``; their paths."""
    import os
    labels = (records[0]["run"], records[0]["run_b"])
    return [plot_heatmaps(records, title, os.path.join(fig_dir, f"{prefix}_heatmaps.png"),
                          heatmap_epochs),
            plot_curves(records, layers, between, title,
                        os.path.join(fig_dir, f"{prefix}_curves.png")),
            plot_relu(records, layers, labels, os.path.join(fig_dir, f"{prefix}_relu_active.png"))]
