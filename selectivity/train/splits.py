"""The ranking split: the images the units are ranked on (selectivity/unit_ranking.py) before
they are ablated (selectivity/ablation.py).

By default a fixed stratified 20 % of the *training* split, seen without augmentation
(``ranking_loader``) — never the data the accuracy is then measured on (val): paper 1's code
ranked and evaluated on the same ImageNet val set.
"""
from __future__ import annotations

import numpy as np
import torch

from selectivity.evaluation import no_rng_advance
from selectivity.pipelines.spec import DataSpec
from selectivity.pipelines.torch_loader import TorchLoader
from selectivity.unit_ranking import AblationError


class SubsetView:
    """Some images of a dataset, as the loaders want a dataset (labels, num_classes, mean, std)."""

    def __init__(self, dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(dataset.labels)[self.indices]
        self.num_classes, self.mean, self.std = dataset.num_classes, dataset.mean, dataset.std
        self.classes = getattr(dataset, "classes", None)
        if hasattr(dataset, "load"):
            self.load = lambda i: dataset.load(int(self.indices[i]))

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]


def stratified_subset(labels: np.ndarray, fraction: float, seed: int,
                      max_images: int | None = None) -> np.ndarray:
    """Sorted indices of a fixed stratified random subset: round(fraction · n_c) images of each
    class c (at least one of each present class), scaled down to at most ``max_images``."""
    if not 0.0 < fraction <= 1.0:
        raise AblationError(f"ranking fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if max_images is not None:
        fraction = min(fraction, max_images / max(len(labels), 1))
    rng = np.random.default_rng([seed, 4099])
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(idx))))
        out.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(out)) if out else np.zeros(0, dtype=np.int64)


def ranking_loader(data: DataSpec, device, fraction: float = 0.2, seed: int = 0,
                   max_images: int | None = 50_000, batch_size: int | None = None):
    """The ranking split of a run's data: a fixed stratified ``fraction`` of the *training*
    split, seen as evaluation sees images (no augmentation), via the torch backend.

    These images were trained on; what matters is that accuracy is measured on other images (val).
    """
    ds = data.open("train")
    view = SubsetView(ds, stratified_subset(ds.labels, fraction, seed, max_images))
    return TorchLoader(view, batch_size=batch_size or data.eval_batch_size, train=False,
                       augment="none", image_size=data.image_size, device=torch.device(device),
                       seed=data.seed, workers=data.workers, channels_last=data.channels_last)


def calibration_batches(data: DataSpec, device, images: int) -> list:
    """The BatchNorm recalibration set of a run: a fixed stratified subset of the training split
    (``images`` images, seeded by the run's seed), as evaluation sees images (no augmentation),
    decoded once and kept in memory on ``device``."""
    loader = ranking_loader(data, device, fraction=1.0, seed=data.seed + 104729, max_images=images)
    loader.set_epoch(0)
    with no_rng_advance(torch.device(device)):  # iterating a DataLoader draws from torch's RNG
        return [batch for batch, _ in loader]
