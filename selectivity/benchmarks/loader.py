"""Loader throughput, torch vs ffcv vs dali, side by side on the same generated files (CPU,
loader only; tools/bench_loader.py). ``make_jpegs`` also feeds the GPU check's FFCV stage.
"""
from __future__ import annotations

import os
import shutil
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


WORKLOADS = (  # name, JPEG sizes, seed, crop side, batch, .beton mode, title
    ("large", [(500, 375), (500, 375), (375, 500), (500, 333)], 0, 224, 64, "jpg",
     "JPEGs ~500x375 q90, random-resized-crop 224 + flip, batch 64"),
    ("small", [(32, 32)], 1, 32, 256, "smart",
     "JPEGs 32x32 q90, random-resized-crop 32 + flip, batch 256"),
)


def run(counts: dict, workers: int, seconds: float, work_dir: str | None = None):
    """Yields (title, {backend: img/s, "ffcv_note"}, targets) per workload with a count > 0.
    Files go to ``work_dir`` (default: a temporary directory, removed at the end)."""
    torch.set_num_threads(1)  # the main process only stacks/normalizes; workers do the decoding
    work = work_dir or tempfile.mkdtemp(prefix="bench_loader_")
    try:
        for i, (name, sizes, seed, side, batch, mode, title) in enumerate(WORKLOADS):
            if not counts.get(name):
                continue
            root = os.path.join(work, name)
            make_jpegs(root, counts[name], sizes, seed=seed)
            res = run_workload(name, root, side, batch, workers, seconds, mode)
            yield f"({i + 1}) {counts[name]} {title}", res, TARGETS[name]
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
