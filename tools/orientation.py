#!/usr/bin/env python
"""Orientation selectivity of a run's units to sinusoidal gratings, per checkpoint (Ukita 2020):
gOSI against a permuted control, the effect of ablating the most vs the least orientation-selective
half of a layer on val loss and accuracy, and the shift invariance of higher layers with and
without that ablation.

    python tools/orientation.py RUN [--epochs 0 1 8] [--steps] [--layers relu layer1.0 ...]
                                [--ablate-epochs 8 | --no-ablation] [--shift 4]
                                [--shift-layers layer1 layer2 layer3] [--max-images 10000]
                                [--seed S] [--out DIR] [--device auto|cpu|cuda] [--threads N]
                                [--bn-mode recalibrate|running|batch]
"""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from selectivity.analyses.orientation.report import HELP, report
from selectivity.cli import run_cli
from selectivity.toolargs import Parser, add_common, echo, positive


def parse_args(argv=None):
    p = Parser(description=__doc__ + HELP)
    add_common(p, out_help="output folder: orientation.jsonl, and figures/ (default: RUN)")
    p.add_argument("--epochs", type=float, nargs="+", help="checkpoint epochs (default: all)")
    p.add_argument("--steps", action="store_true",
                   help="also the step_* checkpoints taken inside an epoch")
    p.add_argument("--layers", nargs="+",
                   help="module names or globs (default: the stem relu and every residual "
                        "block; without blocks, the run's track_units)")
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
    p.add_argument("--seed", type=int, default=0,
                   help="the permuted control and the val order's shuffle (default 0)")
    args = p.parse_args(argv)
    positive(p, args, "max_images", "batch_size")
    return args


def main(argv=None):
    a = parse_args(argv)
    report(a.run, out=a.out, threads=a.threads, device=a.device, plot_epochs=a.plot_epochs,
           echo=echo, epochs=a.epochs, steps=a.steps, layers=a.layers,
           shift_layers=a.shift_layers, ablate_epochs=a.ablate_epochs,
           no_ablation=a.no_ablation, shift=a.shift, max_images=a.max_images,
           batch_size=a.batch_size, bn_mode=a.bn_mode, seed=a.seed)


if __name__ == "__main__":
    run_cli(main)
