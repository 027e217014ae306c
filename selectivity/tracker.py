"""Selectivity tracking during training (paper 1's measurement, made continuous).

``UnitProbe`` hooks the chosen units of a model and hands every output to a sink. ``Tracker``
(a trainer callback) uses it to keep, per layer, the fused per-class sums of selectivity/ops.py:

- every training step: a running train-set state over the current epoch (labels as seen), whose SI
  is reported every ``log_every_steps`` — selectivity tracked at every step;
- at every evaluation: one pass over the validation split accumulating the real labels AND a
  label-shuffled null in the same pass, so the noise floor is always beside the real value.

The null gives image i the label of image π(i), for one fixed permutation π of the whole
validation set (seeded by the run's seed), so class counts are exactly the real ones and the null
is the same at every evaluation. The loader tells which dataset images each batch holds
(``loader.indices()``), which makes π global across batches and DDP ranks.

Which units: ``blocks`` (default; every residual block's output after its final ReLU), ``relu``
(every ReLU output; a ReLU module called several times per forward, as in torchvision blocks, gives
one layer per call: ``layer1.0.relu#1``), ``bn`` (every BatchNorm output; these are not
non-negative, so their SI is outside [0, 1] — use with care).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

from . import ops
from .callbacks import Callback
from .models import residual_blocks, stage_of
from .reduce import all_reduce_states, is_distributed

UNIT_KINDS = ("blocks", "relu", "bn")
EPS = 1e-7  # Leavitt & Morcos' ε; the regularizer uses the same


def unit_modules(model: nn.Module, units: str = "blocks") -> "OrderedDict[str, nn.Module]":
    """name → module whose forward output holds the units, in forward-definition order."""
    model = getattr(model, "module", model)
    if units == "blocks":
        return residual_blocks(model)
    kind = {"relu": nn.ReLU, "bn": nn.modules.batchnorm._BatchNorm}.get(units)
    if kind is None:
        raise ValueError(f"unknown units {units!r}; choose one of {', '.join(UNIT_KINDS)}")
    return OrderedDict((n, m) for n, m in model.named_modules() if isinstance(m, kind))


class UnitProbe:
    """Forward hooks on the unit modules; calls ``sink(layer_name, output)`` while enabled.

    A module called k times in one forward yields layers ``name``, ``name#1``, … ``name#k-1``.
    """

    def __init__(self, model: nn.Module, units: str, sink):
        self.sink, self.enabled = sink, False
        self._calls: dict[str, int] = {}
        root = getattr(model, "module", model)
        self.handles = [root.register_forward_pre_hook(lambda m, a: self._calls.clear())]
        for name, module in unit_modules(model, units).items():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args, output):
            if not self.enabled:
                return
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            self.sink(name if k == 0 else f"{name}#{k}", output)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class LayerStates:
    """Per-layer (sums, counts), created on a layer's first batch (its unit count known then)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.states: "OrderedDict[str, tuple]" = OrderedDict()

    def add(self, name: str, act: torch.Tensor, labels: torch.Tensor) -> None:
        if name not in self.states:
            self.states[name] = ops.new_state(self.num_classes, act.shape[1], act.device)
        ops.accumulate(act, labels, *self.states[name])

    def reset(self) -> None:
        self.states.clear()

    def reduced(self) -> "OrderedDict[str, tuple]":
        """The states summed over DDP ranks (one all_reduce for all layers), for reading only.

        Under DDP a copy, so that every rank goes on accumulating its own share; in one process the
        states themselves (a copy would read and write another 121 MB for ResNet-50 at K = 1000,
        besides the SI read of the same 121 MB that follows).
        """
        if not is_distributed():
            return self.states
        copy = OrderedDict((n, (s.clone(), c.clone())) for n, (s, c) in self.states.items())
        all_reduce_states(list(copy.values()))
        return copy


def si_of(states: "OrderedDict[str, tuple]") -> "OrderedDict[str, ops.SIResult]":
    return OrderedDict((n, ops.selectivity_index(s, c, EPS)) for n, (s, c) in states.items())


def summarize(results: "OrderedDict[str, ops.SIResult]") -> tuple[dict, float]:
    """(layer → mean SI over its units, mean over layers with each layer weighted equally)."""
    per_layer = {n: float(r.si.mean()) for n, r in results.items()}
    return per_layer, (float(np.mean(list(per_layer.values()))) if per_layer else float("nan"))


