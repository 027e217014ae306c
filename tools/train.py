#!/usr/bin/env python
"""Train a model; alone or under ``torchrun --nproc_per_node=N``.

    python tools/train.py -c configs/demo.yaml [--epochs 2] [--lr 0.05] [--resume]

Every key of selectivity/config.py is a flag (``--data-dir`` or ``--data_dir``); flags override
the file. Bad input exits non-zero with one line naming the problem, before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selectivity.config import FIELDS, load_config, parse_override  # noqa: E402
from selectivity.errors import run_cli  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in <out_dir>/<name> from its last good checkpoint")
    for key in FIELDS:
        p.add_argument(f"--{key.replace('_', '-')}", f"--{key}", dest=key, default=None,
                       metavar="V", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    from selectivity import distributed
    from selectivity.callbacks import default_callbacks
    from selectivity.trainer import Trainer

    args = parse_args(argv)
    overrides = {k: parse_override(k, v) for k, v in vars(args).items()
                 if k in FIELDS and v is not None}
    cfg = load_config(args.config, overrides)
    dist = distributed.setup(cfg.device)
    try:
        trainer = Trainer(cfg, dist, resume=args.resume, callbacks=default_callbacks(cfg))
        last = trainer.fit()
        if dist.is_main and last is not None:
            print(f"done: {trainer.run_dir}  epoch {last['epoch']}  val acc1 {last['acc1']:.4f}  "
                  f"loss {last['loss']:.4f}")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
