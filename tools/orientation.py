#!/usr/bin/env python
"""Orientation selectivity of a run's units to sinusoidal gratings, per checkpoint (Ukita 2020):
gOSI against a permuted control, the effect of ablating the most vs the least orientation-selective
half of a layer on val loss and accuracy, and the shift invariance of higher layers with and
without that ablation.

    python tools/orientation.py RUN [--epochs 0 1 8] [--steps] [--layers relu layer1.0 ...]
                                [--ablate-epochs 8 | --no-ablation] [--shift 4]
                                [--shift-layers layer1 layer2 layer3] [--max-images 10000]

Per checkpoint (default: every epoch_* one; --steps adds step_*):
  - gratings at the model's input size (12 orientations, 4 phases, Ukita's SF ladder), normalised
    like the dataset; R[unit, SF, orientation] per layer (--layers, default: the stem ReLU and
    every residual block output); OSI, gOSI, and the permuted control (per-unit shuffle);
  - on the val images (at most --max-images): val loss, accuracy, and shift invariance (mean over
    images of the Pearson correlation across units between responses to an image and to the
    image circularly shifted by --shift px) at --shift-layers (default: the stage outputs), both
    raw and "centred" (each unit's mean response over the val images removed first; the raw
    value is dominated by the unit-mean profile all images share and sits near 1 even at init,
    so figures and summary use the centred one);
  - at --ablate-epochs (default: every measured epoch), for each layer: zero the top half of its
    live units by gOSI, then the bottom half (dead units excluded), and measure the same again.
    Ukita's metric is the mean per-image increase in cross-entropy (± SEM).
Writes RUN/orientation.jsonl (one line per checkpoint; NaN as null) and into RUN/figures (or --out):
  orientation_gosi.png           per layer: violins of gOSI vs the control at --plot-epochs
  orientation_gosi_by_epoch.png  mean gOSI of live units per layer vs epoch, control dashed
  orientation_ablation.png       loss increase and accuracy drop, top vs bottom half, per layer
  orientation_shift.png          shift invariance vs epoch, and after each ablation
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import OrderedDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from selectivity.checkpoint import CheckpointError  # noqa: E402
from selectivity.config import ConfigError  # noqa: E402
from selectivity.errors import run_cli  # noqa: E402
from selectivity.models import build_model, residual_blocks, stage_of  # noqa: E402
from selectivity.orientation import (ablation_groups, channel_normalize,  # noqa: E402
                                     loss_and_shift_invariance, make_gratings,
                                     orientation_indices, orientation_responses,
                                     permuted_control, zero_channels)
from selectivity.runs import load_model  # noqa: E402
from selectivity.runs import choose_checkpoints, nearest_epoch, open_run  # noqa: E402
from tools.cka import (check_layers, pick_device, run_label, stage_names,  # noqa: E402
                       write_jsonl)

TUNED = 0.33  # Ukita's threshold for an orientation-tuned unit (gOSI > 0.33)
CENTRED = "shift_invariance_centered"  # the primary shift-invariance measure in figures/summary


def default_layers(model: nn.Module) -> list[str]:
    """The stem ReLU (when the model has a top-level ``relu``) and every residual block output."""
    stem = ["relu"] if isinstance(getattr(model, "relu", None), nn.ReLU) else []
    return stem + list(residual_blocks(model))


def measured_epochs(asked, measured, flag):
    """The measured checkpoint epochs that the user's ``asked`` values name (see epoch_matches)."""
    out = []
    for e in asked:
        epoch = nearest_epoch(e, measured, "the measured epochs")
        if epoch is None:
            raise CheckpointError(f"{flag} {e:g} is not among the measured epochs "
                                  f"({', '.join(f'{m:g}' for m in measured)})")
        out.append(epoch)
    return out


def val_batches(loader, max_images: int) -> list:
    """The first ``max_images`` val images and labels, kept on the device for repeated passes."""
    out, n = [], 0
    for images, labels in loader:
        take = min(images.shape[0], max_images - n)
        out.append((images[:take], labels[:take]))
        n += take
        if n >= max_images:
            break
    if not out:
        raise ConfigError("the val split is empty")
    return out


