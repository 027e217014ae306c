#!/usr/bin/env python
"""Linear CKA among a ResNet's stage outputs and its logits, per checkpoint (paper 1's
"linearity" analysis), the fraction of active ReLUs per stage, and a random-init baseline.

    python tools/cka.py RUN [RUN2] [--epochs 0 1 2] [--steps] [--layers layer1 layer2 ...]
                        [--max-batches N] [--batch-size N] [--heatmap-epochs 0 5 10] [--seed S]
                        [--out DIR] [--device auto|cpu|cuda] [--threads N]
                        [--bn-mode recalibrate|running|batch]
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from selectivity.analyses.cka.cka import MIN_BATCH
from selectivity.analyses.cka.report import HELP, report
from selectivity.cli import run_cli
from selectivity.toolargs import Parser, add_common, echo, positive


def parse_args(argv=None):
    p = Parser(description=__doc__ + HELP)
    add_common(p, out_help="output folder: the jsonl, and figures/ (default: RUN)")
    p.add_argument("run2", nargs="?", help="a second run: CKA between the two at matching epochs")
    p.add_argument("--epochs", type=float, nargs="+", help="checkpoint epochs (default: all)")
    p.add_argument("--steps", action="store_true",
                   help="also the step_* checkpoints taken inside an epoch")
    p.add_argument("--layers", nargs="+",
                   help="module names or globs (default: the stages, 'layer*')")
    p.add_argument("--max-batches", type=int, help="val batches per checkpoint (default: all)")
    p.add_argument("--batch-size", type=int,
                   help=f"val batch size (default: the run's eval_batch_size; ≥ {MIN_BATCH})")
    p.add_argument("--heatmap-epochs", type=float, nargs="+",
                   help="epochs to draw in the heatmap grid (default: all, or 12 spread out)")
    p.add_argument("--seed", type=int, default=0,
                   help="the val order's shuffle and the random-init baseline (default 0)")
    args = p.parse_args(argv)
    positive(p, args, "max_batches")
    if args.batch_size is not None and args.batch_size < MIN_BATCH:
        p.error(f"--batch-size must be >= {MIN_BATCH} (the unbiased HSIC needs 4 images)")
    return args


def main(argv=None):
    a = parse_args(argv)
    report(a.run, a.run2, out=a.out, epochs=a.epochs, steps=a.steps, layers=a.layers,
           max_batches=a.max_batches, batch_size=a.batch_size, heatmap_epochs=a.heatmap_epochs,
           seed=a.seed, device=a.device, threads=a.threads, bn_mode=a.bn_mode, echo=echo)


if __name__ == "__main__":
    run_cli(main)
