#!/usr/bin/env python
"""Unit ablation across training: most selective vs random vs least selective units.

    python tools/ablate.py RUN [--epochs 0 0.5 1 2 ...] [--stages layer1 layer2 ... | --whole]
        [--conditions selective random least] [--fractions F ... | --k-grid K ... | --k-grid paper]
        [--mode zero|mean] [--random-draws N] [--random-fixed] [--seed S]
        [--rank-fraction 0.2] [--batch-size 64] [--device cpu] [--threads N] [--no-figures]
    python tools/ablate.py RUN --plot-only      # figures + summary again from RUN/ablation.jsonl

For each chosen checkpoint (default: all of RUN/checkpoints, sub-epoch step_*.pt included):
  1. rank every residual block's units by class selectivity on the ranking split — a fixed
     stratified --rank-fraction of the TRAINING split, without augmentation;
  2. ablate k units per block in all blocks of a stage at once (or of the whole network with
     --whole), for each condition and each k of the grid, and measure top-1 accuracy and loss on
     the VALIDATION split (never the ranking images).
Grid: --fractions of each block's units (default 0 1/8 1/4 3/8 1/2 3/4 1), or --k-grid with
absolute units per block (k larger than a stage's blocks is dropped for that stage), or
--k-grid paper (paper 1: steps of 15 to C/2, then 40; for big models).
Random units are re-drawn for every batch of --batch-size images (paper 1) unless
--random-fixed; --random-draws independent draws are averaged (their s.d. is kept).

Writes (RUN/ablation.jsonl is rewritten atomically after every checkpoint):
  RUN/ablation.jsonl             one line per (checkpoint, stage, condition, k): epoch, step, stage,
                                 condition, k, fraction, acc1, loss, norm_acc1 (acc1 / unablated
                                 acc1), acc1_unablated, per-draw values for random, si_ablated, ...
  RUN/figures/ablation_curves_<stage>.png   normalized accuracy against k, a panel per checkpoint
  RUN/figures/ablation_auc.png   area under that curve (mean over the grid) against epoch
and prints a summary table. Details and choices: docs/ablation.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from selectivity import ablation as A  # noqa: E402
from selectivity.checkpoint import CheckpointError, atomic_write_text  # noqa: E402
from selectivity.errors import run_cli  # noqa: E402
from selectivity.models import unit_registry  # noqa: E402
from selectivity.ranking_split import ranking_loader  # noqa: E402
from selectivity.runs import choose_checkpoints, load_model, run_config, val_records  # noqa: E402
from selectivity.unit_ranking import AblationError, rank_units  # noqa: E402

COLORS = {"selective": "C3", "random": "C7", "least": "C0"}
CACHE_BYTES = 1 << 30  # data sets smaller than this are decoded once and kept in memory


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run directory (tools/train.py --out-dir/--name)")
    p.add_argument("--epochs", type=float, nargs="+",
                   help="checkpoints by (fractional) epoch; default: all")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--stages", nargs="+", help="stages to ablate one at a time (default: all)")
    scope.add_argument("--whole", action="store_true",
                       help="ablate all blocks of the network at once (grid in fractions)")
    p.add_argument("--conditions", nargs="+", default=list(A.CONDITIONS), choices=A.CONDITIONS)
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--fractions", type=float, nargs="+",
                      help=f"fractions of each block's units (default {list(A.DEFAULT_FRACTIONS)})")
    grid.add_argument("--k-grid", nargs="+", help="units per block (ints), or 'paper'")
    p.add_argument("--mode", default="zero", choices=A.MODES,
                   help="zero the units, or clamp them to their mean over the ranking split")
    p.add_argument("--random-draws", type=int, default=3)
    p.add_argument("--random-fixed", action="store_true",
                   help="one random set per draw for the whole evaluation (default: per batch)")
    p.add_argument("--seed", type=int, default=0, help="random draws and the ranking split")
    p.add_argument("--rank-fraction", type=float, default=0.2,
                   help="stratified fraction of the training split to rank units on")
    p.add_argument("--rank-max-images", type=int, default=50_000)
    p.add_argument("--batch-size", type=int, default=64,
                   help="evaluation batch (the unit of random re-draws)")
    p.add_argument("--max-images", type=int, default=None,
                   help="images per forward pass (conditions × batch); default 256 CPU, 4096 GPU")
    p.add_argument("--device", default=None, help="cpu | cuda (default: the run's device)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the run's)")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the figures and the summary from RUN/ablation.jsonl; no ablation")
    args = p.parse_args(argv)
    for name in ("random_draws", "batch_size", "rank_max_images"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.max_images is not None and args.max_images < 1:
        p.error("--max-images must be >= 1")
    if args.k_grid and args.k_grid != ["paper"]:
        try:
            args.k_grid = [int(k) for k in args.k_grid]
        except ValueError:
            p.error(f"--k-grid takes integers or 'paper', got {' '.join(args.k_grid)}")
    return args


# ---------------------------------------------------------------------------- data

def maybe_cached(loader, image_size: int):
    """The loader's batches in a list when the split is small (decoded once, reused for every
    checkpoint)."""
    n = len(loader.labels) if hasattr(loader, "labels") else None
    if n is not None and n * 3 * image_size ** 2 * 4 <= CACHE_BYTES:
        loader.set_epoch(0)
        batches = list(loader)
        return batches
    return loader


class _Reiterable:
    """A loader restarted (set_epoch(0)) for every pass."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        self.loader.set_epoch(0)
        return iter(self.loader)


