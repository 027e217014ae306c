"""Every preset in configs/ loads; the papers' presets build their model and train a step on
generated stand-in data (a tiny CIFAR-10 pickle set or ImageFolder in tmp_path: the real data is
the user's)."""
import glob
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import ROOT
from selectivity.train.config import load_config, to_dict
from selectivity.train.models import MODELS, build_model
from selectivity.regularizer import parse_windows

ALL = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
PAPER = sorted(glob.glob(os.path.join(ROOT, "configs", "paper", "*.yaml")))
STUDY = sorted(glob.glob(os.path.join(ROOT, "configs", "study", "*.yaml")))


def test_the_presets_exist():
    names = {os.path.splitext(os.path.basename(p))[0] for p in PAPER}
    assert {"resnet20_cifar10", "resnet18_tinyimagenet", "resnet50_imagenet_ffcv",
            "cnn7_cifar10", "vgg16_imagenet"} <= names
    assert len(STUDY) >= 6


@pytest.mark.parametrize("path", ALL, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_preset_loads(path):
    """Loads, and every key it writes comes back with its value (no key dropped or misread, e.g.
    a number YAML reads as a string), its model named in the registry and its windows valid."""
    with open(path) as f:
        written = yaml.safe_load(f) or {}
    cfg = to_dict(load_config(path))
    assert written, path
    for key, value in written.items():
        if isinstance(value, str):  # PyYAML reads 1e-3 as a string; the config reads a number
            try:
                value = float(value)
            except ValueError:
                assert str(cfg[key]) == value, key
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(cfg[key]) == pytest.approx(float(value)), key
    assert cfg["model"] in MODELS
    parse_windows(cfg["selectivity_reg"])


def test_paper1_settings():
    cfg = load_config(os.path.join(ROOT, "configs", "paper", "resnet50_imagenet_ffcv.yaml"))
    assert (cfg.model, cfg.data_backend, cfg.epochs, cfg.lr, cfg.schedule) == \
        ("resnet50", "ffcv", 90, 0.1, "step")
    assert list(cfg.step_epochs) == [30, 60] and cfg.weight_decay == 1e-4


def test_study_windows_have_equal_length_and_differ_in_position():
    def window(name):
        (w,) = [w for w in parse_windows(load_config(os.path.join(
            ROOT, "configs", "study", f"{name}.yaml")).selectivity_reg) if w.alpha != 0]
        return w
    early, late = window("early_m10"), window("late_m10")
    assert early.start == 0 and early.alpha == late.alpha
    assert early.end - early.start == late.end - late.start and late.start >= early.end


def write_cifar(root, per_batch=2):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(x) for x in rng.integers(0, 10, per_batch)]}
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def write_imagefolder(root, classes=3, per_class=4, size=72):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:04d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    return root


@pytest.mark.parametrize("path", PAPER, ids=lambda p: os.path.basename(p))
def test_paper_preset_trains_on_stand_in_data(path, tmp_path):
    from selectivity.train import distributed
    from selectivity.train.callbacks import default_callbacks
    from selectivity.train.trainer import Trainer

    preset = load_config(path)
    data = tmp_path / "data"
    data.mkdir()
    if preset.dataset == "cifar10":
        write_cifar(data)
    else:
        assert preset.dataset == "imagefolder"
        write_imagefolder(data)
    # The same preset, made cheap: a batch of 4, one epoch of a few steps, and the 224 px
    # presets at 64 px (the same model; a 12th of the cost on one CPU thread).
    overrides = {"data_dir": str(data), "out_dir": str(tmp_path / "runs"), "name": "r",
                 "epochs": 1, "batch_size": 4, "eval_batch_size": 8, "workers": 0,
                 "threads": 1, "device": "cpu", "progress": False, "tensorboard": False,
                 "cache_dir": str(tmp_path / "cache"), "amp": False}
    if preset.image_size > 64:
        overrides["image_size"] = 64
    if preset.data_backend == "ffcv":
        pytest.importorskip("ffcv")
        overrides["workers"] = 1
    cfg = load_config(path, overrides)
    assert cfg.model == preset.model and cfg.data_backend == preset.data_backend
    dist = distributed.setup("cpu")
    trainer = Trainer(cfg, dist, callbacks=default_callbacks(cfg))
    assert 1 <= trainer.steps_per_epoch <= 4
    last = trainer.fit()
    assert last is not None and last["epoch"] == 1 and np.isfinite(last["loss"])
    assert trainer.step == trainer.steps_per_epoch
    if cfg.track:  # the tracked units exist in this model (the plain nets: ReLUs)
        assert last.get("si"), f"{os.path.basename(path)}: no units tracked"


def test_paper3_small_cnn_shapes():
    model = build_model("cnn7", 10)
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert [c.stride[0] for c in convs] == [1, 2, 1, 2, 1, 2]
    assert all(c.padding == (0, 0) and c.kernel_size == (3, 3) for c in convs)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds[:3] == ["Conv2d", "ReLU", "BatchNorm2d"]  # ReLU *then* BN, as in the paper
    model.eval()
    assert model.features(torch.zeros(2, 3, 32, 32)).shape == (2, 128, 1, 1)  # the flatten is 128
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert model.fc1.out_features == 512


def test_vgg16_registered_without_weights():
    for name in ("vgg16", "vgg16_bn"):
        model = build_model(name, 7)
        assert model.classifier[-1].out_features == 7
        assert sum(isinstance(m, torch.nn.Conv2d) for m in model.features) == 13
