#!/usr/bin/env python
"""Run conditions × seeds, resumably: the replicated version of tools/sweep.py.

    python tools/study.py CONFIG [CONFIG ...] --out DIR [--seeds 0 1 2] [--jobs 2] [--set key=value]
    python tools/study.py configs/study/*.yaml --out runs/study --seeds 0 1 2 --jobs 2
    python tools/study.py configs/paper/resnet20_cifar10.yaml --alphas -10 -1 0 1 10 \
        --set data_dir=/data/cifar-10-batches-py --out runs/cifar_alpha

Each config file is one *condition* (named by its file name); each condition trains once per seed
with tools/train.py (a subprocess, ``--threads 1`` unless ``--set threads=…``) into
``DIR/<condition>/s<seed>``. The merged config of a condition (the file plus ``--set``) is written
to ``DIR/<condition>/condition.yaml`` and every seed trains from it, so what ran is on disk beside
the runs. Re-running the same command is safe:
  finished run (its last val record is at its final epoch)  → skipped
  unfinished run (killed, crashed, or more epochs asked)    → continued with --resume
  no run yet                                                → started
A condition whose saved condition.yaml differs from the new one is refused (one line, exit 2):
mixing two settings under one name would silently average them. ``--jobs N`` runs N trainings at
once (each single-threaded); a failed run does not stop the study, the exit status is 1 when any
failed. ``--dry-run`` prints the plan only.
``--alphas A [A ...]``: every config becomes one condition per α, ``<name>_alpha_<A>``, with a
constant α from epoch 0 (``selectivity_reg: [{alpha: A}]``; paper 2's sweep): the α grid of any
preset without a file per value. Combine the runs with selectivity/study/aggregate.py (or
tools/plot_regularization.py DIR/*/s*).
"""
from __future__ import annotations

import argparse
import sys

from selectivity.cli import run_cli
from selectivity.study.runner import study_from_files


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="one config file per condition")
    p.add_argument("--out", required=True, help="the study's directory (DIR/<condition>/s<seed>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every condition (repeatable)")
    p.add_argument("--alphas", type=float, nargs="+", metavar="A",
                   help="one condition per α and config (constant α from epoch 0)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = p.parse_args(argv)
    failed = study_from_files(args.configs, args.out, args.seeds, args.jobs, args.set,
                              args.alphas, args.dry_run)
    if failed:
        sys.exit(1)
    if not args.dry_run:
        print(f"all runs finished in {args.out}")


if __name__ == "__main__":
    run_cli(main)
