#!/usr/bin/env python
"""Training throughput, measured side by side in one run (this machine is noisy: variants are
interleaved round by round and each ratio uses the per-variant median).

    python tools/bench_train.py [-c configs/demo.yaml] [--rounds 3] [--steps 20]

Prints img/s of:
  bare       a plain loop (forward, cross-entropy, backward, SGD step) over the same loader
  trainer    the engine's train_epoch (AMP/scaler plumbing, logging, callbacks off)
  + every callback variant the config knows (selectivity tracking, regularizer) when available
and the ratios trainer ÷ bare (target ≥ 0.9), tracking on ÷ off (target ≥ 0.98), and the
channels_last ÷ NCHW speed-up of the bare loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time


import torch
import torch.nn.functional as F

from selectivity.train.config import data_spec, load_config
from selectivity.train.distributed import DistInfo
from selectivity.train.models import build_model
from selectivity.train.trainer import Trainer


def bare_loop(cfg, loader, steps: int, channels_last: bool) -> float:
    """img/s of the minimal loop: nothing but the four lines every training loop has."""
    model = build_model(cfg.model, loader.num_classes, cfg.small_stem)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    loader.set_epoch(0)
    n, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        if i == 2:  # two warm-up steps
            n, t0 = 0, time.perf_counter()
        if not channels_last:
            x = x.contiguous()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += y.numel()
        if i + 1 >= steps + 2:
            break
    return n / (time.perf_counter() - t0)


def trainer_loop(cfg, callbacks, steps: int) -> float:
    """img/s of the engine's train_epoch over the same number of steps."""
    with tempfile.TemporaryDirectory() as tmp:
        # Training throughput only: no sub-epoch evaluations or checkpoints inside the window.
        c = dataclasses.replace(cfg, out_dir=tmp, name="bench", progress=False, epochs=1,
                                log_every_steps=10, eval_every_steps=0, save_every_steps=0)
        tr = Trainer(c, DistInfo(), callbacks=callbacks)
        tr.steps_per_epoch = steps + 2
        tr.train_loader.set_epoch(0)
        # Warm-up two steps, then time exactly `steps` steps through train_epoch's own loop.
        it = iter(tr.train_loader)
        for _ in range(2):
            x, y = next(it)
            tr.train_step(x, y)
        limited = _Take(tr.train_loader, steps)
        tr.train_loader = limited
        ips = tr.train_epoch()
        tr.log.close()
        return ips


class _Take:
    """A loader view that stops after n batches (for timing a fixed number of steps)."""

    def __init__(self, loader, n):
        self.loader, self.n = loader, n

    def set_epoch(self, epoch, skip_batches=0):
        self.loader.set_epoch(epoch, skip_batches)

    def __len__(self):
        return self.n

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch


def variants(cfg) -> dict:
    """name → list of callbacks. Optional experiment callbacks join when the code exists."""
    out = {"trainer": []}
    try:
        from selectivity.train.callbacks import tracking_callbacks
        out["trainer+tracking"] = tracking_callbacks(cfg)
    except ImportError:
        pass
    try:
        from selectivity.train.callbacks import regularizer_callbacks
        out["trainer+tracking+regularizer"] = tracking_callbacks(cfg) + regularizer_callbacks(
            cfg, alpha=-1.0)
    except ImportError:
        pass
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-c", "--config", default="configs/demo.yaml")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    cfg = load_config(args.config, {"tensorboard": False})
    from selectivity.pipelines import build_loader
    loader = build_loader(data_spec(cfg), "train", torch.device("cpu"))
    names = ["bare", "bare_nchw"] + list(variants(cfg))
    results = {n: [] for n in names}
    for r in range(args.rounds):
        results["bare"].append(bare_loop(cfg, loader, args.steps, True))
        results["bare_nchw"].append(bare_loop(cfg, loader, args.steps, False))
        for name, cbs in variants(cfg).items():
            results[name].append(trainer_loop(cfg, cbs, args.steps))
        print(f"round {r + 1}/{args.rounds}: " +
              "  ".join(f"{n} {v[-1]:.0f}" for n, v in results.items()), flush=True)
    med = {n: statistics.median(v) for n, v in results.items()}
    print(f"\n{cfg.model} on {cfg.dataset}, batch {cfg.batch_size}, {torch.get_num_threads()} "
          f"threads, {args.steps} steps × {args.rounds} rounds (median img/s)")
    for n in names:
        print(f"  {n:32s} {med[n]:8.1f} img/s")
    print(f"\n  trainer ÷ bare                   {med['trainer'] / med['bare']:.3f}  (target ≥ 0.9)")
    print(f"  channels_last ÷ NCHW (bare loop) {med['bare'] / med['bare_nchw']:.2f}×")
    if "trainer+tracking" in med:
        print(f"  tracking on ÷ off                {med['trainer+tracking'] / med['trainer']:.3f}"
              f"  (target ≥ 0.98)")
    if "trainer+tracking+regularizer" in med:
        print(f"  step time regularizer on ÷ off   "
              f"{med['trainer+tracking'] / med['trainer+tracking+regularizer']:.3f}")


if __name__ == "__main__":
    main()
