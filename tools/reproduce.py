#!/usr/bin/env python
"""One command for the small-scale study: pilot → n → main runs → findings.

    python tools/reproduce.py [--out runs/reproduce] [--jobs 2]
    python tools/reproduce.py --tiny --out /tmp/repro_tiny      # CI: the same path, in minutes

Trains every condition of configs/study/ (ResNet-20 on digits_hard at 16 px: α = 0, the α grid,
paper 1's later starts and equal windows) on the pilot seeds, chooses each condition's n by power
from them, trains the main seeds, analyses the α = 0 checkpoints (tools/ablate.py, cka.py,
orientation.py) and writes

  <docs>/findings.md         per claim: the pilot, the n, paired intervals with Wilcoxon and sign
                             tests, rates of seeds that did not learn with Fisher's test, and a
                             verdict by the rule printed beside it; the split-half check;
  <docs>/findings/           its figures and pilot.json (the pilot's record, pinning the rules).

``<docs>`` is ``docs/`` for the full study and the ``--out`` directory with ``--tiny`` (a tiny run
never overwrites the committed findings). Every step is resumable: a rerun skips finished runs and
analyses and reproduces the findings exactly. ``--tiny`` keeps every condition, claim and step but
trains 1 epoch on 2 pilot and 2 main seeds: its numbers test the pipeline, not the papers.
``--analyse-only`` trains nothing and writes the findings from the runs there are.
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
    p.add_argument("--jobs", type=int, default=2, help="trainings at once (default 2)")
    p.add_argument("--tiny", action="store_true", help="the CI version (minutes)")
    p.add_argument("--analyse-only", action="store_true", help="no training; findings only")
    args = p.parse_args(argv)
    done = reproduce(args.out, args.docs, args.jobs, args.tiny, args.analyse_only)
    if done.failed:
        print(f"error: {len(done.failed)} run(s) failed ({', '.join(done.failed)}); rerun the "
              f"same command to resume them", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {done.findings} and {os.path.join(done.docs, 'findings')}/ "
          f"(training {done.train_s:.0f} s, total {done.total_s:.0f} s)")


if __name__ == "__main__":
    run_cli(main)