def build_data(cfg, args, device):
    from selectivity.data import build_loader
    ecfg = dataclasses.replace(cfg, eval_batch_size=args.batch_size)
    val = build_loader(ecfg, "val", device)
    rank = ranking_loader(ecfg, device, args.rank_fraction, args.seed, args.rank_max_images,
                          args.batch_size)
    out = []
    for ld in (val, rank):
        c = maybe_cached(ld, cfg.image_size)
        out.append(c if isinstance(c, list) else _Reiterable(c))
    return out[0], out[1], val.num_classes, len(val.labels), len(rank.labels)


# ---------------------------------------------------------------------------- conditions

def scope_units(registry: "OrderedDict[str, int]", args) -> "OrderedDict[str, OrderedDict]":
    """{scope name: {block: units}} for the requested stages (or the whole network)."""
    if args.whole:
        return OrderedDict([(A.WHOLE, OrderedDict(registry))])
    stages = A.scopes_by_stage(registry)
    wanted = args.stages or list(stages)
    unknown = [s for s in wanted if s not in stages]
    if unknown:
        raise AblationError(f"unknown stage {unknown[0]!r}; this model has "
                            f"{', '.join(stages)} (or use --whole)")
    return OrderedDict((s, OrderedDict((n, registry[n]) for n in stages[s])) for s in wanted)


def conditions_for(scopes, args) -> list:
    conds = []
    for scope, units in scopes.items():
        kw = dict(random_draws=args.random_draws, redraw=not args.random_fixed, scope=scope)
        if args.k_grid == ["paper"]:
            widths = set(units.values())
            if len(widths) > 1:
                raise AblationError("--k-grid paper needs blocks of one width; use --fractions "
                                    "with --whole")
            kw["k_grid"] = A.paper_k_grid(widths.pop())
        elif args.k_grid:
            cap = min(units.values())
            kw["k_grid"] = sorted({k for k in args.k_grid if k <= cap} | {0})
            dropped = [k for k in args.k_grid if k > cap]
            if dropped:
                print(f"note: {scope}: k {', '.join(map(str, dropped))} > {cap} units per block; "
                      f"dropped")
        else:
            fr = list(args.fractions) if args.fractions else list(A.DEFAULT_FRACTIONS)
            kw["fractions"] = sorted(set(fr) | {0.0})
        conds += A.make_conditions(units, args.conditions, **kw)
    return conds


def rows_for(results, ckpt, rankings, scopes, logged_acc, args, n_val, n_rank) -> list[dict]:
    """Aggregate the results (random draws averaged) into ablation.jsonl rows."""
    base = [r for r in results if r.condition.units_ablated == 0]
    acc0 = base[0].acc1
    loss0 = base[0].loss
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in results:
        c = r.condition
        groups.setdefault((c.scope, c.kind, c.grid), []).append(r)
    rows = []
    for (scope, kind, grid), rs in groups.items():
        c = rs[0].condition
        units = scopes[scope]
        ks = [k for _, k in c.k]
        total = sum(units.values())
        sis = torch.cat([rankings[n].si for n in units])
        if kind == "random":
            si_abl = float(sis.mean())  # the expectation over random sets
        else:
            picked = [rankings[n].most(k) if kind == "selective" else rankings[n].least(k)
                      for n, k in c.k]
            vals = torch.cat([rankings[n].si[p] for (n, _), p in zip(c.k, picked)])
            si_abl = float(vals.mean()) if vals.numel() else None
        accs = [r.acc1 for r in rs]
        row = {"epoch": round(ckpt.epoch, 6), "step": ckpt.step,
               "checkpoint": os.path.basename(ckpt.path), "stage": scope, "condition": kind,
               "k": ks[0] if len(set(ks)) == 1 else None, "grid": grid,
               "fraction": sum(ks) / total, "units_ablated": sum(ks), "units": total,
               "acc1": float(np.mean(accs)), "loss": float(np.mean([r.loss for r in rs])),
               "norm_acc1": float(np.mean(accs)) / acc0 if acc0 > 0 else None,
               "acc1_unablated": acc0, "loss_unablated": loss0, "acc1_logged": logged_acc,
               "chance": 1.0 / len(rs[0].count),
               "mode": args.mode, "si_ablated": si_abl,
               "images": rs[0].images, "rank_images": n_rank}
        if kind == "random":
            row.update(acc1_sd=float(np.std(accs)), acc1_draws=accs,
                       norm_acc1_draws=[a / acc0 if acc0 > 0 else None for a in accs],
                       loss_draws=[r.loss for r in rs], redraw=not args.random_fixed)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- figures

