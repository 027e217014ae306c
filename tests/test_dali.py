"""The dali backend: CPU pipelines (device_id=None) behind the loader contract."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from selectivity.pipelines import build_loader
from selectivity.pipelines.dali import DALILoader
from selectivity.train.config import Config, data_spec

CPU = torch.device("cpu")


def dali_cfg(tmp_path, **kw):
    kw.setdefault("batch_size", 64)
    kw.setdefault("eval_batch_size", 100)
    return Config(data_backend="dali", cache_dir=str(tmp_path / "cache"), workers=1, **kw)


def unique_pngs(root, n=37, size=12, seed=0):
    """n PNGs whose label is their index (so a batch tells which files it holds)."""
    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    files, imgs = [], []
    for i in range(n):
        img = rng.integers(1, 256, (size, size, 3), dtype=np.uint8)
        path = os.path.join(root, f"{i:03d}.png")
        Image.fromarray(img).save(path)
        files.append(path)
        imgs.append(img)
    return files, list(range(n)), imgs


def loader(files, labels, **kw):
    args = dict(classes=[str(i) for i in range(len(files))], mean=(0, 0, 0), std=(1 / 255,) * 3,
                batch_size=4, train=True, augment="none", image_size=12, device=CPU, threads=1)
    args.update(kw)
    return DALILoader(files, labels, **args)


@pytest.mark.timeout(120)
def test_dali_loader_contract_on_digits(tmp_path):
    cfg = dali_cfg(tmp_path)
    train = build_loader(data_spec(cfg), "train", CPU)
    val = build_loader(data_spec(cfg), "val", CPU)
    try:
        assert len(train) == 1437 // 64 and train.num_samples == 22 * 64
        assert len(val) == 4 and val.num_samples == 360 and val.num_classes == 10
        assert len(train.dataset) == 1437 and np.array_equal(val.indices(), np.arange(360))
        # in-memory digits were exported once, losslessly, to a PNG tree in the cache dir
        exported = sorted(d for d in os.listdir(tmp_path / "cache") if not d.endswith(".lock"))
        assert [d.rsplit("-", 1)[0] for d in exported] == ["digits-train-32", "digits-val-32"]
        index = tmp_path / "cache" / exported[1] / "index.json"
        stamp = index.stat().st_mtime_ns
        for e in range(2):
            train.set_epoch(e)
            batches = [(x.shape, x.dtype, x.is_contiguous(memory_format=torch.channels_last),
                        y.dtype) for x, y in train]
            assert len(batches) == 22
            assert set(batches) == {((64, 3, 32, 32), torch.float32, True, torch.int64)}
        # validation: exactly the torch backend's pixels and labels, in the same order
        val.set_epoch(0)
        xv, yv = zip(*[(x.clone(), y.clone()) for x, y in val])
        tv = build_loader(data_spec(Config(eval_batch_size=100)), "val", CPU)
        tv.set_epoch(0)
        xt, yt = zip(*list(tv))
        assert torch.equal(torch.cat(yv), torch.cat(yt))
        assert (torch.cat(xv) - torch.cat(xt)).abs().max() < 1e-5
        with pytest.raises(NotImplementedError, match="mid-way"):
            train.set_epoch(1, skip_batches=3)
    finally:
        train.close()
        val.close()
    build_loader(data_spec(cfg), "val", CPU).close()  # the export is reused, not redone
    assert index.stat().st_mtime_ns == stamp


@pytest.mark.timeout(120)
def test_dali_shards_disjoint_and_reshuffled(tmp_path):
    files, labels, _ = unique_pngs(str(tmp_path / "png"))
    for train in (True, False):
        ranks = [loader(files, labels, train=train, rank=r, world_size=2) for r in range(2)]
        try:
            orders = []
            for e in range(3):
                seen = []
                for ld in ranks:
                    ld.set_epoch(e)
                    ys = [int(v) for _, y in ld for v in y]
                    assert len(ys) == ld.num_samples and -(-len(ys) // 4) == len(ld)
                    seen.append(ys)
                assert not set(seen[0]) & set(seen[1])  # disjoint shards
                if train:  # 37 images, 2 ranks: floor(37/2) // 4 = 4 batches on each
                    assert [len(s) for s in seen] == [16, 16]
                else:  # every image once, no padding; shards differ by at most one
                    assert sorted(seen[0] + seen[1]) == list(range(37))
                    assert seen[0] == ranks[0].indices().tolist()
                orders.append(seen[0])
            assert (orders[0] != orders[1]) == train  # reshuffled every epoch when training
        finally:
            for ld in ranks:
                ld.close()


@pytest.mark.timeout(120)
def test_dali_crop_flip_is_a_padded_shift_and_leaving_early_is_safe(tmp_path):
    files, labels, imgs = unique_pngs(str(tmp_path / "png"), n=24, size=16)
    ld = loader(files, labels, augment="crop_flip", image_size=16, batch_size=8)
    try:
        shifts = set()
        for e in range(2):
            ld.set_epoch(e)
            for x, y in ld:
                out = x.permute(0, 2, 3, 1).round().to(torch.uint8).numpy()
                for k, i in enumerate(y.tolist()):
                    padded = np.pad(imgs[i], ((2, 2), (2, 2), (0, 0)))
                    hits = [(dy, dx, m) for dy in range(5) for dx in range(5) for m in (1, -1)
                            if np.array_equal(padded[dy:dy + 16, dx:dx + 16][:, ::m], out[k])]
                    assert hits, f"image of sample {i} is not a padded shift"
                    shifts.update(hits)
        assert len(shifts) > 5 and {m for *_, m in shifts} == {1, -1}
        ld.set_epoch(2)
        next(iter(ld))  # leave an epoch after one batch ...
        ld.set_epoch(3)
        assert sum(len(y) for _, y in ld) == 24  # ... the next epoch is still whole
    finally:
        ld.close()


@pytest.mark.timeout(120)
def test_dali_rrc_flip_on_jpegs(tmp_path):
    from test_ffcv import make_image_folder
    root = make_image_folder(tmp_path / "data", per_class=8)
    ld = build_loader(data_spec(dali_cfg(tmp_path, dataset="imagefolder", data_dir=root, image_size=24,
                               augment="rrc_flip", batch_size=8)), "train", CPU)
    try:
        ld.set_epoch(0)
        xs = [x.clone() for x, _ in ld]
        assert len(xs) == 3 and all(x.shape == (8, 3, 24, 24) for x in xs)
        assert all(torch.isfinite(x).all() for x in xs)
        assert ld.labels.tolist() == sorted(ld.labels.tolist())  # the ImageFolder's own labels
    finally:
        ld.close()


@pytest.mark.timeout(180)
def test_torchrun_two_processes_dali(tmp_path):
    """2 epochs on digits, DDP on the CPU, data_backend dali (PNG export built on first use)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "tools/train.py", "-c", "configs/demo.yaml", "--epochs", "2", "--data-backend", "dali",
         "--name", "dali", "--out-dir", str(tmp_path / "runs"),
         "--cache-dir", str(tmp_path / "cache"), "--progress", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "runs" / "dali" / "metrics.jsonl") as f:
        vals = [r for r in map(json.loads, f) if r["split"] == "val"]
    # every epoch end (plus the demo's evaluations inside epoch 1, at fractional epochs)
    assert [r["epoch"] for r in vals if float(r["epoch"]).is_integer()] == [0, 1, 2]
    assert vals[-1]["images"] == 360  # val shards: disjoint, every image once
    assert vals[-1]["step"] == 2 * ((1437 // 2) // 64)  # the same step count on both ranks


BAD_IMAGES_PROBE = """
import torch
from selectivity.train.config import Config, data_spec
from selectivity.pipelines import build_loader
cfg = Config(dataset="imagefolder", data_dir={data!r}, data_backend="dali", cache_dir={cache!r},
             workers=1, batch_size=4, eval_batch_size=4, image_size=16, augment="crop_flip")
for split in ("train", "val"):
    ld = build_loader(data_spec(cfg), split, torch.device("cpu"))
    ld.set_epoch(0)
    print(split, len(ld.dataset), sum(len(y) for _, y in ld), flush=True)
    ld.close()
"""


@pytest.mark.timeout(300)
def test_dali_reports_and_skips_bad_images_and_checks_once(tmp_path):
    """Random bytes (with and without a JPEG header), a truncated and a zero-byte JPEG, and a GIF
    named .jpg (PIL reads it, DALI does not): each is reported by path and left out; the pipeline never sees them (in a subprocess: before the check
    DALI crashed the process or raised mid-epoch). The check is cached: a second build re-checks
    nothing."""
    from test_ffcv import make_image_folder
    root = make_image_folder(tmp_path / "data", classes=2, per_class=6)
    rng = np.random.default_rng(0)
    c0, c1 = os.path.join(root, "train", "c0"), os.path.join(root, "val", "c1")
    with open(os.path.join(c0, "0.jpg"), "rb") as f:
        good = f.read()
    bad = {os.path.join(c0, "random.jpg"): rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
           os.path.join(c0, "header.jpg"): b"\xff\xd8\xff\xe0" + rng.integers(
               0, 256, 3000, dtype=np.uint8).tobytes(),
           os.path.join(c0, "truncated.jpg"): good[: len(good) // 2],
           os.path.join(c1, "empty.jpg"): b""}
    for path, data in bad.items():
        with open(path, "wb") as f:
            f.write(data)
    gif = os.path.join(c0, "animated.jpg")
    Image.new("P", (20, 20)).save(gif, "GIF", save_all=True,
                                  append_images=[Image.new("P", (20, 20), 3)])
    bad[gif] = None
    script = BAD_IMAGES_PROBE.format(root=ROOT, data=root, cache=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
            for _ in range(2)]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        # train: 12 good of 16, in whole batches of 4; val: 12 good of 13, all read
        assert proc.stdout.split("\n")[:2] == ["train 12 12", "val 12 12"], proc.stdout
        for path in bad:
            assert f"dali: skipped unreadable image {path}: " in proc.stderr, proc.stderr[-3000:]
    assert "dali: checking" in runs[0].stderr
    assert "dali: checking" not in runs[1].stderr  # the verdict came from the cache
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".bad.json")]) == 2
