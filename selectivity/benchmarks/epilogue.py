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

The next layer: in a training step the epilogue's backward gets the gradient the next layer's
backward just made, which nothing else holds, and the op writes its result into that tensor where
stock ``threshold_backward`` allocates a new one (csrc/ops/add_relu_means/autograd.cpp). So each
candidate is followed by the same stand-in for the next layer, ``z = y * w``, and its backward
starts from ``z``; being the same on both sides, it leaves fused ÷ stock ≤ 1 exactly when the
epilogues compare so. Informational: the same pair with the gradient handed straight to y by the
caller (``autograd.grad(y, ..., grad_y)``), which the caller still holds, so the op cannot write
into it (the bench's only setting until 2026-12-06).

``out`` and ``identity`` are fresh non-leaf copies of the same data for every call, made outside the
timer (a round times a few calls of a candidate back to back); the backward is
``torch.autograd.grad`` to the leaves they were copied from, so neither side pays for gradient
accumulation. Rounds interleave the candidates; each round's ratio is fused ÷ stock from that
round, and the table shows the median ratio with the min–max over rounds.
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
    w, grad = (torch.randn(B, U, side, side, generator=g).contiguous(memory_format=fmt) for _ in range(2))
    return leaves, w, grad


def _stock(out, identity):
    out += identity
    return torch.relu_(out), None


def _fused(out, identity):
    return epilogue.add_relu_means_(out, identity)


def _candidate(epilogue_fn, leaves, w, grad, next_layer: bool, means_in_loss: bool = False):
    """One call: the epilogue on fresh copies, then the backward to the leaves, from ``y * w`` (the
    next layer) or from y with ``grad`` (held by the caller)."""
    out, identity = (t.clone() for t in leaves)

    def run():
        y, means = epilogue_fn(out, identity)
        top = y * w if next_layer else y
        if means_in_loss:
            torch.autograd.grad((top, means), leaves, (grad, torch.ones_like(means)))
        else:
            torch.autograd.grad(top, leaves, grad)
    return run


def measure(U, side, fmt, rounds):
    """{candidate: [seconds per call, one value per round]}. In each round every candidate runs
    ``reps`` calls back to back (enough for ~4M elements in all, so small shapes are not timed one
    sub-millisecond call at a time), on fresh copies made before its timer starts."""
    leaves, w, grad = _inputs(U, side, fmt)
    reps = max(2, (1 << 23) // leaves[0].numel())
    makers = {"stock": lambda: _candidate(_stock, leaves, w, grad, True),
              "fused": lambda: _candidate(_fused, leaves, w, grad, True),
              "fused_means_loss": lambda: _candidate(_fused, leaves, w, grad, True, means_in_loss=True),
              "stock_held": lambda: _candidate(_stock, leaves, w, grad, False),
              "fused_held": lambda: _candidate(_fused, leaves, w, grad, False)}
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
    """(stock median ms, fused median ms, median ratio, min ratio, max ratio, means-loss ratio,
    held-gradient ratio); each ratio a median over rounds of that round's candidate ÷ stock."""
    def ratios(name, base="stock"):
        return [f / s for f, s in zip(times[name], times[base])]
    per_round = ratios("fused")
    return (statistics.median(times["stock"]) * 1e3, statistics.median(times["fused"]) * 1e3,
            statistics.median(per_round), min(per_round), max(per_round),
            statistics.median(ratios("fused_means_loss")), statistics.median(ratios("fused_held", "stock_held")))


def measure_all(rounds: int = 7, threads: int = 0, on_row=None) -> list[dict]:
    """One row per (layout, shape): medians (ms), the median fused ÷ stock ratio with its min and max
    over rounds, the ratios with the means in the loss and with a held gradient, and whether the
    target is met. ``on_row(row)`` is called as each row is done (the tool prints it)."""
    if rounds < 5:
        raise ValueError(f"rounds must be >= 5 for a median with its spread, got {rounds}")
    if threads:
        torch.set_num_threads(threads)
    rows = []
    for layout, fmt in LAYOUTS.items():
        for U, side in SHAPES:
            s_ms, f_ms, r, lo, hi, r_loss, r_held = summarize(measure(U, side, fmt, rounds))
            rows.append(dict(layout=layout, shape=(B, U, side, side), stock_ms=s_ms, fused_ms=f_ms,
                             ratio=r, ratio_min=lo, ratio_max=hi, ratio_means_loss=r_loss,
                             ratio_held_gradient=r_held, ok=r <= TARGET))
            if on_row is not None:
                on_row(rows[-1])
    return rows
