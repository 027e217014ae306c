"""The ffcv backend: safe .beton building (tools/build_ffcv.py) and the FFCV loader contract."""
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from selectivity.pipelines import build_loader
from selectivity.pipelines.datasets import ArrayDataset, DataError, build_dataset
from selectivity.train.config import Config, data_spec

CPU = torch.device("cpu")


def make_image_folder(root, classes=3, per_class=5, sizes=((40, 52), (64, 48), (90, 70)),
                      splits=("train", "val"), seed=0):
    """Small smooth colour JPEGs in root/<split>/c<k>/<i>.jpg (sizes cycle)."""
    rng = np.random.default_rng(seed)
    k = 0
    for split in splits:
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
            for i in range(per_class):
                h, w = sizes[k % len(sizes)]
                k += 1
                coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
                img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
                img.save(os.path.join(root, split, f"c{c}", f"{i}.jpg"), quality=95)
    return str(root)


def add_bad_images(root):
    corrupt = os.path.join(root, "train", "c0", "corrupt.jpg")
    with open(corrupt, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0" + b"not a jpeg at all" * 20)
    good = os.path.join(root, "train", "c1", "0.jpg")
    truncated = os.path.join(root, "train", "c1", "truncated.jpg")
    with open(good, "rb") as f:
        data = f.read()
    with open(truncated, "wb") as f:
        f.write(data[:len(data) // 2])
    return corrupt, truncated


def beton_count_and_labels(path):
    from ffcv.reader import Reader
    from selectivity.pipelines.ffcv_write import _column
    r = Reader(path)
    return int(r.num_samples), np.asarray(_column(r, "label"))


def leftovers(d):
    return [f for f in os.listdir(d) if ".tmp" in f or f.endswith(".err")]


# ---- building -----------------------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_build_reports_and_skips_corrupt_and_truncated(tmp_path, capsys):
    from selectivity.tools.build_ffcv import main
    root = make_image_folder(tmp_path / "data")
    corrupt, truncated = add_bad_images(root)
    out = tmp_path / "out" / "train.beton"
    s = main(["--dataset", "imagefolder", "--data-dir", root, "--split", "train", "-o", str(out),
              "--workers", "2", "--mode", "jpg", "--no-progress"])
    err = capsys.readouterr().err
    assert corrupt in err and truncated in err  # both reported by path
    assert sorted(p for p, _ in s["skipped"]) == sorted([corrupt, truncated])
    assert s["images"] == 15 and s["classes"] == 3 and s["bytes"] == os.path.getsize(out)
    n, labels = beton_count_and_labels(str(out))
    assert n == 15  # the count in the file is the count written
    ds = build_dataset("imagefolder", "train", root)
    good = [i for i, (p, _) in enumerate(ds.samples) if p not in (corrupt, truncated)]
    assert np.array_equal(labels, ds.labels[good])
    assert not leftovers(out.parent)


@pytest.mark.timeout(120)
def test_build_strict_fails_before_writing(tmp_path, capsys):
    from selectivity.cli import run_cli
    from selectivity.tools.build_ffcv import main
    root = make_image_folder(tmp_path / "data", per_class=2)
    add_bad_images(root)
    out = tmp_path / "out" / "train.beton"
    with pytest.raises(SystemExit) as e:  # what the command line does: exit 2, one line
        run_cli(main, ["--dataset", "imagefolder", "--data-dir", root, "-o", str(out),
                       "--workers", "2", "--strict", "--no-progress"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 2 unreadable image(s)")
    assert "--strict" in lines[0]
    assert not out.exists() and (not out.parent.exists() or not os.listdir(out.parent))


class _FailsInWorkers(ArrayDataset):
    """Fine in the main process (so the up-front check passes), raises in a writer worker."""
    main_pid = os.getpid()

    def __getitem__(self, i):
        if i == 7 and os.getpid() != self.main_pid:
            raise OSError("simulated read error")
        return super().__getitem__(i)


@pytest.mark.timeout(60)
def test_failing_writer_worker_never_hangs(tmp_path):
    """FFCV's own writer waits forever for a worker that raised; ours reports it and cleans up."""
    from selectivity.pipelines.ffcv_write import write_beton
    rng = np.random.default_rng(0)
    ds = _FailsInWorkers(rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.arange(40) % 4,
                         ["a", "b", "c", "d"], source="fails")
    out = tmp_path / "x.beton"
    with pytest.raises(DataError, match=r"writer worker failed .*fails\[7\].*simulated read error"):
        write_beton(ds, str(out), mode="raw", workers=2, progress=False, chunk_size=4)
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.timeout(120)
def test_build_cli_digits_summary_and_bad_input(tmp_path, capsys):
    from selectivity.cli import run_cli
    from selectivity.tools.build_ffcv import main
    out = tmp_path / "digits-val.beton"
    s = main(["--dataset", "digits", "--split", "val", "-o", str(out), "--mode", "raw",
              "--workers", "1", "--no-progress"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"wrote {out}: 360 images, 10 classes") and " s" in line
    assert s["raw_images"] == 360 and beton_count_and_labels(str(out))[0] == 360
    with pytest.raises(SystemExit) as e:  # bad input: one line, exit 2
        run_cli(main, ["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nope"),
                       "-o", str(tmp_path / "y.beton")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data directory not found")


@pytest.mark.timeout(120)
def test_build_cifar10_and_synthetic(tmp_path, capsys):
    import pickle
    from selectivity.tools.build_ffcv import main
    rng = np.random.default_rng(0)
    cifar = tmp_path / "cifar-10-batches-py"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 6).tolist()}, f)
    for args, n in ((["--dataset", "cifar10", "--data-dir", str(tmp_path), "--split", "val"], 6),
                    (["--dataset", "synthetic", "--synthetic-size", "50", "--image-size", "16"],
                     50)):
        out = str(tmp_path / f"{args[1]}.beton")
        s = main([*args, "-o", out, "--workers", "2", "--no-progress"])
        ds = build_dataset(args[1], "val" if "val" in args else "train", str(tmp_path), 16,
                           10, 50)
        count, labels = beton_count_and_labels(out)
        assert s["images"] == count == n and np.array_equal(labels, ds.labels)
        assert s["raw_images"] == n  # smart mode: small images are stored raw
    assert "wrote" in capsys.readouterr().out


# ---- loading ------------------------------------------------------------------------------------
def ffcv_cfg(tmp_path, **kw):
    kw.setdefault("batch_size", 64)
    kw.setdefault("eval_batch_size", 100)
    return Config(data_backend="ffcv", cache_dir=str(tmp_path / "cache"), workers=1, **kw)


def ffcv_threads():
    return [t for t in threading.enumerate() if type(t).__name__ == "EpochIterator"]


@pytest.mark.timeout(150)
def test_ffcv_loader_contract_on_digits(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    cfg = ffcv_cfg(tmp_path)
    train = build_loader(data_spec(cfg), "train", CPU)
    val = build_loader(data_spec(cfg), "val", CPU)
    try:
        # the .beton was built automatically into the cache dir, named by dataset/split/size
        names = sorted(f for f in os.listdir(tmp_path / "cache") if f.endswith(".beton"))
        assert [n.rsplit("-", 1)[0] for n in names] == ["digits-train-32", "digits-val-32"]
        assert torch.get_num_threads() == 2  # ffcv's import and Loader leave torch's threads alone
        assert len(train) == 1437 // 64 and train.num_samples == 22 * 64
        assert len(val) == 4 and val.num_samples == 360 and val.num_classes == 10
        assert len(train.dataset) == 1437 and len(train.labels) == 1437

        def epoch(loader, e, skip=0):
            loader.set_epoch(e, skip_batches=skip)
            xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
            return torch.cat(xs), torch.cat(ys)

        x, y = epoch(train, 1)
        assert x.shape == (22 * 64, 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)
        train.set_epoch(1)
        assert np.array_equal(train.labels[train.indices()], y.numpy())  # indices() = the order
        assert torch.equal(epoch(train, 1)[1], y)  # the order is a function of (seed, epoch)
        assert not torch.equal(epoch(train, 2)[1], y)
        _, y_skip = epoch(train, 1, skip=5)  # cheap mid-epoch start: the rest of the same order
        assert torch.equal(y_skip, y[5 * 64:]) and len(train) == 22 - 5
        # validation: the torch backend's pixels exactly (digits are 32×32 raw: pass-through)
        xv, yv = epoch(val, 0)
        tv = build_loader(data_spec(Config(eval_batch_size=100)), "val", CPU)
        tv.set_epoch(0)
        xt, yt = zip(*list(tv))
        assert torch.equal(yv, torch.cat(yt))
        assert (xv - torch.cat(xt)).abs().max() < 1e-5
        assert np.array_equal(val.indices(), np.arange(360))
        # leaving an epoch early does not leak FFCV's epoch thread (its issues #345, #393)
        train.set_epoch(3)
        for i, _ in enumerate(train):
            if i == 2:
                break
        assert not [t for t in ffcv_threads() if t.is_alive()]
        assert torch.get_num_threads() == 2
    finally:
        train.close()
        val.close()
        torch.set_num_threads(threads)
    assert not [t for t in ffcv_threads() if t.is_alive()]


@pytest.mark.timeout(120)
def test_ffcv_crop_flip_augment_is_a_padded_shift(tmp_path):
    """augment crop_flip = the torch backend's: each image shifted by at most 2 px (size // 8),
    zero-filled, and mirrored half of the time."""
    from selectivity.pipelines.ffcv import FFCVLoader
    from selectivity.pipelines.ffcv_write import write_beton
    rng = np.random.default_rng(1)
    imgs = rng.integers(1, 256, (64, 16, 16, 3), dtype=np.uint8)  # no zeros: fill is visible
    ds = ArrayDataset(imgs, np.arange(64) % 4, list("abcd"), source="shift")
    path = str(tmp_path / "s.beton")
    write_beton(ds, path, mode="raw", workers=1, progress=False)
    ld = FFCVLoader(path, classes=ds.classes, mean=(0, 0, 0), std=(1 / 255,) * 3, batch_size=16,
                    train=True, augment="crop_flip", image_size=16, device=CPU, threads=1)
    try:
        ld.set_epoch(0)
        order = ld.indices()
        out = torch.cat([x.clone() for x, _ in ld]).permute(0, 2, 3, 1).round().to(torch.uint8)
    finally:
        ld.close()
    shifts = set()
    for k, i in enumerate(order):
        padded = np.pad(imgs[i], ((2, 2), (2, 2), (0, 0)))
        hits = [(dy, dx, m) for dy in range(5) for dx in range(5) for m in (1, -1)
                if np.array_equal(padded[dy:dy + 16, dx:dx + 16][:, ::m], out[k].numpy())]
        assert hits, f"image {k} is not a padded shift of sample {i}"
        shifts.update(hits)
    assert len(shifts) > 5 and {m for *_, m in shifts} == {1, -1}  # offsets and flips vary


@pytest.mark.timeout(150)
def test_ffcv_rrc_flip_and_quasi_random_on_imagefolder(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=8)
    cfg = ffcv_cfg(tmp_path, dataset="imagefolder", data_dir=root, image_size=24,
                   augment="rrc_flip", batch_size=8, ffcv_order="quasi_random", os_cache=False)
    ld = build_loader(data_spec(cfg), "train", CPU)
    try:
        assert len(ld) == 24 // 8
        for e in range(2):
            ld.set_epoch(e)
            order = ld.indices()
            assert sorted(order.tolist()) == list(range(24))  # a permutation each epoch
            ys = torch.cat([y for _, y in ld])
            assert np.array_equal(ld.labels[order], ys.numpy())
        x, _ = next(iter(ld))
        assert x.shape == (8, 3, 24, 24) and torch.isfinite(x).all()
    finally:
        ld.close()
    with pytest.raises(DataError, match="unknown ffcv_order"):
        build_loader(data_spec(ffcv_cfg(tmp_path, ffcv_order="sorted")), "val", CPU)


@pytest.mark.timeout(180)
def test_torchrun_two_processes_ffcv(tmp_path):
    """2 epochs on digits, DDP on the CPU, data_backend ffcv (beton built on first use)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "tools/train.py", "-c", "configs/demo.yaml", "--epochs", "2", "--data-backend", "ffcv",
         "--name", "ffcv", "--out-dir", str(tmp_path / "runs"),
         "--cache-dir", str(tmp_path / "cache"), "--progress", "false"],
        cwd=ROOT, capture_output=True, text=True, timeout=170,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "runs" / "ffcv" / "metrics.jsonl") as f:
        vals = [r for r in map(json.loads, f) if r["split"] == "val"]
    # every epoch end (plus the demo's evaluations inside epoch 1, at fractional epochs)
    assert [r["epoch"] for r in vals if float(r["epoch"]).is_integer()] == [0, 1, 2]
    assert vals[-1]["images"] == 360  # val shards: disjoint, every image once
    assert vals[-1]["step"] == 2 * (((1437 + 1) // 2) // 64)  # FFCV's DDP: ceil(n/2) per rank
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".beton")]) == 2
