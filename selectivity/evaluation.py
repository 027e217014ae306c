"""Measure the network you mean: BatchNorm statistics at evaluation.

Early in training BatchNorm's running statistics lag the weights (they average batches of weights
that no longer exist), so an eval-mode forward can be far from the network being trained: its
accuracy near chance while the training accuracy is high. Every measurement in this package (the
trainer's evaluations, ablation, CKA, orientation) therefore chooses a ``bn_mode``:

- ``recalibrate`` (default): the statistics are recomputed on a fixed, seeded set of training
  images (no augmentation) right before measuring — the cumulative average over those images, as
  ``torch.optim.swa_utils.update_bn`` computes it — and the model's own buffers are put back
  afterwards, so training and exact resume never see the change;
- ``running``: the model's own running statistics (what paper 1's code measured);
- ``batch``: each evaluation batch normalised by its own statistics (BatchNorm in train mode; the
  buffers are restored afterwards).

``update_bn`` itself is not called: it takes a loader of raw inputs and leaves the new statistics
in the model; here the statistics must be restored after the measurement, the torch RNG must not
advance (so a run's trajectory is bit-identical with or without recalibration), and the inputs
may need autocast.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn

from selectivity.units import unwrap

BN_MODES = ("recalibrate", "running", "batch")


def _bn_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in unwrap(model).modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def _saved_bn_state(bns):
    saved = [(m, m.momentum, {k: v.clone() for k, v in m.named_buffers(recurse=False)})
             for m in bns]
    try:
        yield
    finally:
        for m, momentum, buffers in saved:
            m.momentum = momentum
            for k, v in buffers.items():
                getattr(m, k).copy_(v)


@contextlib.contextmanager
def no_rng_advance(device: torch.device):
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        yield


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, amp_dtype=None) -> int:
    """Replace every BatchNorm's running statistics by their average over ``batches``
    (``(images, ...)`` tuples or tensors on the model's device); returns the images seen."""
    bns = _bn_modules(model)
    was = [m.training for m in unwrap(model).modules()]  # restored below
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every calibration image weighs the same
    model = unwrap(model)  # not through DDP (no buffer broadcasts) or a compiled graph
    model.train()
    n = 0
    device = next(model.parameters()).device
    try:
        for batch in batches:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            with torch.autocast(device.type, amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                model(images)
            n += images.shape[0]
    finally:
        for m, t in zip(unwrap(model).modules(), was):
            m.training = t
    return n


@contextlib.contextmanager
def bn_statistics(model: nn.Module, mode: str = "recalibrate", batches: Iterable | None = None,
                  amp_dtype=None):
    """Inside the block ``model`` is in eval mode with BatchNorm statistics chosen by ``mode``
    (module doc); on exit its BatchNorm buffers, train/eval flags and the torch RNG are as before.
    ``batches``: the calibration images for ``recalibrate``."""
    if mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {mode!r}")
    root = unwrap(model)
    flags = [m.training for m in root.modules()]
    bns = _bn_modules(model)
    device = next(root.parameters()).device
    try:
        with _saved_bn_state(bns), no_rng_advance(device):
            if mode == "recalibrate":
                if batches is None:
                    raise ValueError("bn_mode recalibrate needs calibration batches")
                if recalibrate_bn(model, batches, amp_dtype) == 0:
                    raise ValueError("bn_mode recalibrate: the calibration set is empty")
            model.eval()
            if mode == "batch":
                for m in bns:
                    m.train()
            yield model
    finally:
        for m, t in zip(root.modules(), flags):
            m.training = t
