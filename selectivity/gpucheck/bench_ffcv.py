"""Stage `ffcv` of the GPU check: FFCV from the carried bundle, then the trainer through FFCV's
GPU pipeline (docs/gpu.md).

1. The bundle (selectivity.gpucheck.bundle): ``verify`` (files, size, every library resolved in
   the bundle or the system set) and ``bundle_probe.selftest`` under this machine's CPython 3.12.
   On the GPU machine tools/gpu_check.sh runs this stage under ``gpu_bundle/run``, so FFCV
   imports here from the bundle; the dry run (Python 3.11) imports the environment's own FFCV and
   checks the bundle with pyenv's 3.12, building it first if needed (the builder is a no-op when
   the bundle is current).
2. Generated JPEGs at ImageNet-like sizes (300–500 px a side, smooth colour fields with noise,
   quality 90), in an ImageFolder of 1000 classes; the trainer (as tools/train.py builds it, with
   ``--data-backend ffcv --dataset imagefolder --augment rrc_flip``, 224 px, batch 256, fp16,
   tracking off) writes its .beton and trains through the FFCV loader: decode and crop on the
   CPU threads, ``ToDevice`` of uint8 batches, normalization on the GPU.
3. Timed, after a warm-up epoch each (numba compiles FFCV's pipeline on first use): the loader
   alone over an epoch (its own img/s), and training epochs (the trainer's img/s through FFCV).
   The report sets these beside the trainer stage's synthetic-data figure (fp16, off): training
   through FFCV at or near the synthetic figure means the loader keeps up; a loader-alone
   figure below it means training is data-loading bound.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from selectivity.gpucheck import bundle, bundle_probe
from selectivity.gpucheck.bench_trainer import build_trainer
from selectivity.gpucheck.common import ROOT, Bench, write_json

REAL = dict(batch=256, size=224, classes=1000, train_images=5120, val_images=256, min_side=300,
            max_side=500, train_epochs=2)
DRY = dict(batch=8, size=32, classes=4, train_images=16, val_images=8, min_side=40, max_side=64,
           train_epochs=1)
AMP = "fp16"  # compared with the trainer stage's fp16 "off" variant


def _jpeg(args) -> None:
    """One smooth random colour field with mild noise, as a JPEG: about a photo's bytes per pixel."""
    from PIL import Image
    path, h, w, seed = args
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    img = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def make_image_folder(root: str, cfg: dict) -> dict:
    """root/{train,val}/cNNNN/i.jpg, labels cycling over the classes; sizes drawn per image."""
    rng = np.random.default_rng(0)
    jobs = []
    for split, n in (("train", cfg["train_images"]), ("val", cfg["val_images"])):
        for c in range(cfg["classes"]):
            os.makedirs(os.path.join(root, split, f"c{c:04d}"), exist_ok=True)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(cfg["min_side"], cfg["max_side"] + 1, 2))
            jobs.append((os.path.join(root, split, f"c{i % cfg['classes']:04d}", f"{i}.jpg"), h, w, i))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(_jpeg, jobs, chunksize=32))
    sizes = [os.path.getsize(j[0]) for j in jobs]
    return {"images": len(jobs), "seconds": round(time.perf_counter() - t0, 2),
            "mean_kib": float(np.mean(sizes)) / 1024,
            "mean_pixels": float(np.mean([j[1] * j[2] for j in jobs]))}


def check_bundle(bench: Bench, work: str) -> dict:
    out = os.path.join(ROOT, bundle.DEFAULT_OUT)
    rec = {"path": out}
    if bench.dry_run:
        bundle.build(out)  # a no-op when current; here (not on the GPU machine) it may download
    elif not os.path.isfile(os.path.join(out, "MANIFEST.json")):
        rec["problems"] = [f"no {bundle.DEFAULT_OUT}/ in the checkout: build it with `make gpu-bundle` "
                           f"on a machine with the package index and carry it (carry: {bundle.DEFAULT_OUT})"]
        return rec
    rec["problems"] = bundle.verify(out)
    python = bundle.find_python(None if bench.dry_run else sys.executable)
    problems, res = bundle_probe.selftest(out, python, work)
    rec["problems"] += problems
    rec.update(python=python, decode_max_diff=res.get("decode_max_diff"),
               libraries_loaded=len(res.get("loaded", [])))
    return rec


def _trainer(bench: Bench, cfg: dict, data: str, work: str):
    return build_trainer(dict(
        name="ffcv", out_dir=os.path.join(work, "ffcv_runs"), seed=0, device=bench.device.type,
        dataset="imagefolder", data_dir=data, data_backend="ffcv", cache_dir=os.path.join(work, "ffcv_cache"),
        image_size=cfg["size"], augment="rrc_flip", batch_size=cfg["batch"], eval_batch_size=cfg["batch"],
        model="resnet50", channels_last=True, amp=True, amp_dtype=AMP, epochs=1000,
        schedule="constant", lr=0.01, weight_decay=5e-5, track=False,
        log_every_steps=cfg["train_images"] // cfg["batch"], progress=False))


def _loader_epoch(bench: Bench, loader) -> float:
    """Milliseconds for one epoch of the loader alone, every batch on the device."""
    def epoch():
        for images, _ in loader:
            pass
    loader.set_epoch(0)
    return bench.time_ms(epoch)


def run(bench: Bench, json_path: str) -> int:
    cfg = DRY if bench.dry_run else REAL
    work = os.path.dirname(os.path.abspath(json_path))
    record = {"status": "running", "config": dict(cfg, amp=AMP, augment="rrc_flip", model="resnet50")}
    save = lambda: write_json(json_path, record)  # noqa: E731
    try:
        record["bundle"] = check_bundle(bench, work)
        save()
        import ffcv  # on the GPU machine, from the bundle (this stage runs under gpu_bundle/run)
        record["ffcv_file"] = ffcv.__file__
        data = os.path.join(work, "ffcv_data")
        record["images"] = make_image_folder(data, cfg)
        save()
        t0 = time.perf_counter()
        trainer = _trainer(bench, cfg, data, work)
        record["trainer_setup_s"] = round(time.perf_counter() - t0, 2)  # the two .betons written here
        n = len(trainer.train_loader) * cfg["batch"]
        record["loader_warmup_ms"] = _loader_epoch(bench, trainer.train_loader)  # numba compiles
        ms = _loader_epoch(bench, trainer.train_loader)
        record["loader"] = {"images": n, "ms": ms, "images_per_s": n / (ms / 1e3)}
        save()
        trainer.train_epoch()  # warm-up: cuDNN, the allocator
        rounds = [bench.time_ms(trainer.train_epoch) for _ in range(cfg["train_epochs"])]
        record["train"] = {"images": n * len(rounds), "epoch_ms": rounds,
                           "images_per_s": n * len(rounds) / (sum(rounds) / 1e3),
                           "precision": trainer.precision, "skipped_steps": trainer.skipped_steps}
        trainer.log.close()
        bad = record["bundle"]["problems"]
        record["status"] = "ok" if not bad else f"failed: the bundle: {bad[0]}"
    except Exception as e:
        traceback.print_exc()
        record["status"] = f"error: {type(e).__name__}: {e}"
    save()
    return 0 if record["status"] == "ok" else 1
