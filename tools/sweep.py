#!/usr/bin/env python
"""Run a list of configs one after another, resumably, into sibling run directories.

    python tools/sweep.py CONFIG [CONFIG ...] --out-dir runs/reg_sweep [--set key=value ...]
    python tools/sweep.py configs/reg_sweep/*.yaml --out-dir runs/reg_sweep --set epochs=4

Each config trains with tools/train.py (a subprocess) into ``<out-dir>/<config file name>``
(``configs/reg_sweep/alpha_m1.yaml`` → ``<out-dir>/alpha_m1``); ``--set`` overrides apply to every
run (YAML values, as with train.py's flags). Re-running the same command is safe:
  finished run (its last val record is at its final epoch)  → skipped
  unfinished run (killed, crashed, or more epochs asked)    → continued with --resume
  no run yet                                                → started
Each run's output is appended to ``<out-dir>/<name>/train.log``. A failed run does not stop the
sweep; the exit status is non-zero when any run failed. ``--dry-run`` prints the plan only.
"""
from __future__ import annotations

import argparse
import sys

from selectivity.cli import run_cli
from selectivity.study.sweep import run_sweep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("--out-dir", required=True, help="parent directory of the runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = p.parse_args(argv)
    planned, failed = run_sweep(args.configs, args.out_dir, args.set, args.dry_run)
    if args.dry_run:
        return
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    print(f"all {planned} runs finished in {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
