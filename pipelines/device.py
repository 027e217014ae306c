"""The ``device`` backend: synthetic batches made on the training device itself.

For benchmarks of the training step (the GPU check): no decoding, no host-to-device copy, so the
loader never sets the pace. Labels, indices, sharding and ``set_epoch`` follow the loader contract
of ``SyntheticDataset`` (its labels and size); the images are not its gratings but seeded noise
plus a fixed per-class pattern (learnable, and generated in one kernel per batch).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from selectivity.pipelines.contract import Batch, shard_indices
from selectivity.pipelines.datasets import DataError


class DeviceLoader:
    """Loader contract over ``dataset``'s labels, images generated on ``device`` per batch."""

    def __init__(self, dataset, *, batch_size: int, train: bool, image_size: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, seed: int = 0,
                 channels_last: bool = True):
        self.batch_size, self.train, self.image_size = batch_size, train, image_size
        self.device, self.rank, self.world_size, self.seed = device, rank, world_size, seed
        self.channels_last = channels_last
        self.dataset = dataset
        self.labels = np.asarray(dataset.labels, dtype=np.int64)
        self.num_classes = dataset.num_classes
        self.epoch, self.skip_batches = 0, 0
        g = torch.Generator(device="cpu").manual_seed(seed)
        self._patterns = torch.randn(self.num_classes, 3, image_size, image_size,
                                     generator=g).to(device)
        self._labels = torch.as_tensor(self.labels, device=device)

    def indices(self) -> np.ndarray:
        return shard_indices(len(self.labels), self.rank, self.world_size, shuffle=self.train,
                             seed=self.seed, epoch=self.epoch, pad=self.train)

    @property
    def num_samples(self) -> int:
        return len(self.indices())

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.train else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        idx = self.indices()
        g = torch.Generator(device=self.device)
        for b in range(self.skip_batches, len(self)):
            chunk = idx[b * self.batch_size:(b + 1) * self.batch_size]
            g.manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + b)
            index = torch.as_tensor(chunk, device=self.device)
            labels = self._labels[index]
            images = torch.randn(len(chunk), 3, self.image_size, self.image_size,
                                 device=self.device, generator=g).add_(self._patterns[labels])
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield Batch(images, labels, torch.as_tensor(chunk))

    def close(self) -> None:
        pass


def build_device_loader(spec, split: str, device, rank: int = 0, world_size: int = 1):
    if spec.dataset != "synthetic":
        raise DataError(f"data_backend 'device' makes synthetic batches on the device; it needs "
                        f"dataset: synthetic, got {spec.dataset!r}")
    return DeviceLoader(spec.open(split), batch_size=spec.batch_size_of(split),
                        train=split == "train", image_size=spec.image_size, device=device,
                        rank=rank, world_size=world_size, seed=spec.seed,
                        channels_last=spec.channels_last)
