#!/usr/bin/env python
"""Unit ablation across training: most selective vs random vs least selective units.

    python tools/ablate.py RUN [--epochs 0 0.5 1 2 ...] [--stages layer1 layer2 ... | --whole]
        [--conditions selective random least] [--fractions F ... | --k-grid K ... | --k-grid paper]
        [--mode zero|mean] [--random-draws N] [--random-fixed] [--seed S]
        [--rank-fraction 0.2] [--batch-size 64] [--out DIR] [--device auto|cpu|cuda]
        [--threads N] [--bn-mode recalibrate|running|batch] [--no-figures]
    python tools/ablate.py RUN --plot-only      # figures + summary again from OUT/ablation.jsonl
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from selectivity.analyses.ablation import ablation as A
from selectivity.analyses.ablation.report import HELP, report
from selectivity.analyses.ablation.run import AblationRequest
from selectivity.cli import run_cli
from selectivity.toolargs import Parser, add_common, echo, positive


def parse_args(argv):
    p = Parser(description=__doc__ + HELP)
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
    positive(p, args, "random_draws", "batch_size", "rank_max_images", "max_images")
    if args.k_grid and args.k_grid != ["paper"]:
        try:
            args.k_grid = [int(k) for k in args.k_grid]
        except ValueError:
            p.error(f"--k-grid takes integers or 'paper', got {' '.join(args.k_grid)}")
    return args


def main(argv=None):
    a = parse_args(argv)
    req = AblationRequest(
        epochs=a.epochs, stages=a.stages, whole=a.whole, conditions=a.conditions,
        fractions=a.fractions, k_grid="paper" if a.k_grid == ["paper"] else a.k_grid,
        mode=a.mode, random_draws=a.random_draws, random_fixed=a.random_fixed, seed=a.seed,
        rank_fraction=a.rank_fraction, rank_max_images=a.rank_max_images,
        batch_size=a.batch_size, max_images=a.max_images, bn_mode=a.bn_mode)
    report(a.run, req, out=a.out, device=a.device, threads=a.threads,
           figures=not a.no_figures, plot_only=a.plot_only, echo=echo)


if __name__ == "__main__":
    run_cli(main)
