"""The plain PyTorch backend: a DataLoader over any dataset of selectivity/pipelines/datasets.py."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from selectivity.pipelines.contract import Batch, shard_indices
from selectivity.pipelines.transforms import train_transform, val_transform


class _EpochSampler(Sampler):
    """Yields (index, epoch) pairs so workers can seed each image's augmentation."""

    def __init__(self, loader: "TorchLoader"):
        self.loader = loader

    def __iter__(self):
        ld = self.loader
        idx = ld.indices()[ld.skip_batches * ld.batch_size:]
        return iter([(int(i), ld.epoch) for i in idx])

    def __len__(self):
        return len(self.loader.indices()) - self.loader.skip_batches * self.loader.batch_size


class _Augmented(Dataset):
    def __init__(self, dataset, train: bool, augment: str, image_size: int, seed: int):
        self.dataset, self.train, self.augment = dataset, train, augment
        self.image_size, self.seed = image_size, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        i, epoch = item
        # ImageFolder hands over the PIL image itself: cropping before any array copy is cheaper.
        img = self.dataset.load(i) if hasattr(self.dataset, "load") else self.dataset[i][0]
        label = int(self.dataset.labels[i])
        if self.train:
            rng = np.random.default_rng((self.seed, epoch, i))
            return train_transform(img, self.image_size, self.augment, rng), label, i
        return val_transform(img, self.image_size), label, i


class TorchLoader:
    """Loader contract (selectivity/pipelines/contract.py) over a torch DataLoader."""

    def __init__(self, dataset, *, batch_size: int, train: bool, augment: str, image_size: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, seed: int = 0,
                 workers: int = 0, channels_last: bool = True):
        self.dataset, self.batch_size, self.train = dataset, batch_size, train
        self.device, self.rank, self.world_size, self.seed = device, rank, world_size, seed
        self.channels_last = channels_last
        self.num_classes = dataset.num_classes
        self.epoch, self.skip_batches, self._cache = 0, 0, None
        mean = torch.tensor(dataset.mean, device=device).view(1, 3, 1, 1) * 255
        std = torch.tensor(dataset.std, device=device).view(1, 3, 1, 1) * 255
        self._mean, self._inv_std = mean, 1.0 / std
        self._loader = DataLoader(
            _Augmented(dataset, train, augment, image_size, seed), batch_size=batch_size,
            sampler=_EpochSampler(self), num_workers=workers, drop_last=train,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def indices(self) -> np.ndarray:
        """This rank's sample order for the current epoch (drop_last applied for training)."""
        if self._cache is None or self._cache[0] != self.epoch:
            idx = shard_indices(len(self.dataset), self.rank, self.world_size, shuffle=self.train,
                                seed=self.seed, epoch=self.epoch, pad=self.train)
            if self.train:
                idx = idx[:len(idx) // self.batch_size * self.batch_size]
            self._cache = (self.epoch, idx)
        return self._cache[1]

    @property
    def labels(self) -> np.ndarray:
        """Labels of the whole split, by dataset index (what ``indices()`` index into)."""
        return self.dataset.labels

    @property
    def num_samples(self) -> int:
        return len(self.indices())

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __len__(self) -> int:
        return -(-len(self.indices()) // self.batch_size) - self.skip_batches

    def __iter__(self):
        for images, labels, indices in self._loader:
            x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NHWC → channels_last
            x = (x.float() - self._mean) * self._inv_std
            if not self.channels_last:
                x = x.contiguous()
            yield Batch(x, labels.to(self.device, non_blocking=True), indices)

    def close(self) -> None:
        self._loader = None
