"""Memory of selectivity tracking (tools/bench_memory.py): the tracker's state per layer, and the
peak RSS of a ResNet-50 training step (K = 1000 classes) with tracking on ÷ off, each measured in
a fresh process (``python -m selectivity.benchmarks.memory on|off BATCH SIZE STEPS`` is that
process: it prints one JSON line).
"""
from __future__ import annotations

import contextlib
import json
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


def compare(batch: int, size: int, steps: int) -> dict:
    """{"off": one_run(False, ...), "on": one_run(True, ...)}, each in a fresh interpreter."""
    res = {}
    for mode in ("off", "on"):
        out = subprocess.run([sys.executable, "-m", "selectivity.benchmarks.memory", mode,
                              str(batch), str(size), str(steps)],
                             capture_output=True, text=True, check=True)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


if __name__ == "__main__":
    mode, batch, size, steps = sys.argv[1], *map(int, sys.argv[2:5])
    print(json.dumps(one_run(mode == "on", batch, size, steps)))
