#!/usr/bin/env python
"""One command for the small-scale study: train conditions × seeds, test each claim, write findings.

    python tools/reproduce.py [--out runs/reproduce] [--seeds 0 1 2] [--jobs 2]
    python tools/reproduce.py --tiny --out /tmp/repro_tiny      # CI: the same path, in minutes

Trains every condition of configs/study/ (ResNet-20 on digits_hard: α = 0, the α grid, and
paper 1's early-only / late windows of equal length) for every seed with tools/study.py's runner
(resumable: finished runs are skipped, unfinished ones resumed), then writes

  <docs>/findings.md         a table per claim: our value ± its 95 % t-interval over seeds and n,
                             the paper's statement, and a verdict (supports / contradicts /
                             inconclusive) decided by the rule printed beside the table;
  <docs>/findings/*.png      the figures it cites (mean over seeds, 95 % band).

``<docs>`` is ``docs/`` for the full study and the ``--out`` directory with ``--tiny`` (a tiny run
never overwrites the committed findings). Every number in findings.md comes from the runs; nothing
is typed. ``--tiny`` keeps every condition and every step of the analysis but trains 1 epoch at
16 px on 2 seeds, the α windows scaled to the shorter training: its numbers test the pipeline, not
the papers. ``--analyse-only`` skips training and writes the findings from the runs there are.

The claims measured on checkpoints run tools/ablate.py, tools/cka.py and tools/orientation.py on
every α = 0 seed, ``RUN --out <out>/analysis/<tool>/<seed>`` with bounded arguments (resumable too:
a finished one is skipped; selectivity/study/analysis_runs.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from selectivity.cli import run_cli
from selectivity.study.reproduce import DEFAULT_OUT, reproduce


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="the study's run directory (default runs/reproduce)")
    p.add_argument("--docs", help="where findings.md and findings/ go (default: docs/, or --out "
                                  "with --tiny)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (tiny: 0 1)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--tiny", action="store_true", help="the CI version (minutes)")
    p.add_argument("--analyse-only", action="store_true", help="no training; findings only")
    args = p.parse_args(argv)
    done = reproduce(args.out, args.docs, args.seeds, args.jobs, args.tiny, args.analyse_only)
    if done.failed:
        print(f"error: {len(done.failed)} run(s) failed ({', '.join(done.failed)}); rerun the "
              f"same command to resume them", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {done.findings} and {os.path.join(done.docs, 'findings')}/ "
          f"(training {done.train_s:.0f} s, total {done.total_s:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
