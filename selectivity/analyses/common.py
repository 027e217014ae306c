"""What the analyses of a run (ablation, CKA, orientation) share: how they put a model in the
state they measure, which images they measure on, and how they name what they measured.

- ``measuring(model, bn_mode, calibration)``: eval mode, no grad, and the BatchNorm statistics
  ``bn_mode`` asks for (selectivity/evaluation.py), the model's buffers, flags and the RNG
  restored on exit. Every record an analysis writes states the ``bn_mode`` it used.
- ``eval_no_grad``: eval mode for a model in training mode, no grad; a model already in eval mode
  is measured as the caller configured it (inside ``bn_statistics(model, "batch")`` its
  BatchNorm layers are in training mode on purpose).
- ``val_loader(cfg, device, seed=...)``: the validation split in a fixed, seeded shuffled order.
  ImageFolder lists a split class by class and the val loader does not shuffle, so without it a
  minibatch estimator (CKA) sees one or two classes per batch.
- ``keep_or_replay(loader)``: a small split decoded once and kept in memory, a large one
  re-iterated from the start for every pass.
- ``random_init_model``: the same architecture freshly initialised from a fixed seed (CKA's
  baseline).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import numpy as np
import torch
from torch import nn

from selectivity.errors import CheckpointError, ConfigError

CACHE_BYTES = 1 << 30  # splits whose float32 images fit in this are decoded once and kept
VAL_ORDER_SALT = 7919   # the val order's seed is (seed, salt): independent of other seeded draws


@contextlib.contextmanager
def eval_no_grad(*models: nn.Module):
    """No grad, and eval mode for a model that is in training mode; every module's train/eval
    flag is restored after. A model already in eval mode keeps its modules' flags (see the module
    doc: switching BatchNorm back to eval inside ``bn_statistics(model, "batch")`` would silently
    measure the running statistics)."""
    flags = [[m.training for m in model.modules()] for model in models]
    try:
        for model in models:
            if model.training:
                model.eval()
        with torch.no_grad():
            yield
    finally:
        for model, saved in zip(models, flags):
            for m, t in zip(model.modules(), saved):
                m.training = t


def bn_uses_batch_statistics(model: nn.Module) -> bool:
    """Whether a forward pass normalises by the batch's own statistics (some BatchNorm in
    training mode): then images in one forward pass interact, and batching several conditions
    into one pass would change what each condition measures."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


@contextlib.contextmanager
def measuring(model: nn.Module, bn_mode: str, calibration: list | None = None):
    """``model`` in eval mode under no_grad with the BatchNorm statistics of ``bn_mode``
    (``recalibrate`` needs ``calibration``: ``train.splits.calibration_batches``);
    buffers, flags and the torch RNG as before on exit."""
    from selectivity.evaluation import BN_MODES, bn_statistics
    if bn_mode not in BN_MODES:
        raise ConfigError(f"--bn-mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    with bn_statistics(model, bn_mode, calibration), torch.no_grad():
        yield model


def calibration_for(cfg, device, bn_mode: str):
    """The recalibration images of a run (None unless ``bn_mode`` is recalibrate)."""
    if bn_mode != "recalibrate":
        return None
    from selectivity.train.config import data_spec
    from selectivity.train.splits import calibration_batches
    return calibration_batches(data_spec(cfg), device, cfg.bn_images)


def run_label(run_dir: str) -> str:
    return os.path.basename(os.path.normpath(run_dir))


def measured_epochs(asked, measured, flag: str) -> list[float]:
    """The measured checkpoint epochs that the user's ``asked`` values name (see
    ``runs.epoch_matches``); an epoch not measured is an error naming ``flag``."""
    from selectivity.train.runs import nearest_epoch
    out = []
    for e in asked:
        epoch = nearest_epoch(e, measured, "the measured epochs")
        if epoch is None:
            raise CheckpointError(f"{flag} {e:g} is not among the measured epochs "
                                  f"({', '.join(f'{m:g}' for m in measured)})")
        out.append(epoch)
    return out


def val_order(n: int, seed: int) -> np.ndarray:
    """The fixed shuffled order of a split of ``n`` images for ``seed``."""
    return np.random.default_rng([seed, VAL_ORDER_SALT]).permutation(n)


VAL_ORDERS = ("shuffled", "dataset", "by_class")


def val_loader(cfg, device, seed: int = 0, max_images: int | None = None,
               batch_size: int | None = None, order: str = "shuffled"):
    """The val split of a run's config through the torch backend, as evaluation sees images
    (no augmentation), the first ``max_images`` of ``order``: ``shuffled`` (the fixed order
    ``val_order(n, seed)``, what every analysis uses), ``dataset`` (the dataset's own order) or
    ``by_class`` (sorted by label, as an ImageFolder lists its images; to measure the bias a
    class-sorted order would cause)."""
    from selectivity.pipelines.datasets import build_dataset
    from selectivity.pipelines.torch_loader import TorchLoader
    from selectivity.train.splits import SubsetView
    ds = build_dataset(cfg.dataset, "val", cfg.data_dir, cfg.image_size, cfg.synthetic_classes,
                       cfg.synthetic_size, cfg.seed)
    if len(ds) == 0:
        raise ConfigError("the val split is empty")
    if order not in VAL_ORDERS:
        raise ConfigError(f"val order must be one of {', '.join(VAL_ORDERS)}, got {order!r}")
    index = {"shuffled": lambda: val_order(len(ds), seed),
             "dataset": lambda: np.arange(len(ds)),
             "by_class": lambda: np.argsort(np.asarray(ds.labels), kind="stable")}[order]()
    if max_images is not None:
        index = index[:max_images]
    return TorchLoader(SubsetView(ds, index), batch_size=batch_size or cfg.eval_batch_size,
                       train=False, augment="none", image_size=cfg.image_size,
                       device=torch.device(device), seed=cfg.seed, workers=cfg.workers,
                       channels_last=cfg.channels_last)


class _Replay:
    """A loader restarted (``set_epoch(0)``) for every pass."""

    def __init__(self, loader):
        self.loader = loader
        self.num_classes = getattr(loader, "num_classes", None)

    def __iter__(self):
        self.loader.set_epoch(0)
        return iter(self.loader)


def keep_or_replay(loader, image_size: int) -> Iterable:
    """The loader's batches in a list when the split is small (decoded once, reused for every
    checkpoint), else the loader replayed from its start for every pass."""
    n = len(loader.labels) if hasattr(loader, "labels") else None
    if n is not None and n * 3 * image_size ** 2 * 4 <= CACHE_BYTES:
        loader.set_epoch(0)
        return list(loader)
    return _Replay(loader)


def random_init_model(cfg, num_classes: int, seed: int, device) -> nn.Module:
    """The run's architecture freshly initialised from ``seed`` (the torch RNG outside is left as
    it was), on ``device``, channels_last as trained, in eval mode."""
    from selectivity.train.models import build_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(cfg.model, num_classes, cfg.small_stem)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def keep_record(records: list, record, out_jsonl: str | None, on_record=None) -> None:
    """Append ``record``, rewrite ``out_jsonl`` with all records so far (an interrupted
    analysis keeps what it measured), then tell ``on_record``."""
    from selectivity.io import write_jsonl
    records.append(record)
    if out_jsonl:
        write_jsonl(out_jsonl, records)
    if on_record is not None:
        on_record(record)


def set_threads(threads: int | None, cfg=None) -> None:
    """torch threads: ``threads`` when given, else the run's ``threads`` (0: torch's default)."""
    n = threads if threads is not None else (cfg.threads if cfg is not None else 0)
    if n:
        torch.set_num_threads(n)
