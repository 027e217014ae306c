"""``DataSpec``: what a loader needs to know, and nothing else.

Every loader, analysis and study step takes a ``DataSpec`` (not a run's whole configuration).
It is built once per run from the config (``selectivity.train.config.data_spec``), which holds the
defaults; the spec has none of its own, so there is one place where a default is written.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from selectivity.pipelines.datasets import build_dataset


@dataclass(frozen=True)
class DataSpec:
    dataset: str            # digits | digits_hard | synthetic | imagefolder | cifar10
    data_dir: str           # imagefolder / cifar10 root
    data_backend: str       # torch | ffcv | dali | device
    image_size: int         # side in pixels of the images the model sees
    augment: str            # training augmentation: none | crop | crop_flip | rrc_flip
    batch_size: int         # training images per step, per process
    eval_batch_size: int    # evaluation images per batch, per process
    workers: int            # torch: DataLoader workers; ffcv, dali: threads (0 = one per core)
    seed: int               # the data order and every augmentation are functions of it
    channels_last: bool     # memory format of the images handed to the model
    synthetic_classes: int
    synthetic_size: int
    cache_dir: str          # ffcv/dali derived files
    ffcv_order: str
    os_cache: bool
    ffcv_train: str
    ffcv_val: str

    def open(self, split: str):
        """The dataset of ``split`` ("train" or "val") this spec names."""
        return build_dataset(self.dataset, split, self.data_dir, self.image_size,
                             self.synthetic_classes, self.synthetic_size, self.seed)

    def batch_size_of(self, split: str) -> int:
        return self.batch_size if split == "train" else self.eval_batch_size


FIELDS = tuple(f.name for f in dataclasses.fields(DataSpec))
