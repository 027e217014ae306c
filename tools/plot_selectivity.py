#!/usr/bin/env python
"""Selectivity figures for one or more runs (like paper 1's first figure).

    python tools/plot_selectivity.py RUN [RUN ...] [--out DIR]

Writes into DIR (default: RUN/figures/ for one run; for several, a new folder beside the first
run named for the comparison, e.g. runs/compare_<a>_vs_<b>/ — never into another run's folder):
  si_by_stage.png     mean SI per stage against epoch, one panel per stage; every run overlaid;
                      the label-shuffled null as its mean (dotted) with a band up to its 95 %
                      quantile over the permutations (records of runs with one permutation: the
                      band is ± one s.d. over the stage's units)
  si_heatmap_<run>.png  per-unit SI over evaluations (units sorted by final SI within each stage)
Reads the per-evaluation files RUN/selectivity/*.pt that training writes.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from collections import OrderedDict


import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from selectivity.train.checkpoint import makedirs
from selectivity.errors import CheckpointError, run_cli
from selectivity.io import save_figure
from selectivity.train.models import stage_of


def load_evals(run: str) -> list[dict]:
    """The run's per-evaluation selectivity records, in training order."""
    files = glob.glob(os.path.join(run, "selectivity", "*.pt"))
    if not files:
        raise CheckpointError(f"no selectivity records in {run}/selectivity; train with "
                              f"track: true (the default) first")
    evals = [_load_record(f) for f in files]
    return sorted(evals, key=lambda e: e["step"])


def _load_record(path: str) -> dict:
    try:
        record = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 — torn, foreign or unreadable: any of torch's errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read selectivity record {path}: {first}") from None
    if not (isinstance(record, dict) and isinstance(record.get("layers"), dict)
            and "step" in record and "epoch" in record):
        raise CheckpointError(f"not a selectivity record (no epoch, step and layers): {path}")
    return record


def _stage_null(layers: list[dict]):
    """(null mean, band top, band kind) of a stage at one evaluation, or None without a null.

    ``si_null`` is [P, U] (P permutations): the stage's mean SI under each permutation (blocks
    weighted equally, as for the SI itself) gives P values, reported as their mean and 95 %
    quantile (as the val records' ``si_null`` / ``si_null_q95``). Older records hold one
    permutation as [U]: mean and + one s.d. over the units, as these figures showed before."""
    nulls = [l.get("si_null") for l in layers]
    if any(n is None for n in nulls):
        return None
    if all(n.dim() == 2 for n in nulls):
        per_perm = torch.stack([n.double().mean(1) for n in nulls]).mean(0)  # [P]
        return (float(per_perm.mean()), float(torch.quantile(per_perm, 0.95)), "q95")
    units = torch.cat([n.double().flatten() for n in nulls])
    return float(units.mean()), float(units.mean() + units.std()), "sd"


def stage_series(evals: list[dict]) -> "OrderedDict[str, dict]":
    """stage → {epoch, si (mean over blocks, each block weighted equally), null mean, band top,
    band kind} (see ``_stage_null``)."""
    out = OrderedDict()
    for e in evals:
        by_stage = OrderedDict()
        for name, layer in e["layers"].items():
            by_stage.setdefault(stage_of(name), []).append(layer)
        for stage, layers in by_stage.items():
            s = out.setdefault(stage, {"epoch": [], "si": [], "null": [], "null_top": [],
                                       "band": set()})
            s["epoch"].append(float(e["epoch"]))
            s["si"].append(np.mean([float(l["si"].mean()) for l in layers]))
            null = _stage_null(layers)
            s["null"].append(np.nan if null is None else null[0])
            s["null_top"].append(np.nan if null is None else null[1])
            if null is not None:
                s["band"].add(null[2])
    return out


def plot_stages(runs: dict, path: str) -> None:
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
    names = list(evals[-1]["layers"])
    cols, bounds, order = [], [], []
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


def default_out(runs: list[str]) -> str:
    """One run: its figures/. Several: a new folder beside the first run, named for the
    comparison (compare_<a>_vs_<b>...), so no run's own figures are overwritten."""
    if len(runs) == 1:
        return os.path.join(runs[0], "figures")
    labels = [os.path.basename(os.path.normpath(r)) for r in runs]
    parent = os.path.dirname(os.path.abspath(os.path.normpath(runs[0])))
    return os.path.join(parent, "compare_" + "_vs_".join(labels))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", help="output directory (default: RUN/figures for one run; "
                                 "compare_<a>_vs_<b>/ beside the first run for several)")
    args = p.parse_args(argv)
    for run in args.runs:
        if not os.path.isdir(run):
            raise CheckpointError(f"run directory not found: {run}")
    out = args.out or default_out(args.runs)
    makedirs(out)
    series, written = OrderedDict(), []
    for run in args.runs:
        evals = load_evals(run)
        label = os.path.basename(os.path.normpath(run))
        series[label] = stage_series(evals)
        path = os.path.join(out, f"si_heatmap_{label}.png")
        plot_heatmap(run, evals, path)
        written.append(path)
    path = os.path.join(out, "si_by_stage.png")
    plot_stages(series, path)
    written.insert(0, path)
    for label, s in series.items():
        last = {st: (v["si"][-1], v["null"][-1], v["null_top"][-1], v["band"])
                for st, v in s.items()}
        print(f"{label}: final mean SI by stage " + ", ".join(
            f"{st} {si:.3f} (null {nl:.3f}" + (f", 95 % quantile {top:.3f})" if band == {"q95"}
                                               else ")")
            for st, (si, nl, top, band) in last.items()))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    run_cli(main)
