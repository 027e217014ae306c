"""The spellings every analysis tool shares, so one flag means one thing everywhere:

    RUN                the run directory (positional)
    --out DIR          where outputs go (default: the run's own folder for a single run)
    --device auto|cpu|cuda   via ``distributed.choose_device``
    --threads N        torch threads (default: the run's ``threads``)
    --bn-mode recalibrate|running|batch   BatchNorm statistics at measurement (default
                       recalibrate; selectivity/evaluation.py)

``Parser`` reports a bad argument as one ``error: ...`` line and exit status 2, like every
other bad input (argparse's default prints the usage first).
"""
from __future__ import annotations

import argparse
import sys

from selectivity.evaluation import BN_MODES


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def add_common(p: argparse.ArgumentParser, *, out_help: str, bn_mode: bool = True,
               run: bool = True) -> None:
    if run:
        p.add_argument("run", help="run directory (tools/train.py --out-dir/--name)")
    p.add_argument("--out", help=out_help)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: CUDA when visible (default auto)")
    p.add_argument("--threads", type=int, help="torch threads (default: the run's `threads`)")
    if bn_mode:
        p.add_argument("--bn-mode", default="recalibrate", choices=BN_MODES,
                       help="BatchNorm statistics when measuring: recomputed on the run's fixed "
                            "training images (default), the model's running ones, or each "
                            "batch's own")


def positive(p: argparse.ArgumentParser, args, *names: str) -> None:
    """Each named option, when given, must be ≥ 1 (one-line error otherwise)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")


def echo(line: str) -> None:
    """Print one line of a tool's output at once (progress shows while a long analysis runs,
    also into a pipe)."""
    print(line, flush=True)