def layer_stats(R: torch.Tensor, generator: torch.Generator):
    idx = orientation_indices(R)
    ctl = permuted_control(R, generator)
    live = ~idx.dead
    g, c = idx.gosi[live], ctl.gosi[live]
    mean = lambda t: float(t.mean()) if t.numel() else float("nan")  # noqa: E731
    stats = {"units": int(R.shape[0]), "dead": int(idx.dead.sum()),
             "gosi_mean": mean(g), "gosi_median": float(g.median()) if g.numel() else float("nan"),
             "osi_mean": mean(idx.osi[live]), "tuned_frac": mean((g > TUNED).double()),
             "control_gosi_mean": mean(c), "control_tuned_frac": mean((c > TUNED).double()),
             "gosi": [round(float(v), 5) for v in idx.gosi],
             "control_gosi": [round(float(v), 5) for v in ctl.gosi],
             "dead_units": torch.nonzero(idx.dead).flatten().tolist()}
    return idx, stats


def ablate(model, layers, indices, batches, shift_layers, shift, base):
    """Top and bottom halves by gOSI for every layer; the rows of the jsonl's "ablation" list."""
    rows = []
    for name in layers:
        top, bottom = ablation_groups(indices[name])
        for group, units in (("top", top), ("bottom", bottom)):
            row = {"layer": name, "group": group, "units": int(units.numel()),
                   "of_live": int((~indices[name].dead).sum()),
                   "gosi_mean": float(indices[name].gosi[units].mean()) if units.numel()
                   else float("nan")}
            if units.numel():
                with zero_channels(model, name, units):
                    res = loss_and_shift_invariance(model, batches, shift_layers, shift)
                diff = res.loss - base.loss
                row.update(loss=float(res.loss.mean()), acc1=float(res.correct.double().mean()),
                           loss_increase=float(diff.mean()),
                           loss_increase_sem=float(diff.std() / diff.numel() ** 0.5)
                           if diff.numel() > 1 else float("nan"),
                           acc_drop=float(base.correct.double().mean()
                                          - res.correct.double().mean()),
                           shift_invariance=res.shift_invariance,
                           shift_invariance_centered=res.shift_invariance_centered)
            else:  # nothing alive to ablate: no change by definition
                row.update(loss=float(base.loss.mean()), acc1=float(base.correct.double().mean()),
                           loss_increase=0.0, loss_increase_sem=0.0, acc_drop=0.0,
                           shift_invariance=base.shift_invariance,
                           shift_invariance_centered=base.shift_invariance_centered)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- figures

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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _stages(layers):
    out = OrderedDict()
    for name in layers:
        out.setdefault("stem" if "." not in name and not name.startswith("layer")
                       else stage_of(name), []).append(name)
    return out


def plot_by_epoch(records, layers, title, path):
    ep = [r["epoch"] for r in records]
    groups = _stages(layers)
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nan(v):
    return np.nan if v is None else v


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("--epochs", type=float, nargs="+", help="checkpoint epochs (default: all)")
    p.add_argument("--steps", action="store_true",
                   help="also the step_* checkpoints taken inside an epoch")
    p.add_argument("--layers", nargs="+",
                   help="module names (default: the stem relu and every residual block)")
    ablation = p.add_mutually_exclusive_group()
    ablation.add_argument("--ablate-epochs", type=float, nargs="+",
                          help="epochs at which to run the ablations (default: every measured "
                               "epoch)")
    ablation.add_argument("--no-ablation", action="store_true", help="skip the ablations")
    p.add_argument("--shift", type=int, help="circular shift in px, down and right "
                                             "(default: image size / 8)")
    p.add_argument("--shift-layers", nargs="+",
                   help="layers whose shift invariance is measured (default: the stage outputs)")
    p.add_argument("--max-images", type=int, default=10000,
                   help="val images for loss, accuracy and shift invariance (default 10000)")
    p.add_argument("--batch-size", type=int, help="val batch size (default: the run's "
                                                  "eval_batch_size)")
    p.add_argument("--plot-epochs", type=float, nargs="+",
                   help="epochs drawn as violins (default: first, middle and last)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permuted control")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help="figure directory (default: RUN/figures)")
    p.add_argument("--output", help="jsonl path (default: RUN/orientation.jsonl)")
    args = p.parse_args(argv)
    if args.max_images < 1:
        p.error("--max-images must be ≥ 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be ≥ 1")
    return args


