"""Training throughput of the trainer against a bare loop, side by side (tools/bench_train.py).

Variants are interleaved round by round and each ratio uses the per-variant median (the machines
are noisy): a bare loop (forward, cross-entropy, backward, SGD step) over the same loader, in
channels_last and NCHW; the trainer's own ``train_epoch`` with callbacks off, with tracking, and
with tracking and the regularizer.
"""
from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from selectivity.pipelines import build_loader
from selectivity.train.config import data_spec
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


def measure(cfg, rounds: int, steps: int, on_round=None) -> dict:
    """{variant: [img/s per round]}; ``on_round(r, results)`` after each round (progress)."""
    loader = build_loader(data_spec(cfg), "train", torch.device("cpu"))
    runs = variants(cfg)
    results = {n: [] for n in ["bare", "bare_nchw", *runs]}
    for r in range(rounds):
        results["bare"].append(bare_loop(cfg, loader, steps, True))
        results["bare_nchw"].append(bare_loop(cfg, loader, steps, False))
        for name, cbs in runs.items():
            results[name].append(trainer_loop(cfg, cbs, steps))
        if on_round:
            on_round(r, results)
    return results


def medians(results: dict) -> dict:
    return {n: statistics.median(v) for n, v in results.items()}
