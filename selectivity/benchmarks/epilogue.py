"""The fused residual epilogue against stock add + ReLU, forward + backward, on the CPU.

    python tools/bench_epilogue.py [--rounds 7] [--threads N]     (prints the table)

For every ResNet-50 block-output shape at 64 px input and B = 64 ([64, 256, 16, 16], [64, 512, 8, 8],
[64, 1024, 4, 4], [64, 2048, 2, 2]), float32, channels_last and NCHW:

- stock: what torchvision's blocks do, ``out += identity; out = relu_(out)``, then the backward of
  that (``threshold_backward``; the add's backward passes the gradient through);
- fused: ``epilogue.add_relu_means_(out, identity)`` (y, written into out as stock does, and the
  per-image unit means in one pass: what the fused block forwards run), then its backward with the
  means unused by the loss (as when the tracker reads them);
- fused + means in the loss (as the regularizer uses them): informational.

``out`` and ``identity`` are fresh non-leaf copies of the same data for every call, made outside the
timer (a round times a few calls of a candidate back to back); the backward is ``torch.autograd.grad`` to the leaves they were copied from, so neither side
pays for gradient accumulation. Rounds interleave the candidates; each round's ratio is fused ÷
stock from that round, and the table shows the median ratio with the min–max over rounds.
Target: median ratio <= 1.00 for every shape and layout.
"""
from __future__ import annotations

import statistics
import time

import torch

from .. import epilogue

B = 64
SHAPES = ((256, 16), (512, 8), (1024, 4), (2048, 2))  # (channels, side) of ResNet-50's block outputs at 64 px
LAYOUTS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}
TARGET = 1.00


def _inputs(U, side, fmt):
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(B, U, side, side, generator=g).contiguous(memory_format=fmt).requires_grad_()
              for _ in range(2)]
    grad_y = torch.randn(B, U, side, side, generator=g).contiguous(memory_format=fmt)
    return leaves, grad_y


def _stock(leaves, grad_y):
    out, identity = (t.clone() for t in leaves)

    def run():
        o = out
        o += identity
        o = torch.relu_(o)
        torch.autograd.grad(o, leaves, grad_y)
    return run


def _fused(leaves, grad_y, means_in_loss: bool):
    out, identity = (t.clone() for t in leaves)

    def run():
        y, means = epilogue.add_relu_means_(out, identity)
        if means_in_loss:
            torch.autograd.grad((y, means), leaves, (grad_y, torch.ones_like(means)))
        else:
            torch.autograd.grad(y, leaves, grad_y)
    return run


def measure(U, side, fmt, rounds):
    """{candidate: [seconds per call, one value per round]}. In each round every candidate runs
    ``reps`` calls back to back (enough for ~4M elements in all, so small shapes are not timed one
    sub-millisecond call at a time), on fresh copies made before its timer starts."""
    leaves, grad_y = _inputs(U, side, fmt)
    reps = max(2, (1 << 23) // leaves[0].numel())
    makers = {"stock": lambda: _stock(leaves, grad_y),
              "fused": lambda: _fused(leaves, grad_y, False),
              "fused_means_loss": lambda: _fused(leaves, grad_y, True)}
    for make in makers.values():  # warm-up: allocator, thread pool, first-call dispatch
        for _ in range(2):
            make()()
    times = {k: [] for k in makers}
    for _ in range(rounds):
        for name, make in makers.items():
            calls = [make() for _ in range(reps)]  # the copies are made here, outside the timer
            t0 = time.perf_counter()
            for call in calls:
                call()
            times[name].append((time.perf_counter() - t0) / reps)
            del calls
    return times


def summarize(times):
    """(stock median ms, fused median ms, median ratio, min ratio, max ratio, means-loss ratio)."""
    per_round = [f / s for f, s in zip(times["fused"], times["stock"])]
    loss_round = [f / s for f, s in zip(times["fused_means_loss"], times["stock"])]
    return (statistics.median(times["stock"]) * 1e3, statistics.median(times["fused"]) * 1e3,
            statistics.median(per_round), min(per_round), max(per_round), statistics.median(loss_round))


def measure_all(rounds: int = 7, threads: int = 0, on_row=None) -> list[dict]:
    """One row per (layout, shape): medians (ms), the median fused ÷ stock ratio with its min and max
    over rounds, the ratio with the means in the loss, and whether the target is met. ``on_row(row)``
    is called as each row is done (the tool prints it)."""
    if rounds < 5:
        raise ValueError(f"rounds must be >= 5 for a median with its spread, got {rounds}")
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for layout, fmt in LAYOUTS.items():
        for U, side in SHAPES:
            s_ms, f_ms, r, lo, hi, r_loss = summarize(measure(U, side, fmt, rounds))
            rows.append(dict(layout=layout, shape=(B, U, side, side), stock_ms=s_ms, fused_ms=f_ms,
                             ratio=r, ratio_min=lo, ratio_max=hi, ratio_means_loss=r_loss,
                             ok=r <= TARGET))
            if on_row is not None:
                on_row(rows[-1])
    return rows
