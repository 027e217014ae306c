#!/usr/bin/env python
"""Memory of selectivity tracking: the tracker's state per layer, and the peak RSS of a ResNet-50
training step (K = 1000 classes) with tracking on ÷ off, each measured in a fresh process
(selectivity/benchmarks/memory.py).

    python tools/bench_memory.py [--batch 32] [--size 64] [--steps 3]
"""
from __future__ import annotations

import argparse

from selectivity.benchmarks.memory import compare
from selectivity.cli import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    res = compare(a.batch, a.size, a.steps)
    layers = res["on"]["tracker_bytes"]
    print(f"ResNet-50, K = 1000, batch {a.batch}, {a.size} px, {a.steps} training steps")
    print("tracker state per layer (sums [K, U] fp64 + counts [K] int64):")
    for n, b in layers.items():
        print(f"  {n:10s} {b / 2**20:7.2f} MiB")
    total = sum(layers.values())
    print(f"  total      {total / 2**20:7.2f} MiB  (O(K·U): 1000 × 15,104 units × 8 B + counts)")
    on, off = res["on"]["peak_rss"], res["off"]["peak_rss"]
    print(f"peak RSS: tracking off {off / 2**20:.0f} MiB, on {on / 2**20:.0f} MiB, "
          f"on ÷ off = {on / off:.3f}")


if __name__ == "__main__":
    run_cli(main)
