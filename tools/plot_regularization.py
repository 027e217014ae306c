#!/usr/bin/env python
"""Figures and a table for selectivity-regularizer runs (Leavitt & Morcos α sweep; paper 1 windows).

    python tools/plot_regularization.py RUN [RUN ...] [--out DIR]
    python tools/plot_regularization.py runs/reg_sweep/* runs/reg_windows/*

Reads each run's config.yaml (``selectivity_reg``) and metrics.jsonl (val records: acc1, si_mean,
si_null; train records: alpha, si_reg). A run whose α is one constant from epoch 0 on (or no
regularizer: α = 0) is a point of the α sweep; any other is a window run. Writes into DIR (default:
the runs' common parent directory's figures/, else the first run's figures/):
  reg_alpha.png    final val acc1 against α; final val si_mean against α with si_null (constant-α
                   runs; drawn when they hold at least two values of α)
  reg_curves.png   val acc1, val si_mean (dotted: si_null) and train minibatch si_reg against epoch,
                   every run overlaid, windows' starts marked (drawn when a window run is present,
                   or with --curves)
and prints one table row per run (markdown, for the docs).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from selectivity.regularizer import parse_windows  # noqa: E402
from selectivity.runlog import read_metrics, run_paths  # noqa: E402


def load_run(run: str) -> dict:
    paths = run_paths(run)
    if not os.path.exists(paths["config"]):
        raise SystemExit(f"error: {run} is not a run directory (no config.yaml)")
    with open(paths["config"]) as f:
        cfg = yaml.safe_load(f) or {}
    windows = parse_windows(cfg.get("selectivity_reg") or [])
    records = read_metrics(paths["metrics"])
    val = [r for r in records if r.get("split") == "val"]
    train = [r for r in records if r.get("split") == "train"]
    if not val:
        raise SystemExit(f"error: {run} has no val records in metrics.jsonl; train it first")
    active = [w for w in windows if w.alpha != 0]
    if not active:
        const = 0.0
    elif len(active) == 1 and active[0].start == 0 and math.isinf(active[0].end):
        const = active[0].alpha
    else:
        const = None
    return {"name": os.path.basename(os.path.normpath(run)), "windows": windows,
            "const_alpha": const, "val": val, "train": train,
            "epochs": cfg.get("epochs"), "final": val[-1]}


def describe(windows) -> str:
    parts = [f"α={w.alpha:g} [{w.start:g}, {'∞' if math.isinf(w.end) else f'{w.end:g}'})"
             for w in windows if w.alpha != 0]
    return ", ".join(parts) if parts else "α=0"


def _num(v, fmt=".4f"):
    return "–" if v is None else format(v, fmt)


def table(runs: list[dict]) -> str:
    rows = ["| run | α windows (epochs) | epoch | val acc1 | val si_mean | si_null | "
            "train si_reg (last) |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        f = r["final"]
        si_reg = [t["si_reg"] for t in r["train"] if t.get("si_reg") is not None]
        rows.append(f"| {r['name']} | {describe(r['windows'])} | {f['epoch']:g} | "
                    f"{_num(f.get('acc1'))} | {_num(f.get('si_mean'))} | "
                    f"{_num(f.get('si_null'))} | {_num(si_reg[-1] if si_reg else None)} |")
    return "\n".join(rows)


def plot_alpha(runs: list[dict], path: str) -> bool:
    pts = sorted((r for r in runs if r["const_alpha"] is not None), key=lambda r: r["const_alpha"])
    if len({r["const_alpha"] for r in pts}) < 2:
        return False
    a = np.array([r["const_alpha"] for r in pts])
    acc = np.array([r["final"].get("acc1", np.nan) for r in pts], dtype=float)
    si = np.array([r["final"].get("si_mean") or np.nan for r in pts], dtype=float)
    null = np.array([r["final"].get("si_null") or np.nan for r in pts], dtype=float)
    lin = max(min(abs(x) for x in a if x != 0) if any(a != 0) else 1.0, 1e-6)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].plot(a, acc * 100, marker="o")
    axes[0].set_ylabel("final val top-1 (%)")
    axes[1].plot(a, si, marker="o", label="val si_mean")
    axes[1].plot(a, null, marker=".", linestyle=":", color="gray", label="label-shuffled null")
    base = [r for r in pts if r["const_alpha"] == 0]
    if base and base[0]["final"].get("si_mean") is not None:
        axes[1].axhline(0.5 * base[0]["final"]["si_mean"], color="C3", linewidth=0.8,
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
    epochs = {r["final"]["epoch"] for r in pts}
    fig.suptitle(f"selectivity regularizer, constant α (final epoch {', '.join(map(str, epochs))})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_curves(runs: list[dict], path: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for i, r in enumerate(runs):
        color, label = f"C{i % 10}", f"{r['name']}: {describe(r['windows'])}"
        ep = [float(v["epoch"]) for v in r["val"]]
        axes[0].plot(ep, [v["acc1"] * 100 for v in r["val"]], color=color, marker=".",
                     label=label)
        axes[1].plot(ep, [v.get("si_mean") for v in r["val"]], color=color, marker=".")
        axes[1].plot(ep, [v.get("si_null") for v in r["val"]], color=color, linestyle=":",
                     linewidth=1)
        tr = [t for t in r["train"] if t.get("si_reg") is not None]
        if tr:
            axes[2].plot([t["epoch"] for t in tr], [t["si_reg"] for t in tr], color=color,
                         linewidth=1)
        for w in r["windows"]:
            if w.alpha != 0 and w.start > 0:
                for ax in axes:
                    ax.axvline(w.start, color=color, linewidth=0.8, linestyle="--", alpha=0.6)
    axes[0].set_ylabel("val top-1 (%)")
    axes[1].set_ylabel("val mean SI (dotted: shuffled null)")
    axes[2].set_ylabel("train minibatch SI_reg (regularized steps)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title="dashed: a window starts (after epoch 0)", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", help="output directory (default: <common parent>/figures)")
    p.add_argument("--curves", action="store_true", help="draw reg_curves.png for any runs")
    args = p.parse_args(argv)
    runs_dirs = [r for r in args.runs if os.path.isdir(r) and
                 os.path.basename(os.path.normpath(r)) != "figures"]
    for r in args.runs:
        if not os.path.isdir(r):
            raise SystemExit(f"error: run directory not found: {r}")
    runs = [load_run(r) for r in runs_dirs]
    parents = {os.path.dirname(os.path.abspath(r)) for r in runs_dirs}
    out = args.out or os.path.join(parents.pop() if len(parents) == 1 else runs_dirs[0], "figures")
    os.makedirs(out, exist_ok=True)
    written = []
    path = os.path.join(out, "reg_alpha.png")
    if plot_alpha(runs, path):
        written.append(path)
    if args.curves or any(r["const_alpha"] is None for r in runs):
        path = os.path.join(out, "reg_curves.png")
        plot_curves(runs, path)
        written.append(path)
    runs.sort(key=lambda r: (r["const_alpha"] is None, r["const_alpha"] or 0, r["name"]))
    print(table(runs))
    print("wrote " + (", ".join(written) if written else "no figure (one α and no window run)"))


if __name__ == "__main__":
    main()
