#!/usr/bin/env python
"""Unit ablation across training: most selective vs random vs least selective units.

    python tools/ablate.py RUN [--epochs 0 0.5 1 2 ...] [--stages layer1 layer2 ... | --whole]
        [--conditions selective random least] [--fractions F ... | --k-grid K ... | --k-grid paper]
        [--mode zero|mean] [--random-draws N] [--random-fixed] [--seed S]
        [--rank-fraction 0.2] [--batch-size 64] [--out DIR] [--device auto|cpu|cuda]
        [--threads N] [--bn-mode recalibrate|running|batch] [--no-figures]
    python tools/ablate.py RUN --plot-only      # figures + summary again from OUT/ablation.jsonl

For each chosen checkpoint (default: all of RUN/checkpoints, sub-epoch step_*.pt included):
  1. rank every residual block's units by class selectivity on the ranking split — a fixed
     stratified --rank-fraction of the TRAINING split, without augmentation;
  2. ablate k units per block in all blocks of a stage at once (or of the whole network with
     --whole), for each condition and each k of the grid, and measure top-1 accuracy and loss on
     the VALIDATION split (never the ranking images).
Both with the BatchNorm statistics of --bn-mode (default: recomputed on the run's fixed training
images before each checkpoint; the checkpoint itself is untouched).
Grid: --fractions of each block's units (default 0 1/8 1/4 3/8 1/2 3/4 1), or --k-grid with
absolute units per block (k larger than a stage's blocks is dropped for that stage), or
--k-grid paper (paper 1: steps of 15 to C/2, then 40; for big models).
Random units are re-drawn for every batch of --batch-size images (paper 1) unless
--random-fixed; --random-draws independent draws are averaged (their s.d. is kept).

Writes (OUT defaults to RUN; OUT/ablation.jsonl is rewritten atomically after every checkpoint):
  OUT/ablation.jsonl             one line per (checkpoint, stage, condition, k): epoch, step, stage,
                                 condition, k, fraction, acc1, loss, norm_acc1 (acc1 / unablated
                                 acc1), acc1_unablated, bn_mode, per-draw values for random,
                                 si_ablated, ...
  OUT/figures/ablation_curves_<stage>.png   normalized accuracy against k, a panel per checkpoint
  OUT/figures/ablation_auc.png   area under that curve (mean over the grid) against epoch
and prints a summary table. The measurement is selectivity.analyses.ablation.run.ablation_rows; details
and choices: docs/ablation.md.
"""
from __future__ import annotations

import os
import sys
import time


import matplotlib

matplotlib.use("Agg")

from selectivity.analyses.ablation import ablation as A
from selectivity.analyses.ablation.run import AblationRequest, ablation_rows, read_rows
from selectivity.analyses.common import set_threads
from selectivity.train.distributed import choose_device
from selectivity.errors import run_cli
from selectivity.train.runs import run_config
from selectivity.toolargs import Parser, add_common


def parse_args(argv):
    p = Parser(description=__doc__)
    add_common(p, out_help="output folder: ablation.jsonl, and figures/ (default: RUN)")
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
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the figures and the summary from OUT/ablation.jsonl; no ablation")
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


def request(args) -> AblationRequest:
    return AblationRequest(
        epochs=args.epochs, stages=args.stages, whole=args.whole, conditions=args.conditions,
        fractions=args.fractions, k_grid="paper" if args.k_grid == ["paper"] else args.k_grid,
        mode=args.mode, random_draws=args.random_draws, random_fixed=args.random_fixed,
        seed=args.seed, rank_fraction=args.rank_fraction, rank_max_images=args.rank_max_images,
        batch_size=args.batch_size, max_images=args.max_images, bn_mode=args.bn_mode)


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


def main(argv=None):
    from selectivity.analyses.ablation.figures import write_figures

    args = parse_args(argv)
    run = args.run
    cfg = run_config(run)
    out = args.out or run
    out_path = os.path.join(out, "ablation.jsonl")
    fig_dir = os.path.join(out, "figures")
    if args.plot_only:
        rows = read_rows(out_path)
        written = write_figures(rows, fig_dir)
        print_summary(rows)
        print(f"wrote {', '.join(written)}")
        return
    device = choose_device(args.device)
    set_threads(args.threads, cfg)

    def started(p):
        print(f"{run}: {p.checkpoints} checkpoint(s), {p.conditions} conditions; ranking on "
              f"{p.rank_images} train images (stratified {args.rank_fraction:g}), evaluating on "
              f"{p.val_images} val images; mode {args.mode}; BN {args.bn_mode}", flush=True)

    def done(ckpt, new, acc_log, seconds):
        acc0 = new[0]["acc1_unablated"]
        check = ""
        if acc_log is not None:  # the trainer's evaluation of the same weights, same BN mode
            same = abs(acc_log - acc0) < 1.5 / new[0]["images"]
            check = f" (logged {acc_log:.4f}{'' if same else ' MISMATCH'})"
        print(f"  epoch {ckpt.epoch:.4g} step {ckpt.step}: unablated acc1 {acc0:.4f}{check}; "
              f"{seconds:.1f} s", flush=True)

    t_all = time.perf_counter()
    rows = ablation_rows(run, request(args), device, out_path, on_start=started,
                         on_checkpoint=done)
    written = [out_path] + ([] if args.no_figures else write_figures(rows, fig_dir))
    print_summary(rows)
    print(f"done in {time.perf_counter() - t_all:.1f} s; wrote {', '.join(written)}")


def cli(argv=None):
    run_cli(main, argv)


if __name__ == "__main__":
    cli()
