#!/usr/bin/env python
"""Training throughput, measured side by side in one run (this machine is noisy: variants are
interleaved round by round and each ratio uses the per-variant median).

    python tools/bench_train.py [-c configs/demo.yaml] [--rounds 3] [--steps 20]

Prints img/s of:
  bare       a plain loop (forward, cross-entropy, backward, SGD step) over the same loader
  trainer    the engine's train_epoch (AMP/scaler plumbing, logging, callbacks off)
  + every callback variant the config knows (selectivity tracking, regularizer) when available
and the ratios trainer ÷ bare (target ≥ 0.9), tracking on ÷ off (target ≥ 0.98), and the
channels_last ÷ NCHW speed-up of the bare loop. The measurement: selectivity/benchmarks/train.py.
"""
from __future__ import annotations

import argparse

import torch

from selectivity.benchmarks.train import measure, medians
from selectivity.cli import run_cli
from selectivity.train.config import load_config


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-c", "--config", default="configs/demo.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    cfg = load_config(args.config, {"tensorboard": False})
    results = measure(cfg, args.rounds, args.steps, on_round=lambda r, res: print(
        f"round {r + 1}/{args.rounds}: " + "  ".join(f"{n} {v[-1]:.0f}" for n, v in res.items()),
        flush=True))
    med = medians(results)
    print(f"\n{cfg.model} on {cfg.dataset}, batch {cfg.batch_size}, {torch.get_num_threads()} "
          f"threads, {args.steps} steps × {args.rounds} rounds (median img/s)")
    for n, v in med.items():
        print(f"  {n:32s} {v:8.1f} img/s")
    print(f"\n  trainer ÷ bare                   {med['trainer'] / med['bare']:.3f}  (target ≥ 0.9)")
    print(f"  channels_last ÷ NCHW (bare loop) {med['bare'] / med['bare_nchw']:.2f}×")
    if "trainer+tracking" in med:
        print(f"  tracking on ÷ off                {med['trainer+tracking'] / med['trainer']:.3f}"
              f"  (target ≥ 0.98)")
    if "trainer+tracking+regularizer" in med:
        print(f"  step time regularizer on ÷ off   "
              f"{med['trainer+tracking'] / med['trainer+tracking+regularizer']:.3f}")


if __name__ == "__main__":
    run_cli(main)
