"""The loader contract every backend (torch, ffcv, dali) implements.

A loader is an iterable of ``(images, labels)`` batches:
- ``images``: float32, normalized with the dataset's mean/std, shape [B, 3, S, S], channels_last
  memory format (unless ``channels_last=False``), already on the training device;
- ``labels``: int64 [B] on the same device.
``len(loader)`` is the number of batches this rank yields per epoch. ``set_epoch(e)`` must be called
before iterating epoch ``e``: shuffling and augmentation are a function of (seed, epoch), so every
rank and every resumed run sees the same data. Under DDP each rank gets a disjoint shard.
``set_epoch(e, skip_batches=k)`` starts epoch ``e`` at batch ``k`` (resume from a mid-epoch
checkpoint); backends that cannot skip cheaply raise NotImplementedError.
Each batch is a ``Batch``: it unpacks as ``images, labels`` and carries ``batch.indices``, the
dataset indices of its images (int64 [B], on the CPU), so the selectivity tracker gives every
image its fixed null label by index. ``labels`` (all labels of the split, by dataset index) and
``indices()`` (the dataset indices this rank yields this epoch, in order) describe a whole epoch.
"""
from __future__ import annotations

import math
from typing import Iterator, Protocol

import numpy as np
import torch


class Batch(tuple):
    """``(images, labels)`` that also carries ``indices``: the dataset index of every image."""

    def __new__(cls, images: torch.Tensor, labels: torch.Tensor, indices):
        batch = super().__new__(cls, (images, labels))
        batch.indices = torch.as_tensor(indices, dtype=torch.int64)
        return batch


class Loader(Protocol):
    batch_size: int
    num_classes: int
    num_samples: int  # images this rank yields per epoch

    labels: np.ndarray

    def indices(self) -> np.ndarray: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None: ...
    def close(self) -> None: ...


def shard_indices(n: int, rank: int, world_size: int, *, shuffle: bool, seed: int, epoch: int,
                  pad: bool) -> np.ndarray:
    """This rank's sample indices for an epoch.

    Training (``pad=True``) pads the permutation by wrapping so every rank gets the same number of
    samples (as DistributedSampler does: ranks must run the same number of steps). Evaluation
    (``pad=False``) does not pad, so no image is counted twice; shards differ by at most one.
    """
    order = (np.random.default_rng((seed, epoch)).permutation(n) if shuffle
             else np.arange(n))
    if pad and world_size > 1:
        total = math.ceil(n / world_size) * world_size
        order = np.concatenate([order, order[:total - n]])
    return order[rank::world_size]
