#!/usr/bin/env python
"""Linear CKA among a ResNet's stage outputs and its logits, per checkpoint (paper 1's
"linearity" analysis), and the fraction of active ReLUs per stage.

    python tools/cka.py RUN [RUN2] [--epochs 0 1 2] [--steps] [--layers layer1 layer2 ...]
                        [--max-batches N] [--batch-size N] [--heatmap-epochs 0 5 10]

For every epoch_* checkpoint of RUN (with --steps, the step_* ones inside an epoch too; or the
epochs named by --epochs), on the run's val split:
  - within one network: the square CKA matrix among --layers (default: the stage outputs
    layer1..layerN) and the logits;
  - with RUN2: RUN's layers (rows) against RUN2's (columns) at every epoch both runs have;
  - the fraction of ReLU outputs > 0 inside each layer (every nn.ReLU in a stage, every call):
    a direct proxy for how linear the network still is.
Writes RUN/cka.jsonl (with RUN2: RUN/cka_vs_<RUN2 name>.jsonl), one line per checkpoint:
  {"epoch", "step", "checkpoint", "run", "run_b", "rows", "cols", "matrix", "relu_active",
   "relu_active_b", "images", "batches"}            (NaN written as null)
and into RUN/figures/ (or --out): <prefix>_heatmaps.png (the matrix per epoch), <prefix>_curves.png
(CKA(layer, logits) and CKA between consecutive layers against epoch; with RUN2, CKA(A's layer,
B's same layer)), <prefix>_relu_active.png. Prints a summary table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from selectivity.checkpoint import CheckpointError, atomic_write_text  # noqa: E402
from selectivity.cka import (LOGITS, MIN_BATCH, MinibatchCKA, collect_features,  # noqa: E402
                             count_relu_activity, eval_no_grad, gram)
from selectivity.config import ConfigError  # noqa: E402
from selectivity.errors import run_cli  # noqa: E402
from selectivity.models import ModelError, build_model  # noqa: E402
from selectivity.runs import (choose_checkpoints, load_model, nearest_epoch,  # noqa: E402,F401
                              open_run)


# ---------------------------------------------------------------- run directory helpers

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(name)


def stage_names(model) -> list[str]:
    """The ResNet's stages (top-level children named layer1, layer2, ...), in order."""
    names = [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
    if not names:
        raise ModelError(f"{type(model).__name__} has no layer1..layerN stages; name the layers "
                         f"with --layers")
    return names


def check_layers(model, layers: list[str]) -> None:
    """Unknown layer names: one line with the stages and where the other names come from."""
    modules = dict(model.named_modules())
    for name in layers:
        if name == LOGITS:
            raise ModelError(f"{LOGITS!r} is always included; leave it out of --layers")
        if name not in modules or not name:
            blocks = [n for n in modules if re.fullmatch(r"layer\d+\.\d+", n)]
            raise ModelError(
                f"unknown layer {name!r}; stages: {', '.join(stage_names(model))}; blocks: "
                f"{', '.join(blocks[:3])}{', ...' if len(blocks) > 3 else ''} "
                f"(any name of model.named_modules() works)")
    if len(set(layers)) != len(layers):
        raise ModelError(f"duplicate names in --layers: {' '.join(layers)}")


def json_ready(value):
    """Nested lists / dicts of floats with NaN and inf as null (JSON has neither)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_jsonl(path: str, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(json_ready(r)) + "\n" for r in records))


def run_label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir))


# ---------------------------------------------------------------- measurement

def measure(model, loader, layers, max_batches, model_b=None):
    """One pass over the loader: the CKA matrix and the ReLU activity of each model."""
    rows = layers + [LOGITS]
    cka = MinibatchCKA(rows, rows if model_b is not None else None)
    images = 0
    models = (model,) if model_b is None else (model, model_b)
    with eval_no_grad(*models), contextlib.ExitStack() as stack:
        run_a = stack.enter_context(collect_features(model, layers, True, gram))
        relu_a = stack.enter_context(count_relu_activity(model, layers))
        run_b = relu_b = None
        if model_b is not None:
            run_b = stack.enter_context(collect_features(model_b, layers, True, gram))
            relu_b = stack.enter_context(count_relu_activity(model_b, layers))
        for i, (x, _labels) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if x.shape[0] < MIN_BATCH:  # the unbiased HSIC needs n ≥ 4: skip a short last batch
                continue
            cka.update_grams(run_a(x), None if run_b is None else run_b(x))
            images += x.shape[0]
    if not cka.batches:
        raise ConfigError(f"no val batch of at least {MIN_BATCH} images; raise --batch-size")
    return {"rows": rows, "cols": rows, "matrix": cka.compute().tolist(),
            "relu_active": relu_a.fractions(),
            "relu_active_b": relu_b.fractions() if relu_b is not None else None,
            "images": images, "batches": cka.batches}


# ---------------------------------------------------------------- figures

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


def plot_heatmaps(records, title, path, wanted=None):
    shown = _epochs_to_show(records, wanted)
    ncols = min(4, len(shown))
    nrows = -(-len(shown) // ncols)
    size = len(shown[0]["rows"])
    cell = max(2.6, 0.45 * size + 1.2)
    fig, axes = plt.subplots(nrows, ncols, figsize=(cell * ncols + 1.0, cell * nrows + 0.4),
                             squeeze=False)
    im = None
    for ax in axes.flat[len(shown):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, shown):
        mat = np.array([[np.nan if v is None else v for v in row] for row in r["matrix"]], float)
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
        ax.set_xticks(range(len(r["cols"])))
        ax.set_xticklabels(r["cols"], rotation=90, fontsize=7)
        ax.set_yticks(range(len(r["rows"])))
        ax.set_yticklabels(r["rows"], fontsize=7)
        ax.set_title(f"epoch {r['epoch']:.3g}", fontsize=9)
        if size <= 8:
            for (i, j), v in np.ndenumerate(mat):
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    cax = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(im, cax=cax, label="linear CKA")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _entry(r, a, b):
    v = r["matrix"][r["rows"].index(a)][r["cols"].index(b)]
    return np.nan if v is None else v


def plot_curves(records, layers, between, title, path):
    ep = [r["epoch"] for r in records]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(layers) + 1))
    if between:
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for c, name in zip(colors, layers + [LOGITS]):
            ax.plot(ep, [_entry(r, name, name) for r in records], marker="o", markersize=3,
                    color=c, label=name)
        ax.set_ylabel("CKA(A's layer, B's same layer)")
        axes = [ax]
    else:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for c, name in zip(colors, layers):
            axes[0].plot(ep, [_entry(r, name, LOGITS) for r in records], marker="o",
                         markersize=3, color=c, label=name)
        axes[0].set_ylabel("linear CKA")
        axes[0].set_title("CKA(layer, logits)", fontsize=9)
        for c, (a, b) in zip(colors, zip(layers, layers[1:] + [LOGITS])):
            axes[1].plot(ep, [_entry(r, a, b) for r in records], marker="o", markersize=3,
                         color=c, label=f"{a} ↔ {b}")
        axes[1].set_title("CKA between consecutive layers", fontsize=9)
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_relu(records, layers, labels, path):
    ep = [r["epoch"] for r in records]
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(layers) + 1))  # as in plot_curves
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for key, style, label in (("relu_active", "-", labels[0]), ("relu_active_b", "--", labels[1])):
        if records[0].get(key) is None:
            continue
        for c, name in zip(colors, layers):
            vals = [r[key][name] for r in records]
            if all(v is None or not np.isfinite(v) for v in vals):
                continue
            ax.plot(ep, [np.nan if v is None else v for v in vals], style, marker="o",
                    markersize=3, color=c, label=f"{name} ({label})" if labels[1] else name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of ReLU outputs > 0")
    ax.set_title("active ReLUs per layer (1 = linear)", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="run directory (runs/<name>)")
    p.add_argument("run2", nargs="?", help="a second run: CKA between the two at matching epochs")
    p.add_argument("--epochs", type=float, nargs="+", help="checkpoint epochs (default: all)")
    p.add_argument("--steps", action="store_true",
                   help="also the step_* checkpoints taken inside an epoch")
    p.add_argument("--layers", nargs="+", help="module names (default: the stages layer1..N)")
    p.add_argument("--max-batches", type=int, help="val batches per checkpoint (default: all)")
    p.add_argument("--batch-size", type=int,
                   help="val batch size (default: the run's eval_batch_size; ≥ 4)")
    p.add_argument("--heatmap-epochs", type=float, nargs="+",
                   help="epochs to draw in the heatmap grid (default: all, or 12 spread out)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", help="figure directory (default: RUN/figures)")
    p.add_argument("--output", help="jsonl path (default: RUN/cka.jsonl or "
                                    "RUN/cka_vs_<RUN2>.jsonl)")
    args = p.parse_args(argv)
    if args.max_batches is not None and args.max_batches < 1:
        p.error("--max-batches must be ≥ 1")
    if args.batch_size is not None and args.batch_size < MIN_BATCH:
        p.error(f"--batch-size must be ≥ {MIN_BATCH} (the unbiased HSIC needs 4 images)")
    return args


def main(argv=None):
    from selectivity.data import build_loader

    args = parse_args(argv)
    overrides = {"workers": 0}
    if args.batch_size:
        overrides["eval_batch_size"] = args.batch_size
    cfg = open_run(args.run, **overrides)
    ckpts = choose_checkpoints(args.run, args.epochs, args.steps)
    between = args.run2 is not None
    if between:
        cfg_b = open_run(args.run2, **overrides)
        for key in ("dataset", "data_dir", "image_size", "synthetic_size", "synthetic_classes"):
            if getattr(cfg, key) != getattr(cfg_b, key):
                raise ConfigError(f"the runs differ in {key} ({getattr(cfg, key)!r} vs "
                                  f"{getattr(cfg_b, key)!r}): CKA needs the same val images")
        at = {round(c.epoch, 9): c for c in choose_checkpoints(args.run2, args.epochs, args.steps)}
        ckpts = [c for c in ckpts if round(c.epoch, 9) in at]
        if not ckpts:
            raise CheckpointError(f"{args.run} and {args.run2} have no checkpoint epoch in common")
    probe = build_model(cfg.model, 2, cfg.small_stem)
    layers = list(args.layers) if args.layers else stage_names(probe)
    check_layers(probe, layers)
    if between:
        check_layers(build_model(cfg_b.model, 2, cfg_b.small_stem), layers)

    device = pick_device(args.device)
    loader = build_loader(cfg, "val", device)
    name_a = run_label(args.run)
    name_b = run_label(args.run2) if between else None
    prefix = f"cka_vs_{name_b}" if between else "cka"
    out_jsonl = args.output or os.path.join(args.run, f"{prefix}.jsonl")
    fig_dir = args.out or os.path.join(args.run, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(out_jsonl)), exist_ok=True)

    records = []
    for c in ckpts:
        model = load_model(cfg, c, device)
        model_b = load_model(cfg_b, at[round(c.epoch, 9)], device) if between else None
        rec = {"epoch": c.epoch, "step": c.step, "checkpoint": os.path.basename(c.path),
               "run": name_a, "run_b": name_b}
        rec.update(measure(model, loader, layers, args.max_batches, model_b))
        records.append(rec)
        write_jsonl(out_jsonl, records)  # rewritten each time: an interrupted run keeps its lines
        if between:
            cells = "  ".join(f"{n} {_entry(rec, n, n):.3f}" for n in layers + [LOGITS])
            print(f"epoch {c.epoch:.3g}: CKA(A, B) same layer: {cells}", flush=True)
        else:
            cells = "  ".join(f"{n} {_entry(rec, n, LOGITS):.3f}" for n in layers)
            print(f"epoch {c.epoch:.3g}: CKA(·, logits): {cells}", flush=True)

    title = (f"linear CKA: {name_a} (rows) vs {name_b} (cols)" if between
             else f"linear CKA within {name_a}")
    written = [os.path.join(fig_dir, f"{prefix}_{k}.png")
               for k in ("heatmaps", "curves", "relu_active")]
    plot_heatmaps(records, title, written[0], args.heatmap_epochs)
    plot_curves(records, layers, between, title, written[1])
    plot_relu(records, layers, (name_a, name_b), written[2])
    print_summary(records, layers, between, out_jsonl, written)


def print_summary(records, layers, between, out_jsonl, written):
    r0 = records[0]
    what = (f"{r0['run']} (rows) vs {r0['run_b']} (cols), same layer" if between
            else f"{r0['run']}, CKA(layer, logits)")
    print(f"\nsummary: {what}; {r0['images']} val images in {r0['batches']} batch(es) per "
          f"checkpoint")
    w = max(8, *(len(n) for n in layers))
    head = "epoch    step  " + " ".join(f"{n:>{w}}" for n in layers + ([LOGITS] if between else []))
    head += "   | active ReLUs: " + " ".join(f"{n:>{w}}" for n in layers)
    print(head)
    for r in records:
        cka = [_entry(r, n, n if between else LOGITS) for n in layers + ([LOGITS] if between
                                                                         else [])]
        relu = [np.nan if r["relu_active"][n] is None else r["relu_active"][n] for n in layers]
        print(f"{r['epoch']:<7.3g} {r['step']:>5}  " + " ".join(f"{v:>{w}.3f}" for v in cka)
              + "   |               " + " ".join(f"{v:>{w}.3f}" for v in relu))
    print(f"wrote {out_jsonl}, " + ", ".join(written))


if __name__ == "__main__":
    run_cli(main)
