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
import shutil
import sys
import tempfile
import time


import numpy as np
import torch

TARGETS = {"large": {"ffcv": 1.4, "dali": 1.4}, "small": {"ffcv": 5.0, "dali": 3.0}}


def make_jpegs(root: str, n: int, sizes, classes: int = 10, quality: int = 90, seed: int = 0):
    """n photo-like JPEGs (smooth colour fields + texture + sensor noise) in root/train/<class>/."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, "train", f"c{c:02d}"), exist_ok=True)
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        coarse = rng.integers(0, 256, (max(h // 32, 2), max(w // 32, 2), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        if min(w, h) > 64:
            fine = rng.integers(0, 256, (h // 6, w // 6, 3), dtype=np.uint8)
            img = 0.8 * img + 0.2 * np.asarray(Image.fromarray(fine).resize((w, h),
                                                                             Image.BILINEAR))
        img += rng.normal(0, 6, img.shape)
        out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        out.save(os.path.join(root, "train", f"c{i % classes:02d}", f"{i:06d}.jpg"),
                 quality=quality)


def throughput(loader, seconds: float, max_epochs: int = 50) -> float:
    loader.set_epoch(0)
    for _ in loader:  # warm-up epoch
        pass
    n, epoch, t0 = 0, 1, time.perf_counter()
    while True:
        loader.set_epoch(epoch)
        for _, labels in loader:
            n += labels.shape[0]
        epoch += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds or epoch > max_epochs:
            return n / elapsed


def run_workload(name: str, root: str, size: int, batch: int, workers: int, seconds: float,
                 ffcv_mode: str) -> dict:
    from selectivity.pipelines.dali import DALILoader
    from selectivity.pipelines.datasets import ImageFolderDataset
    from selectivity.pipelines.ffcv import FFCVLoader
    from selectivity.pipelines.ffcv_write import write_beton
    from selectivity.pipelines.torch_loader import TorchLoader

    cpu = torch.device("cpu")
    ds = ImageFolderDataset(root, "train")
    common = dict(batch_size=batch, train=True, augment="rrc_flip", image_size=size, device=cpu)
    out = {}
    loader = TorchLoader(ds, workers=workers, **common)
    out["torch"] = throughput(loader, seconds)
    loader.close()

    beton = os.path.join(root, f"{name}.beton")
    s = write_beton(ds, beton, mode=ffcv_mode, jpeg_quality=90, workers=workers, progress=False)
    loader = FFCVLoader(beton, classes=ds.classes, mean=ds.mean, std=ds.std, threads=workers,
                        **common)
    out["ffcv"] = throughput(loader, seconds)
    loader.close()
    out["ffcv_note"] = f"{s['jpeg_images']} jpeg + {s['raw_images']} raw in the .beton"

    files, labels = [p for p, _ in ds.samples], [int(y) for y in ds.labels]
    loader = DALILoader(files, labels, classes=ds.classes, mean=ds.mean, std=ds.std,
                        threads=workers, **common)
    out["dali"] = throughput(loader, seconds)
    loader.close()
    return out


def report(title: str, res: dict, targets: dict) -> bool:
    ok = True
    print(title)
    print(f"    torch {res['torch']:9,.0f} img/s")
    for b in ("ffcv", "dali"):
        ratio = res[b] / res["torch"]
        hit = ratio >= targets[b]
        ok &= hit
        note = f"  [{res['ffcv_note']}]" if b == "ffcv" else ""
        print(f"    {b:5s} {res[b]:9,.0f} img/s  {ratio:5.2f}x torch  "
              f"(target >= {targets[b]:.1f}x: {'met' if hit else 'MISSED'}){note}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="workers/threads for every backend")
    p.add_argument("--large", type=int, default=1000, help="ImageNet-like JPEGs")
    p.add_argument("--small", type=int, default=10000, help="32×32 JPEGs")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per backend (min)")
    p.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    p.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    a = p.parse_args(argv)

    import warnings
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # the main process only stacks/normalizes; workers do the decoding
    work = a.dir or tempfile.mkdtemp(prefix="bench_loader_")
    t0 = time.perf_counter()
    try:
        print(f"loader benchmark: {os.cpu_count()} CPU cores, {a.workers} workers/threads per "
              f"backend, loader only (normalized float32 NCHW batches on the CPU)", flush=True)
        large, small = os.path.join(work, "large"), os.path.join(work, "small")
        if a.large:
            make_jpegs(large, a.large, [(500, 375), (500, 375), (375, 500), (500, 333)])
            res = run_workload("large", large, 224, 64, a.workers, a.seconds, "jpg")
            ok_l = report(f"(1) {a.large} JPEGs ~500x375 q90, random-resized-crop 224 + flip, "
                          f"batch 64", res, TARGETS["large"])
        else:
            ok_l = True
        if a.small:
            make_jpegs(small, a.small, [(32, 32)], seed=1)
            res = run_workload("small", small, 32, 256, a.workers, a.seconds, "smart")
            ok_s = report(f"(2) {a.small} JPEGs 32x32 q90, random-resized-crop 32 + flip, "
                          f"batch 256", res, TARGETS["small"])
        else:
            ok_s = True
        print(f"total {time.perf_counter() - t0:.0f} s")
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if (ok_l and ok_s) or not a.check else 1


if __name__ == "__main__":
    sys.exit(main())
