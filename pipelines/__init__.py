"""Data pipelines: one loader contract (contract.py), backends torch | ffcv | dali | device.

Installed as ``selectivity.pipelines``. A loader is built from a ``DataSpec`` (spec.py), never from
a run's whole configuration. May import: the core of ``selectivity`` (errors, io) and nothing else
of the package (not train, analyses or study).
"""
from __future__ import annotations

from selectivity.pipelines.datasets import DataError, build_dataset
from selectivity.pipelines.spec import DataSpec

BACKENDS = ("torch", "ffcv", "dali", "device")

__all__ = ["BACKENDS", "DataError", "DataSpec", "build_dataset", "build_loader"]


def build_loader(spec: DataSpec, split: str, device, rank: int = 0, world_size: int = 1):
    """The loader of ``split`` ("train" or "val") of the data ``spec`` names, on its backend."""
    import torch
    device = torch.device(device)
    if spec.data_backend == "torch":
        from selectivity.pipelines.torch_loader import TorchLoader
        return TorchLoader(spec.open(split), batch_size=spec.batch_size_of(split),
                           train=split == "train", augment=spec.augment,
                           image_size=spec.image_size, device=device, rank=rank,
                           world_size=world_size, seed=spec.seed, workers=spec.workers,
                           channels_last=spec.channels_last)
    if spec.data_backend == "ffcv":
        from selectivity.pipelines.ffcv import build_ffcv_loader
        return build_ffcv_loader(spec, split, device, rank, world_size)
    if spec.data_backend == "dali":
        from selectivity.pipelines.dali import build_dali_loader
        return build_dali_loader(spec, split, device, rank, world_size)
    if spec.data_backend == "device":
        from selectivity.pipelines.device import build_device_loader
        return build_device_loader(spec, split, device, rank, world_size)
    raise DataError(f"unknown data_backend {spec.data_backend!r}; choose one of {BACKENDS}")