class Tracker(Callback):
    """Trainer callback; see the module docstring. ``cfg``: track_units, seed."""

    def __init__(self, units: str = "blocks", seed: int = 0):
        if units not in UNIT_KINDS:
            raise ValueError(f"unknown track_units {units!r}; choose one of {', '.join(UNIT_KINDS)}")
        self.units, self.seed = units, seed
        self.mode, self.labels, self.null_labels = None, None, None

    # -- wiring --------------------------------------------------------------------------------
    def setup(self, trainer) -> None:
        self.trainer = trainer
        self.train_states = LayerStates(trainer.num_classes)
        self.val_states = LayerStates(trainer.num_classes)
        self.null_states = LayerStates(trainer.num_classes)
        self.probe = UnitProbe(trainer.model, self.units, self._sink)
        self.train_epoch = None
        val = trainer.val_loader
        labels = np.asarray(val.labels)
        perm = np.random.default_rng((self.seed, 7919)).permutation(len(labels))
        self._null_by_index = torch.as_tensor(labels[perm], dtype=torch.int64)

    def _sink(self, name, output) -> None:
        if self.mode == "train":
            self.train_states.add(name, output, self.labels)
        elif self.mode == "val":
            self.val_states.add(name, output, self.labels)
            self.null_states.add(name, output, self.null_labels)

    # -- training ------------------------------------------------------------------------------
    def before_batch(self, trainer, images, labels, train: bool) -> None:
        if train:
            if self.train_epoch != trainer.epoch:  # running train SI covers the current epoch
                self.train_states.reset()
                self.train_epoch = trainer.epoch
            self.mode, self.labels = "train", labels
        else:
            self.mode, self.labels = "val", labels
            n = labels.shape[0]
            idx = self._val_indices[self._val_pos:self._val_pos + n]
            self._val_pos += n
            self.null_labels = self._null_by_index[idx].to(labels.device, non_blocking=True)
        self.probe.enabled = True

    def after_batch(self, trainer) -> None:
        self.probe.enabled, self.mode = False, None

    def train_log(self, trainer) -> dict:
        _, mean = summarize(si_of(self.train_states.reduced()))
        return {"si_train": mean}

    # -- evaluation ----------------------------------------------------------------------------
    def eval_begin(self, trainer) -> None:
        self.val_states.reset()
        self.null_states.reset()
        self._val_indices = torch.as_tensor(np.asarray(trainer.val_loader.indices()))
        self._val_pos = 0

    def eval_end(self, trainer, record: dict) -> dict:
        # Every rank joins every all_reduce, in the same order; only rank 0 writes afterwards.
        states = self.val_states.reduced()
        real = si_of(states)
        null_states = self.null_states.reduced()
        null = si_of(null_states)
        per_layer, mean = summarize(real)
        null_layer, null_mean = summarize(null)
        _, train_mean = summarize(si_of(self.train_states.reduced())) if self.train_states.states \
            else ({}, None)
        if trainer.dist.is_main:
            self._save(trainer, record, states, real, null, null_states)
            self._tensorboard(trainer, record["step"], real, null)
        return {"si": per_layer, "si_mean": mean, "si_null": null_mean,
                "si_null_layers": null_layer, "si_train": train_mean}

    def _save(self, trainer, record, states, real, null, null_states) -> None:
        from .checkpoint import atomic_torch_save
        out = {"epoch": record["epoch"], "step": record["step"], "units": self.units, "layers": {}}
        for name, r in real.items():
            s, c = states[name]
            out["layers"][name] = {
                "si": r.si.cpu(), "pref_class": r.pref_class.cpu(), "mu_max": r.mu_max.cpu(),
                "mu_rest": r.mu_rest.cpu(), "sums": s.cpu(), "counts": c.cpu(),
                "si_null": null[name].si.cpu(), "null_sums": null_states[name][0].cpu(),
                "null_counts": null_states[name][1].cpu()}
        e = record["epoch"]
        fname = f"epoch_{e}.pt" if float(e).is_integer() else f"step_{record['step']}.pt"
        path = os.path.join(trainer.paths["selectivity"], fname)
        atomic_torch_save(path, out)

    def _tensorboard(self, trainer, step, real, null) -> None:
        tb = trainer.log.tb
        if tb is None:
            return
        for name, r in real.items():
            tb.add_scalar(f"si/{name}", float(r.si.mean()), step)
            tb.add_scalar(f"si_null/{name}", float(null[name].si.mean()), step)
            tb.add_histogram(f"si_hist/{name}", r.si.float().cpu(), step)
        if not getattr(self, "_layout_done", False):
            stages = OrderedDict()
            for name in real:
                stages.setdefault(stage_of(name), []).append(name)
            tb.add_custom_scalars({"selectivity by stage": {
                stage: ["Multiline", [f"si/{stage}\\.", f"si_null/{stage}\\.", f"si/{stage}$"]]
                for stage in stages}})
            self._layout_done = True

    def state_dict(self) -> dict:
        # The running train state restarts with its epoch; a mid-epoch resume restores it so the
        # reported si_train equals an uninterrupted run's.
        return {"train_epoch": self.train_epoch,
                "train_states": {n: (s.cpu(), c.cpu()) for n, (s, c) in
                                 self.train_states.states.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.train_epoch = state.get("train_epoch")
        dev = self.trainer.device
        self.train_states.states = OrderedDict(
            (n, (s.to(dev), c.to(dev))) for n, (s, c) in state.get("train_states", {}).items())
