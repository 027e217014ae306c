#!/usr/bin/env python
"""Train a model; alone or under ``torchrun --nproc_per_node=N``.

    python tools/train.py -c configs/demo.yaml [--epochs 2] [--lr 0.05] [--resume]

Every key of selectivity/train/config.py is a flag, listed below by section (``--data-dir`` or
``--data_dir``); flags override the file. Bad input exits with status 2 and one line naming the problem, before anything is
written; Ctrl-C exits with status 130 and one line saying where the run stopped.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from selectivity.train.config import (FIELDS, RESUMABLE, SECTIONS, Config, check_machine, help_of,
                                      keys_of, load_config, parse_override)
from selectivity.cli import run_cli


def _default(key: str):
    f = FIELDS[key]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", help="YAML config file")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in <out_dir>/<name> from its last good checkpoint")
    p.add_argument("--accept-config-change", action="store_true",
                   help="with --resume: continue even though keys other than "
                        f"{', '.join(RESUMABLE)} differ from the run's config (each change is "
                        f"recorded in metrics.jsonl)")
    hints = typing.get_type_hints(Config)
    for section in SECTIONS:  # YAML key: value, or --key V; flags win
        group = p.add_argument_group(f"{section} (config keys; flags override the file)")
        for key in keys_of(section):
            typ = hints[key].__name__
            text = f"{typ}, default {_default(key)!r}: {help_of(key)}".replace("%", "%%")
            flags = dict.fromkeys([f"--{key.replace('_', '-')}", f"--{key}"])  # once if no '_'
            group.add_argument(*flags, dest=key, default=None, metavar=typ.upper(), help=text)
    return p.parse_args(argv)


def main(argv=None):
    from selectivity.train import distributed
    from selectivity.train.callbacks import default_callbacks
    from selectivity.train.trainer import Trainer

    args = parse_args(argv)
    overrides = {k: parse_override(k, v) for k, v in vars(args).items()
                 if k in FIELDS and v is not None}
    cfg = load_config(args.config, overrides)
    check_machine(cfg)
    dist = distributed.setup(cfg.device)
    try:
        trainer = Trainer(cfg, dist, resume=args.resume, callbacks=default_callbacks(cfg),
                          accept_config_change=args.accept_config_change)
        last = trainer.fit()
        if dist.is_main and last is not None:
            print(f"done: {trainer.run_dir}  epoch {last['epoch']}  val acc1 {last['acc1']:.4f}  "
                  f"loss {last['loss']:.4f}")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    run_cli(main)
