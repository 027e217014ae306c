"""What the GPU check's benchmarks share (selectivity.gpucheck.stages runs them; docs/gpu.md).

The same code runs on the GPU and, in the dry run, on the CPU at tiny sizes. Everything that
differs between the two sits here, behind ``Bench``: the device, the timer (CUDA events on the
GPU, perf_counter on the CPU) and the L2 flush. The dry run never touches torch.cuda: the shell
script also hides every GPU (CUDA_VISIBLE_DEVICES=""), so a stray CUDA call fails it loudly.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout


class Bench:
    """Device, timer and cache flush for one mode (``dry_run``: CPU; else the current CUDA device)."""

    def __init__(self, dry_run: bool):
        import torch  # here, not above: the stages that only read files start without torch
        self.torch = torch
        self.dry_run = dry_run
        self.device = torch.device("cpu" if dry_run else "cuda")
        self._flush_buf = None

    def sync(self) -> None:
        if not self.dry_run:
            self.torch.cuda.synchronize()

    def time_ms(self, fn, reps: int = 1, finish=None) -> float:
        """Milliseconds for ``reps`` calls of ``fn``, all queued work before them finished first.

        ``finish()`` runs after the calls, before the end mark: it must make the current stream
        wait for work the calls queued on other streams, which the end event would otherwise
        not wait for."""
        self.sync()
        if self.dry_run:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            if finish is not None:
                finish()
            return (time.perf_counter() - t0) * 1e3
        # Events time the GPU's work, not the launch: what a training step costs the GPU.
        cuda = self.torch.cuda
        start, end = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        if finish is not None:
            finish()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def flush_cache(self) -> None:
        """Evict the operands from the cache so each timed call reads from memory, as in training.

        The H200's L2 is 60 MB and the smallest ResNet-50 block output at B = 256 in half precision
        is 51 MB: without this, repeated calls would be timed out of L2. 256 MB (4x L2) on the GPU;
        on the CPU in the dry run a small buffer only exercises the path.
        """
        if self._flush_buf is None:
            n = (8 if self.dry_run else 256) * 2**20
            self._flush_buf = self.torch.empty(n, dtype=self.torch.uint8, device=self.device)
        self._flush_buf.zero_()

    def median_ms(self, fn, reps: int, warmup: int = 2) -> float:
        """Median over ``reps`` single timed calls, each after a cache flush (triton's do_bench does
        the same; done by hand so the dry run times the same way on the CPU)."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            self.flush_cache()
            times.append(self.time_ms(fn))
        return statistics.median(times)


def write_json(path: str, obj) -> None:
    """Write atomically, so a stage killed by its time limit leaves its last complete record."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(x):
    if type(x).__module__.startswith("torch"):  # a dtype or device
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
