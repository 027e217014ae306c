"""The trainer's extension points, and the thin adapters that put the library into its loop.

``Tracking`` runs two ``SelectivityTracker``s (selectivity/tracker.py): one over the training
batches of the current epoch, or exponentially weighted (labels as seen; its SI of every step goes
to TensorBoard, and to the train records every ``log_every_steps``), one over each evaluation (with
the label-shuffled null). It writes what they compute: the
selectivity records, TensorBoard, and the keys of the val record. ``Regularizing`` adds
``-α · SI_reg`` of a ``SelectivityRegularizer`` (selectivity/regularizer.py), α from the config's
epoch windows. Neither computes anything the library does not.
"""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

from selectivity.train.models import stage_of
from selectivity.regularizer import (SelectivityRegularizer, alpha_at, regularizer_windows,
                                     term_diagnostics)
from selectivity.tracker import SelectivityTracker, summarize


class Callback:
    """Extension points of the loop; every method is optional."""

    def setup(self, trainer) -> None: ...
    def before_batch(self, trainer, images, labels, train: bool, indices=None) -> None: ...
    def after_batch(self, trainer) -> None: ...
    def loss_terms(self, trainer, images, labels, logits) -> dict: return {}
    def after_step(self, trainer, images, labels, logits) -> None: ...
    def train_log(self, trainer) -> dict: return {}
    def eval_begin(self, trainer) -> None: ...
    def eval_batch(self, trainer, images, labels, logits) -> None: ...
    def eval_end(self, trainer, record: dict) -> dict: return {}
    def state_dict(self) -> dict: return {}
    def load_state_dict(self, state: dict) -> None: ...