def main(argv=None):
    from selectivity.data import build_loader

    args = parse_args(argv)
    overrides = {"workers": 0}
    if args.batch_size:
        overrides["eval_batch_size"] = args.batch_size
    cfg = open_run(args.run, **overrides)
    ckpts = choose_checkpoints(args.run, args.epochs, args.steps)
    probe = build_model(cfg.model, 2, cfg.small_stem)
    layers = list(args.layers) if args.layers else default_layers(probe)
    shift_layers = list(args.shift_layers) if args.shift_layers else stage_names(probe)
    check_layers(probe, layers)
    check_layers(probe, shift_layers)
    measured = [c.epoch for c in ckpts]
    if args.no_ablation:
        ablate_at = set()
    elif args.ablate_epochs:
        ablate_at = set(measured_epochs(args.ablate_epochs, measured, "--ablate-epochs"))
    else:
        ablate_at = set(measured)
    if args.plot_epochs:
        measured_epochs(args.plot_epochs, measured, "--plot-epochs")

    device = pick_device(args.device)
    loader = build_loader(cfg, "val", device)
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "mean"):
        raise ConfigError(f"the {cfg.data_backend} val loader does not expose its dataset's "
                          f"mean/std; use data_backend torch for this analysis")
    normalize = channel_normalize(dataset.mean, dataset.std)
    gratings = make_gratings(cfg.image_size)
    shift = args.shift if args.shift is not None else max(1, cfg.image_size // 8)
    batches = val_batches(loader, args.max_images)
    n_images = sum(b[1].numel() for b in batches)
    name = run_label(args.run)
    out_jsonl = args.output or os.path.join(args.run, "orientation.jsonl")
    fig_dir = args.out or os.path.join(args.run, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)
    n_sf, n_orient, n_phase = gratings.images.shape[:3]
    print(f"orientation: {name}: {len(ckpts)} checkpoint(s), {len(layers)} layer(s), "
          f"{n_sf}×{n_orient}×{n_phase} gratings at {cfg.image_size} px, {n_images} val images, "
          f"shift {shift} px; ablation at {len(ablate_at)} checkpoint(s)", flush=True)

    records = []
    for c in ckpts:
        model = load_model(cfg, c, device)
        R = orientation_responses(model, layers, gratings.images, normalize,
                                  batch_size=cfg.eval_batch_size, device=device)
        gen = torch.Generator().manual_seed(args.seed)
        indices, stats = {}, OrderedDict()
        for layer in layers:
            indices[layer], stats[layer] = layer_stats(R[layer], gen)
        base = loss_and_shift_invariance(model, batches, shift_layers, shift)
        rec = {"epoch": c.epoch, "step": c.step, "checkpoint": os.path.basename(c.path),
               "run": name,
               "gratings": {"size": cfg.image_size, "n_sf": n_sf, "n_orient": n_orient,
                            "n_phase": n_phase, "sf": [round(float(v), 6) for v in gratings.sf]},
               "layers": stats,
               "baseline": {"loss": float(base.loss.mean()),
                            "acc1": float(base.correct.double().mean()), "images": n_images,
                            "shift_px": shift, "shift_invariance": base.shift_invariance,
                            "shift_invariance_centered": base.shift_invariance_centered},
               "ablation": []}
        if c.epoch in ablate_at:
            rec["ablation"] = ablate(model, layers, indices, batches, shift_layers, shift, base)
        records.append(rec)
        write_jsonl(out_jsonl, records)  # rewritten each time: an interrupted run keeps its lines
        print_epoch(rec, layers, shift_layers)

    title = f"orientation selectivity: {name}"
    written = [os.path.join(fig_dir, f) for f in ("orientation_gosi.png",
                                                  "orientation_gosi_by_epoch.png")]
    plot_distributions(records, layers, args.plot_epochs, title, written[0])
    plot_by_epoch(records, layers, title, written[1])
    if any(r["ablation"] for r in records):
        written.append(os.path.join(fig_dir, "orientation_ablation.png"))
        plot_ablation(records, layers, title, written[-1])
    written.append(os.path.join(fig_dir, "orientation_shift.png"))
    plot_shift(records, layers, shift_layers, shift, title, written[-1])
    print_summary(records, layers, shift_layers)
    print(f"wrote {out_jsonl}, " + ", ".join(written))


def _f(v, fmt=".3f"):
    return "nan" if v is None or not np.isfinite(v) else format(v, fmt)


def print_epoch(rec, layers, shift_layers):
    b = rec["baseline"]
    print(f"epoch {rec['epoch']:.3g} (step {rec['step']}): val loss {_f(b['loss'])} "
          f"acc {_f(b['acc1'])}; mean gOSI (control) "
          + ", ".join(f"{n} {_f(rec['layers'][n]['gosi_mean'])} "
                      f"({_f(rec['layers'][n]['control_gosi_mean'])})" for n in layers)
          + "; shift invariance (centred / raw) "
          + ", ".join(f"{n} {_f(b[CENTRED][n])} / {_f(b['shift_invariance'][n])}"
                      for n in shift_layers), flush=True)


def print_summary(records, layers, shift_layers):
    w = max(8, *(len(n) for n in layers))
    shown = records if len(records) <= 6 else \
        [records[i] for i in np.unique(np.linspace(0, len(records) - 1, 6).round().astype(int))]
    print("\nsummary: mean gOSI of live units (permuted control) [tuned fraction, dead units]"
          + ("" if shown is records else f"; {len(shown)} of {len(records)} epochs shown"))
    print(f"{'layer':<{w}} " + " ".join(f"{'ep ' + format(r['epoch'], '.3g'):>22}"
                                        for r in shown))
    for n in layers:
        cells = []
        for r in shown:
            d = r["layers"][n]
            cells.append(f"{_f(d['gosi_mean'], '.2f')} ({_f(d['control_gosi_mean'], '.2f')}) "
                         f"[{_f(d['tuned_frac'], '.2f')},{d['dead']:>3}]")
        print(f"{n:<{w}} " + " ".join(f"{c:>22}" for c in cells))
    ablated = [r for r in records if r["ablation"]]
    if not ablated:
        return
    last = ablated[-1]
    top_layer = shift_layers[-1]
    b = last["baseline"]
    print(f"\nablation at epoch {last['epoch']:.3g} (val loss {_f(b['loss'])}, acc "
          f"{_f(b['acc1'])}, centred shift invariance of {top_layer} {_f(b[CENTRED][top_layer])})"
          f": zero the top / bottom half of live units by gOSI")
    print(f"{'layer':<{w}} {'half':>6} {'units':>9} {'gOSI':>6} {'Δloss ± SEM':>16} "
          f"{'Δacc':>7} {'shift inv ' + top_layer:>18}")
    for a in last["ablation"]:
        print(f"{a['layer']:<{w}} {a['group']:>6} {a['units']:>4}/{a['of_live']:<4} "
              f"{_f(a['gosi_mean'], '.2f'):>6} "
              f"{'+' if a['loss_increase'] >= 0 else ''}{_f(a['loss_increase'], '.4f')} ± "
              f"{_f(a['loss_increase_sem'], '.4f'):<6} {-a['acc_drop']:>+7.3f} "
              f"{_f(a[CENTRED][top_layer]):>18}")


if __name__ == "__main__":
    run_cli(main)