def _grid_x(rows):
    uniform = all(r["k"] is not None for r in rows)
    if uniform:
        return "k", "units ablated per block"
    return "fraction", "fraction of units ablated"


def plot_curves(rows, scope, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.suptitle(f"ablation in {scope} ({rows[0]['mode']}; ranked on {rows[0]['rank_images']} "
                 f"train images, evaluated on {rows[0]['images']} val images)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_auc(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(rows):
    table = A.auc_table(rows)
    acc0 = {(r["epoch"], r["step"], r["stage"]): (r["acc1_unablated"], r.get("acc1_logged"))
            for r in rows}
    conds = [c for c in A.CONDITIONS if any(c in v for v in table.values())]
    head = f"{'epoch':>7} {'step':>5} {'stage':>7} {'acc1':>6} " + " ".join(
        f"{'AUC ' + c:>14}" for c in conds)
    if "selective" in conds and "random" in conds:
        head += f" {'sel-rand':>8}"
    print(head)
    for key, v in table.items():
        line = f"{key[0]:7.3f} {key[1]:5d} {key[2]:>7} {acc0[key][0]:6.3f} "
        line += " ".join((f"{v[c][0]:7.3f} ±{v[c][1]:.3f}" if c == "random" else
                          f"{v[c][0]:14.3f}") if c in v else f"{'':>14}" for c in conds)
        if "selective" in v and "random" in v:
            line += f" {v['selective'][0] - v['random'][0]:+8.3f}"
        print(line)


# ---------------------------------------------------------------------------- main

def write_jsonl(path, rows):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path):
    if not os.path.exists(path):
        raise CheckpointError(f"no {path}; run tools/ablate.py without --plot-only first")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_figures(run, rows) -> list[str]:
    fig_dir = os.path.join(run, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    written = []
    for scope in OrderedDict.fromkeys(r["stage"] for r in rows):
        path = os.path.join(fig_dir, f"ablation_curves_{scope}.png")
        plot_curves(rows, scope, path)
        written.append(path)
    path = os.path.join(fig_dir, "ablation_auc.png")
    plot_auc(rows, path)
    return written + [path]


def main(argv=None):
    args = parse_args(argv)
    run = args.run
    cfg = run_config(run)
    out_path = os.path.join(run, "ablation.jsonl")
    if args.plot_only:
        rows = read_jsonl(out_path)
        written = write_figures(run, rows)
        print_summary(rows)
        print(f"wrote {', '.join(written)}")
        return
    if args.device:
        if args.device not in ("cpu", "cuda"):
            raise AblationError(f"--device must be cpu or cuda, got {args.device!r}")
        dev = args.device
    else:
        dev = "cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise AblationError("--device cuda, but torch sees no CUDA device")
    device = torch.device(dev)
    threads = cfg.threads if args.threads is None else args.threads
    if threads:
        torch.set_num_threads(threads)
    ckpts = choose_checkpoints(run, args.epochs, steps=True)
    # The same model (so the same scopes and conditions) at every checkpoint: check the request
    # before any data is read.
    model = load_model(cfg, ckpts[0], device)
    scopes = scope_units(unit_registry(model), args)
    layers = [n for units in scopes.values() for n in units]
    conds = conditions_for(scopes, args)
    val, rank, num_classes, n_val, n_rank = build_data(cfg, args, device)
    logged = {r["step"]: r["acc1"] for r in val_records(run)}
    print(f"{run}: {len(ckpts)} checkpoint(s), {len(conds)} conditions; ranking on {n_rank} "
          f"train images (stratified {args.rank_fraction:g}), evaluating on {n_val} val images; "
          f"mode {args.mode}")
    rows, t_all = [], time.perf_counter()
    for ckpt in ckpts:
        t0 = time.perf_counter()
        model = load_model(cfg, ckpt, device)
        rankings = rank_units(model, rank, layers=layers, num_classes=num_classes)
        results = A.evaluate_ablations(model, val, conds, rankings, layers=layers, mode=args.mode,
                                       seed=args.seed, max_images=args.max_images)
        acc_log = logged.get(ckpt.step)
        new = rows_for(results, ckpt, rankings, scopes, acc_log, args, n_val, n_rank)
        rows += new
        write_jsonl(out_path, rows)
        acc0 = new[0]["acc1_unablated"]
        check = ""
        if acc_log is not None:  # the trainer's evaluation of the same weights
            same = abs(acc_log - acc0) < 1.5 / n_val
            check = f" (logged {acc_log:.4f}{'' if same else ' MISMATCH'})"
        print(f"  epoch {ckpt.epoch:.4g} step {ckpt.step}: unablated acc1 {acc0:.4f}{check}; "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
    written = [out_path] + ([] if args.no_figures else write_figures(run, rows))
    print_summary(rows)
    print(f"done in {time.perf_counter() - t_all:.1f} s; wrote {', '.join(written)}")


def cli(argv=None):
    try:
        run_cli(main, argv)
    except AblationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