class Tracking(Callback):
    """Selectivity of ``cfg.track_units`` at every step (train) and every evaluation (val + null).

    The train SI of every step (``SelectivityTracker.step_si``, kept incrementally) stays on the
    device until the log cadence, when the buffered steps go to TensorBoard in one host copy
    (``si_train_step/<layer>`` and ``/mean``). ``decay`` λ makes the train state exponentially
    weighted by step (the recent network); without it the state covers the current epoch.
    """

    def __init__(self, units: str = "blocks", seed: int = 0, null_permutations: int = 10,
                 decay: float = 0.0, negative: str = "error"):
        self.units, self.seed, self.null_permutations = units, seed, null_permutations
        self.negative = negative
        # TensorBoard tags name what was measured when it is not the responses as they are.
        self.tag = "si" if negative == "error" else f"si_{negative}"
        self.decay = decay or None
        self.train_epoch = None
        self._layout_done = False
        self._steps: list = []  # (step, [layers] SI on the device) since the last log

    def setup(self, trainer) -> None:
        self.trainer = trainer
        K = trainer.num_classes
        self.train = SelectivityTracker(trainer.model, K, self.units, incremental=True,
                                        decay=self.decay, negative=self.negative)
        self.val = SelectivityTracker(trainer.model, K, self.units,
                                      dataset_labels=trainer.val_loader.labels,
                                      null_permutations=self.null_permutations, seed=self.seed,
                                      negative=self.negative)
        self.train.enabled = self.val.enabled = False

    def before_batch(self, trainer, images, labels, train: bool, indices=None) -> None:
        if train:
            if self.decay is None and self.train_epoch != trainer.epoch:
                self.train.reset()  # the running train SI covers the current epoch
                self.train_epoch = trainer.epoch
            self.train.begin(labels)
            self.train.enabled = True
        else:
            self.val.begin(labels, indices)
            self.val.enabled = True

    def after_batch(self, trainer) -> None:
        for t in (self.train, self.val):
            t.enabled = False
            t.end()

    def after_step(self, trainer, images, labels, logits) -> None:
        si = self.train.step_si()
        if si:
            self._steps.append((trainer.step + 1, torch.stack(list(si.values()))))

    def _write_steps(self, trainer) -> torch.Tensor | None:
        """The buffered per-step SI to TensorBoard, in one host copy; returns the last step's."""
        if not self._steps:
            return None
        steps = [s for s, _ in self._steps]
        values = torch.stack([v for _, v in self._steps]).double().cpu()
        self._steps.clear()
        tb = trainer.log.tb if trainer.dist.is_main else None
        if tb is not None:
            names = list(self.train.layers)
            for step, row in zip(steps, values.tolist()):
                for name, v in zip(names, row):
                    tb.add_scalar(f"{self.tag}_train_step/{name}", v, step)
                tb.add_scalar(f"{self.tag}_train_step/mean", sum(row) / len(row), step)
        return values[-1]

    def train_log(self, trainer) -> dict:
        last = self._write_steps(trainer)
        return {} if last is None else {"si_train": float(last.mean())}

    def eval_begin(self, trainer) -> None:
        self._write_steps(trainer)  # the steps since the last log (an epoch's end)
        self.val.reset()

    def eval_end(self, trainer, record: dict) -> dict:
        # Every rank joins every all_reduce, in the same order; only rank 0 writes afterwards.
        results = self.val.compute()
        train = self.train.compute()
        train_mean = summarize(train)["si_mean"] if train else None
        if trainer.dist.is_main:
            self._save(trainer, record, results)
            self._tensorboard(trainer, record["step"], results)
        return {**summarize(results), "si_train": train_mean, "null_permutations":
                self.null_permutations, "track_negative": self.negative}

    def _save(self, trainer, record, results) -> None:
        from selectivity.train.checkpoint import atomic_torch_save
        out = {"epoch": record["epoch"], "step": record["step"], "units": self.units,
               "bn_mode": record.get("bn_mode"), "negative": self.negative, "layers": {}}
        for name, r in results.items():
            r = r.cpu()
            out["layers"][name] = {
                "si": r.si, "pref_class": r.pref_class, "mu_max": r.mu_max, "mu_rest": r.mu_rest,
                "sums": r.sums, "counts": r.counts, "si_null": r.null_si}
            if r.shifted_by is not None:  # negative "shift": what was subtracted from each unit
                out["layers"][name]["shifted_by"] = r.shifted_by
        e = record["epoch"]
        fname = f"epoch_{e}.pt" if float(e).is_integer() else f"step_{record['step']}.pt"
        atomic_torch_save(os.path.join(trainer.paths["selectivity"], fname), out)

    def _tensorboard(self, trainer, step, results) -> None:
        tb = trainer.log.tb
        if tb is None:
            return
        for name, r in results.items():
            tb.add_scalar(f"{self.tag}/{name}", r.mean, step)
            if r.null_si is not None:
                tb.add_scalar(f"{self.tag}_null/{name}", r.null_mean, step)
            tb.add_histogram(f"{self.tag}_hist/{name}", r.si.float().cpu(), step)
        if not self._layout_done:
            stages = OrderedDict()
            for name in results:
                stages.setdefault(stage_of(name), []).append(name)
            tb.add_custom_scalars({"selectivity by stage": {
                stage: ["Multiline", [f"{self.tag}/{stage}\\.", f"{self.tag}_null/{stage}\\.",
                                      f"{self.tag}/{stage}$"]]
                for stage in stages}})
            self._layout_done = True

    def state_dict(self) -> dict:
        # The running train state restarts with its epoch; a mid-epoch resume restores it so the
        # reported si_train equals an uninterrupted run's.
        # The per-step SI not yet logged goes with it, so the resumed run logs every step.
        return {"train_epoch": self.train_epoch, "train_states": self.train.state_dict(),
                "step_si": [(s, v.tolist()) for s, v in self._steps]}

    def load_state_dict(self, state: dict) -> None:
        self.train_epoch = state.get("train_epoch")
        self.train.load_state_dict(state.get("train_states", {}))
        device = self.trainer.device
        self._steps = [(s, torch.tensor(v, dtype=torch.float64, device=device))
                       for s, v in state.get("step_si", [])]


