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
The figures are selectivity.analyses.curves.report.report.
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")

from selectivity.analyses.curves.report import report
from selectivity.cli import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", help="output directory (default: RUN/figures for one run; "
                                 "compare_<a>_vs_<b>/ beside the first run for several)")
    args = p.parse_args(argv)
    report(args.runs, args.out)


if __name__ == "__main__":
    run_cli(main)
