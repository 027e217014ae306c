"""torch, ffcv and dali feed the model the same validation images (centre crop, deterministic).

Tolerances, in normalized units (1.0 = one standard deviation, ≈ 57 grey levels at std 0.225):
- digits (32×32 arrays; ffcv stores raw pixels, dali reads lossless PNG): identical (< 1e-5);
- JPEG ImageFolder, varying sizes, centre crop 0.875 resized to 32:
  dali decodes the same files and resizes with antialiasing like PIL: mean |diff| < 0.01;
  ffcv re-encodes images over 64×64 px as JPEG q90 in the .beton ('smart' mode) and resizes with
  OpenCV's INTER_AREA (PIL: antialiased bilinear): mean |diff| < 0.05 over the split, < 0.1 for
  every image (measured: ≈ 0.022 mean; ≈ 0.009 with raw pixels, the resampling alone).
"""
import numpy as np
import pytest
import torch

from selectivity.pipelines import build_loader
from selectivity.train.config import Config, data_spec
from test_ffcv import make_image_folder

CPU = torch.device("cpu")


def val_batches(backend, tmp_path, **kw):
    cfg = Config(data_backend=backend, cache_dir=str(tmp_path / "cache"), workers=1,
                 eval_batch_size=16, **kw)
    loader = build_loader(data_spec(cfg), "val", CPU)
    try:
        loader.set_epoch(0)
        xs, ys = zip(*[(x.clone(), y.clone()) for x, y in loader])
        assert len(xs) == len(loader)
    finally:
        loader.close()
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.timeout(150)
def test_validation_images_agree_across_backends(tmp_path):
    # digits: in-memory 32×32 arrays → identical everywhere
    ref_x, ref_y = val_batches("torch", tmp_path)
    for backend in ("ffcv", "dali"):
        x, y = val_batches(backend, tmp_path)
        assert torch.equal(y, ref_y), backend
        assert (x - ref_x).abs().max() < 1e-5, backend

    # JPEGs of several sizes (some above 64×64 px, some below): centre crop + resize
    sizes = ((40, 52), (64, 48), (90, 70), (75, 100), (33, 33), (120, 96))
    root = make_image_folder(tmp_path / "data", classes=3, per_class=6, sizes=sizes)
    kw = dict(dataset="imagefolder", data_dir=root, image_size=32)
    ref_x, ref_y = val_batches("torch", tmp_path, **kw)
    assert ref_x.shape == (18, 3, 32, 32)
    for backend, mean_tol, image_tol in (("dali", 0.01, 0.02), ("ffcv", 0.05, 0.1)):
        x, y = val_batches(backend, tmp_path, **kw)
        assert torch.equal(y, ref_y), backend
        diff = (x - ref_x).abs()
        per_image = diff.mean(dim=(1, 2, 3))
        assert diff.mean() < mean_tol, (backend, float(diff.mean()))
        assert per_image.max() < image_tol, (backend, per_image.tolist())
        # far from chance: a different image differs by ~1 normalized unit
        assert (x - ref_x.roll(1, 0)).abs().mean() > 10 * mean_tol


@pytest.mark.timeout(60)
def test_unknown_backend_is_one_line_error():
    from selectivity.pipelines.datasets import DataError
    cfg = Config()
    cfg.data_backend = "tf.data"
    with pytest.raises(DataError, match="unknown data_backend"):
        build_loader(data_spec(cfg), "val", CPU)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["torch", "ffcv", "dali"])
@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_carry_the_dataset_indices_of_their_images(tmp_path, backend, split):
    """batch.indices name the images: their labels are the dataset's labels at those indices, a
    validation epoch holds every image once, a training epoch never repeats one."""
    cfg = Config(data_backend=backend, cache_dir=str(tmp_path / "cache"), workers=1,
                 batch_size=64, eval_batch_size=50)
    loader = build_loader(data_spec(cfg), split, CPU)
    try:
        loader.set_epoch(1)
        seen = []
        for batch in loader:
            images, labels = batch
            assert batch.indices.dtype == torch.int64 and len(batch.indices) == len(labels)
            assert torch.equal(torch.as_tensor(np.array(loader.labels))[batch.indices], labels), backend
            seen.append(batch.indices)
    finally:
        loader.close()
    seen = torch.cat(seen)
    assert len(set(seen.tolist())) == len(seen)
    if split == "val":
        assert sorted(seen.tolist()) == list(range(len(loader.labels)))
    else:
        assert len(seen) == len(loader.labels) // 64 * 64
