"""Datasets and the torch loader backend against the loader contract."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from selectivity.pipelines.contract import shard_indices
from selectivity.pipelines.datasets import DataError, ImageFolderDataset, build_dataset, cifar10
from selectivity.pipelines.torch_loader import TorchLoader


def test_digits_fixed_stratified_split():
    tr, va = build_dataset("digits", "train"), build_dataset("digits", "val")
    assert (len(tr), len(va)) == (1437, 360)
    assert tr.images.shape[1:] == (32, 32, 3) and tr.images.dtype == np.uint8
    assert np.bincount(va.labels).min() >= 35  # stratified: every class ~36 times
    again = build_dataset("digits", "val")
    assert np.array_equal(again.images, va.images) and np.array_equal(again.labels, va.labels)


def test_synthetic_any_size_and_classes():
    ds = build_dataset("synthetic", "train", image_size=48, synthetic_classes=7,
                       synthetic_size=21)
    img, label = ds[9]
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8 and label == 9 % 7
    assert np.array_equal(ds[9][0], img)  # procedural, reproducible
    assert not np.array_equal(ds[2][0], ds[9][0])


def make_imagefolder(root, classes=("a", "b"), per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.jpg")
    return root


def test_imagefolder(tmp_path):
    make_imagefolder(tmp_path)
    ds = ImageFolderDataset(str(tmp_path), "val")
    assert ds.classes == ["a", "b"] and len(ds) == 6 and list(ds.labels) == [0, 0, 0, 1, 1, 1]
    img, _ = ds[0]
    assert img.shape == (30, 40, 3)
    (tmp_path / "val" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(str(tmp_path), "val")
    with pytest.raises(DataError, match="cannot decode image .*bad.jpg"):
        ds[[p for p, _ in ds.samples].index(str(tmp_path / "val" / "a" / "bad.jpg"))]


def write_cifar(root, labels):
    root.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = np.zeros((len(labels), 3072), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({"data": data, "labels": list(labels)}, f)


def test_cifar10_pickles_and_label_out_of_range(tmp_path):
    write_cifar(tmp_path / "ok" / "cifar-10-batches-py", [0, 9, 3])
    ds = cifar10(str(tmp_path / "ok"), "train")
    assert len(ds) == 15 and ds.images.shape[1:] == (32, 32, 3)
    write_cifar(tmp_path / "bad", [0, 10])
    with pytest.raises(DataError, match=r"label 10 out of range \[0, 10\)"):
        cifar10(str(tmp_path / "bad"), "val")


def test_loader_contract_and_epoch_determinism():
    ds = build_dataset("digits", "train")
    ld = TorchLoader(ds, batch_size=64, train=True, augment="crop_flip", image_size=32,
                     device=torch.device("cpu"), seed=3)
    assert len(ld) == 1437 // 64
    ld.set_epoch(0)
    batches = list(ld)
    x, y = batches[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (64, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert len(batches) == len(ld)
    ld.set_epoch(0)
    x2, y2 = next(iter(ld))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same epoch → same batches
    ld.set_epoch(1)
    assert not torch.equal(next(iter(ld))[1], y)  # new epoch → new order
    ld.set_epoch(0, skip_batches=2)  # resume mid-epoch: continues at batch 2
    assert len(ld) == len(batches) - 2 and torch.equal(next(iter(ld))[0], batches[2][0])


def test_shards_disjoint_and_cover():
    n, world = 103, 2
    for pad, shuffle in ((True, True), (False, False)):
        shards = [shard_indices(n, r, world, shuffle=shuffle, seed=1, epoch=4, pad=pad)
                  for r in range(world)]
        if pad:
            assert len(shards[0]) == len(shards[1]) == 52
        both = np.concatenate(shards)
        assert set(both.tolist()) == set(range(n))
        if not pad:
            assert len(both) == n  # evaluation: every image exactly once


def test_digits_hard_fixed_generated_and_harder_than_digits():
    """digits_hard: generated in memory from the bundled digits, the same every time, val sources
    disjoint from train, and far from the ceiling for a linear probe on which digits is easy."""
    from sklearn.linear_model import LogisticRegression

    from selectivity.pipelines.datasets import DIGITS_HARD_COPIES

    tr, va = build_dataset("digits_hard", "train", image_size=16), build_dataset("digits_hard",
                                                                                 "val", image_size=16)
    assert (len(tr), len(va)) == (1437 * DIGITS_HARD_COPIES, 360 * DIGITS_HARD_COPIES)
    assert tr.images.shape[1:] == (16, 16, 3) and tr.images.dtype == np.uint8
    assert np.bincount(va.labels, minlength=10).min() >= 30 * DIGITS_HARD_COPIES
    again = build_dataset("digits_hard", "val", image_size=16)
    assert np.array_equal(again.images, va.images) and np.array_equal(again.labels, va.labels)
    assert not np.array_equal(tr.images[:len(va)], va.images)

    def probe(name):
        a, b = build_dataset(name, "train", image_size=16), build_dataset(name, "val", image_size=16)
        x = lambda d: d.images.reshape(len(d), -1).astype(np.float32) / 255.0  # noqa: E731
        clf = LogisticRegression(max_iter=300).fit(x(a), a.labels)
        return clf.score(x(b), b.labels)

    easy, hard = probe("digits"), probe("digits_hard")
    assert easy > 0.9
    assert hard < easy - 0.25, (easy, hard)  # measured gap is far larger; margin for sklearn drift
