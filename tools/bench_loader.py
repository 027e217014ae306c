#!/usr/bin/env python
"""Loader throughput, torch vs ffcv vs dali, side by side on the same files (CPU, loader only).

    python tools/bench_loader.py [--workers 2] [--large 1000] [--small 10000] [--check]

Two workloads, generated into a temporary directory (nothing is downloaded):
  (1) ImageNet-like JPEGs (~500×375, q90), random-resized-crop to 224 + flip, batch 64;
  (2) 32×32 JPEGs, random-resized-crop to 32 + flip, batch 256.
Each backend is the project's own loader (selectivity/pipelines/): torch = TorchLoader over ImageFolder with
``--workers`` DataLoader processes; ffcv = FFCVLoader over a .beton converted from the same files
(JPEG q90 for (1); 'smart' mode, i.e. raw pixels, for (2)) with ``--workers`` threads; dali =
DALILoader over the same files with ``--workers`` threads. Every loader yields normalized float32
NCHW (channels_last) batches on the CPU; no model runs. An epoch is run first to warm up (worker
start, numba compilation, page cache), then epochs are timed for at least ``--seconds``.
Printed: images/s per backend and the ratios to torch beside the targets (ffcv and dali ≥ 1.4× on
(1); ffcv ≥ 5× and dali ≥ 3× on (2)). ``--check`` exits 1 when a target is missed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from selectivity.benchmarks.loader import run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="workers/threads for every backend")
    p.add_argument("--large", type=int, default=1000, help="ImageNet-like JPEGs")
    p.add_argument("--small", type=int, default=10000, help="32×32 JPEGs")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per backend (min)")
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    t0, ok = time.perf_counter(), True
    print(f"loader benchmark: {os.cpu_count()} CPU cores, {a.workers} workers/threads per "
          f"backend, loader only (normalized float32 NCHW batches on the CPU)", flush=True)
    for title, res, targets in run({"large": a.large, "small": a.small}, a.workers, a.seconds,
                                   a.dir):
        print(f"{title}\n    torch {res['torch']:9,.0f} img/s")
        for b in ("ffcv", "dali"):
            ratio = res[b] / res["torch"]
            ok &= ratio >= targets[b]
            note = f"  [{res['ffcv_note']}]" if b == "ffcv" else ""
            print(f"    {b:5s} {res[b]:9,.0f} img/s  {ratio:5.2f}x torch  (target >= "
                  f"{targets[b]:.1f}x: {'met' if ratio >= targets[b] else 'MISSED'}){note}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0 if ok or not a.check else 1


if __name__ == "__main__":
    sys.exit(main())