class Regularizing(Callback):
    """Adds ``-α · SI_reg`` to the training loss; α from epoch windows.

    Logs ``alpha`` (of the last step) and ``si_reg`` (mean minibatch SI_reg over the regularized
    steps since the last log; absent when none was) into the train records and TensorBoard, and,
    to see a collapse coming, the largest ``reg_grad_norm`` (‖∂(α·SI_reg)/∂A‖ over the layers'
    per-image means A) and ``reg_silent_frac`` (units with μ_max + μ_-max below
    ``regularizer.NEAR_SILENT``) of those steps (``regularizer.term_diagnostics``).
    """

    def __init__(self, windows, units: str = "blocks", negative: str = "error"):
        self.windows, self.units, self.negative = windows, units, negative
        self.alpha = 0.0
        self._si_sum, self._si_n = None, 0
        self._grad_max = self._silent_max = None

    def setup(self, trainer) -> None:
        self.trainer = trainer
        self.reg = SelectivityRegularizer(trainer.model, trainer.num_classes, self.units,
                                          negative=self.negative)
        self.reg.enabled = False
        self.reg.keep_acts = True
        self._si_sum = torch.zeros((), dtype=torch.float64, device=trainer.device)
        self._grad_max = torch.zeros((), dtype=torch.float64, device=trainer.device)
        self._silent_max = torch.zeros((), dtype=torch.float64, device=trainer.device)

    def epoch_position(self, trainer) -> float:
        return trainer.epoch + trainer.batch_in_epoch / trainer.steps_per_epoch

    def before_batch(self, trainer, images, labels, train: bool, indices=None) -> None:
        if train:
            self.alpha = alpha_at(self.windows, self.epoch_position(trainer))
            if trainer.batch_in_epoch == 0:  # log intervals restart with the epoch, as the loop's
                self._reset()
        # A step with α = 0 does nothing at all: the hooks are off and no term is added.
        self.reg.enabled = train and self.alpha != 0.0

    def loss_terms(self, trainer, images, labels, logits) -> dict:
        if not self.reg.enabled:
            return {}
        si_reg = self.reg.term(labels)
        self._si_sum += si_reg.detach().to(torch.float64)
        self._si_n += 1
        norm, silent = term_diagnostics(si_reg, self.reg.last_acts, labels, trainer.num_classes)
        self.reg.last_acts = []
        torch.maximum(self._grad_max, abs(self.alpha) * norm.to(torch.float64), out=self._grad_max)
        torch.maximum(self._silent_max, silent.to(torch.float64), out=self._silent_max)
        return {"selectivity_reg": -self.alpha * si_reg}

    def after_batch(self, trainer) -> None:
        self.reg.enabled = False

    def train_log(self, trainer) -> dict:
        out = {"alpha": self.alpha}
        if self._si_n:
            out["si_reg"] = self._si_sum.item() / self._si_n
            out["reg_grad_norm"] = self._grad_max.item()
            out["reg_silent_frac"] = self._silent_max.item()
        self._reset()
        return out

    def _reset(self) -> None:
        self._si_sum.zero_()
        self._grad_max.zero_()
        self._silent_max.zero_()
        self._si_n = 0

    def state_dict(self) -> dict:
        # α needs no state (a function of epoch and step, which the trainer restores). The si_reg
        # average of a log interval cut by a mid-epoch checkpoint does, so that a resumed run logs
        # what an uninterrupted one does; a checkpoint at a log step is written before that step's
        # log, which will consume the interval, so it holds an empty one.
        t = self.trainer
        if t.step % t.cfg.log_every_steps == 0:
            return {"si_sum": 0.0, "si_n": 0, "grad_max": 0.0, "silent_max": 0.0}
        return {"si_sum": float(self._si_sum), "si_n": self._si_n,
                "grad_max": float(self._grad_max), "silent_max": float(self._silent_max)}

    def load_state_dict(self, state: dict) -> None:
        self._si_sum.fill_(state.get("si_sum", 0.0))
        self._si_n = state.get("si_n", 0)
        self._grad_max.fill_(state.get("grad_max", 0.0))
        self._silent_max.fill_(state.get("silent_max", 0.0))


def tracking_callbacks(cfg) -> list:
    return [Tracking(cfg.track_units, cfg.seed, cfg.null_permutations, cfg.train_si_decay,
                     cfg.track_negative)]


def regularizer_callbacks(cfg, alpha: float | None = None) -> list:
    """The regularizer for ``cfg.selectivity_reg`` (validated: ConfigError); ``alpha``: a
    constant α instead (benchmarks). No windows (the default) → no callback at all."""
    windows = regularizer_windows(cfg, alpha)
    return [Regularizing(windows, negative=cfg.track_negative)] if windows else []


def default_callbacks(cfg) -> list:
    callbacks = []
    if cfg.track:
        callbacks += tracking_callbacks(cfg)
    callbacks += regularizer_callbacks(cfg)  # validates the windows; none configured → []
    return callbacks
