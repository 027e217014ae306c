#!/usr/bin/env python
"""Memory of selectivity tracking: the tracker's state per layer, and the peak RSS of a ResNet-50
training step (K = 1000 classes) with tracking on ÷ off, each measured in a fresh process.

    python tools/bench_memory.py [--batch 32] [--size 64] [--steps 3]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys



def one_run(track: bool, batch: int, size: int, steps: int) -> dict:
    """Train `steps` steps of ResNet-50 in this process; report peak RSS and tracker bytes."""
    import torch
    import torch.nn.functional as F
    from selectivity.train.models import build_model
    from selectivity.tracker import SelectivityTracker

    torch.manual_seed(0)
    model = build_model("resnet50", 1000).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    tracker = SelectivityTracker(model, 1000, "blocks") if track else None
    for _ in range(steps):
        x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
        labels = torch.randint(0, 1000, (batch,))
        # The tracker accumulates inside the training forward, as the trainer runs it.
        with tracker.track(labels) if tracker is not None else contextlib.nullcontext():
            loss = F.cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    states = tracker.states.states if tracker is not None else {}
    per_layer = {n: s.numel() * s.element_size() + c.numel() * c.element_size()
                 for n, (s, c) in states.items()}
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tracker_bytes": per_layer}


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(one_run(a.child == "on", a.batch, a.size, a.steps)))
        return
    res = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, __file__, "--child", mode, "--batch", str(a.batch),
                              "--size", str(a.size), "--steps", str(a.steps)],
                             capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
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
    main()
