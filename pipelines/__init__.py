"""Data pipelines: one loader contract (contract.py), backends torch | ffcv | dali."""
from __future__ import annotations

from selectivity.pipelines.datasets import DataError, build_dataset

BACKENDS = ("torch", "ffcv", "dali")


def build_loader(cfg, split: str, device, rank: int = 0, world_size: int = 1):
    """The loader for a split ("train" or "val") of the dataset named by ``cfg``.

    ``cfg`` is a selectivity.train.config.Config (the fields data_backend, dataset, data_dir, image_size,
    batch_size, workers, augment, seed, channels_last, synthetic_* are read).
    """
    import torch
    device = torch.device(device)
    train = split == "train"
    if cfg.data_backend == "torch":
        from selectivity.pipelines.torch_loader import TorchLoader
        ds = build_dataset(cfg.dataset, split, cfg.data_dir, cfg.image_size,
                           cfg.synthetic_classes, cfg.synthetic_size, cfg.seed)
        return TorchLoader(ds, batch_size=cfg.batch_size if train else cfg.eval_batch_size,
                           train=train, augment=cfg.augment, image_size=cfg.image_size,
                           device=device, rank=rank, world_size=world_size, seed=cfg.seed,
                           workers=cfg.workers, channels_last=cfg.channels_last)
    if cfg.data_backend == "ffcv":
        from selectivity.pipelines.ffcv import build_ffcv_loader
        return build_ffcv_loader(cfg, split, device, rank, world_size)
    if cfg.data_backend == "dali":
        from selectivity.pipelines.dali import build_dali_loader
        return build_dali_loader(cfg, split, device, rank, world_size)
    raise DataError(f"unknown data_backend {cfg.data_backend!r}; choose one of {BACKENDS}")
