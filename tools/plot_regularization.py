#!/usr/bin/env python
"""Figures and a table for selectivity-regularizer runs (Leavitt & Morcos α sweep; paper 1 windows).

    python tools/plot_regularization.py RUN [RUN ...] [--out DIR]
    python tools/plot_regularization.py runs/reg_sweep/* runs/reg_windows/*
    python tools/plot_regularization.py runs/study/*/s*          # conditions × seeds (tools/study.py)

Reads each run's config.yaml (``selectivity_reg``) and metrics.jsonl (val records: acc1, si_mean,
si_null; train records: alpha, si_reg). Runs are grouped into conditions by
selectivity/study/aggregate.py (equal configs but for the seed); every value is the mean over a
condition's seeds with its 95 % Student-t interval (bands on curves, error bars on points, ± and n
in the table; one seed: no interval). A condition whose α is one constant from epoch 0 on (or no
regularizer: α = 0) is a point of the α sweep; any other is a window condition. Writes into DIR
(default: figures/ in the runs' common parent directory, which must not itself be a run):
  reg_alpha.png    final val acc1 against α; final val si_mean against α with si_null (constant-α
                   conditions; drawn when they hold at least two values of α)
  reg_curves.png   val acc1, val si_mean (dotted: si_null) and train minibatch si_reg against epoch,
                   every condition overlaid, windows' starts marked (drawn when a window condition
                   is present, or with --curves)
and prints one table row per condition (markdown, for the docs).
"""
from __future__ import annotations

import argparse

from selectivity.cli import run_cli
from selectivity.study.regularization_report import report


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", help="output directory (default: <common parent>/figures)")
    p.add_argument("--curves", action="store_true", help="draw reg_curves.png for any runs")
    args = p.parse_args(argv)
    table, written = report(args.runs, args.out, args.curves)
    print(table)
    print("wrote " + (", ".join(written) if written else "no figure (one α and no window run)"))


if __name__ == "__main__":
    run_cli(main)
