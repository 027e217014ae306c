"""Reading a finished (or running) run directory: its config, checkpoints, model and data.

The analysis tools (ablate, cka, orientation, plots) start here, so they all agree on what a
checkpoint's "epoch" is and rebuild the model and data exactly as training did.
"""
from __future__ import annotations

import dataclasses
import os
import re
import warnings

import torch

from selectivity.train.checkpoint import CheckpointError, check_fits, load_state
from selectivity.train.config import Config, load_config
from selectivity.train.models import build_model
from selectivity.train.runlog import read_metrics, run_paths


@dataclasses.dataclass
class CheckpointInfo:
    path: str
    epoch: float      # completed epochs (fractional for step_*.pt taken inside an epoch)
    step: int


def run_config(run_dir: str, **overrides) -> Config:
    path = run_paths(run_dir)["config"]
    if not os.path.exists(path):
        raise CheckpointError(f"not a run directory (no config.yaml): {run_dir}")
    return load_config(path, overrides)


def list_checkpoints(run_dir: str) -> list[CheckpointInfo]:
    """Every epoch_*/step_* checkpoint of the run, in training order (last.pt excluded)."""
    ckpt_dir = run_paths(run_dir)["checkpoints"]
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"no checkpoints in {run_dir}; train it first (tools/train.py)")
    out = []
    for f in os.listdir(ckpt_dir):
        m = re.fullmatch(r"(epoch|step)_(\d+)\.pt", f)
        if m:
            path = os.path.join(ckpt_dir, f)
            try:
                state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
                epoch = state["epoch"] + state["batch_in_epoch"] / max(_steps_per_epoch(state), 1)
                step = state["step"]
            except Exception as e:  # torn or foreign: as the trainer's resume does, skip it
                warnings.warn(f"skipping unreadable checkpoint {path}: {str(e).splitlines()[0]}")
                continue
            out.append(CheckpointInfo(path, epoch, step))
    return sorted(out, key=lambda c: c.step)


def _steps_per_epoch(state: dict) -> int:
    return state.get("steps_per_epoch", 0)


def open_run(run_dir: str, **overrides):
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"run directory not found: {run_dir}")
    return run_config(run_dir, **overrides)


def epoch_matches(asked: float, epoch: float) -> bool:
    """Whether an epoch typed by the user names a checkpoint's epoch. Step checkpoints have
    fractional epochs (step / steps per epoch, e.g. 0.227273), so both forms the tools print are
    accepted: 6 significant digits (error messages) and 3 (summaries, figure titles)."""
    return abs(asked - epoch) <= 1e-5 * max(1.0, abs(asked)) or f"{asked:.3g}" == f"{epoch:.3g}"


def nearest_epoch(asked: float, epochs, what: str):
    """The one epoch of ``epochs`` that ``asked`` names; None if none does; an error if several
    do only by their 3-digit form."""
    match = sorted((e for e in epochs if epoch_matches(asked, e)), key=lambda e: abs(e - asked))
    if len(match) > 1 and abs(match[0] - asked) > 1e-5 * max(1.0, abs(asked)):
        raise CheckpointError(f"epoch {asked:g} is ambiguous in {what}: "
                              f"{', '.join(f'{e:g}' for e in match)}; give more digits")
    return match[0] if match else None


def choose_checkpoints(run_dir: str, epochs, steps: bool):
    """epoch_* checkpoints (and step_* with ``steps``), or exactly the ``epochs`` asked for (any
    kind); one per epoch, an epoch_* file preferred over a step_* file at the same point."""
    found = list_checkpoints(run_dir)
    by_epoch = {}
    for c in found:
        is_epoch = os.path.basename(c.path).startswith("epoch_")
        if epochs is None and not (is_epoch or steps):
            continue
        key = round(c.epoch, 9)
        if key not in by_epoch or is_epoch:
            by_epoch[key] = c
    if epochs is not None:
        chosen = []
        for e in epochs:
            epoch = nearest_epoch(e, sorted({c.epoch for c in found}), run_dir)
            if epoch is None:
                raise CheckpointError(f"no checkpoint at epoch {e:g} in {run_dir}; available: "
                                      f"{', '.join(f'{c.epoch:g}' for c in found) or 'none'}")
            chosen.append(by_epoch.get(round(epoch, 9)) or
                          next(c for c in found if c.epoch == epoch))
        return chosen
    if not by_epoch:
        kinds = "epoch_*/step_*" if steps else "epoch_*"
        raise CheckpointError(f"no {kinds} checkpoints in {run_dir}; train it first "
                              f"(tools/train.py)")
    return sorted(by_epoch.values(), key=lambda c: c.step)


def load_model(cfg: Config, ckpt: str | CheckpointInfo, device="cpu", num_classes=None):
    """The model of a checkpoint, in eval mode, channels_last as trained."""
    path = ckpt.path if isinstance(ckpt, CheckpointInfo) else ckpt
    state = load_state(path, map_location=device)
    n = num_classes or state.get("num_classes")  # the trainer's, from the dataset
    if n is None:
        raise CheckpointError(f"checkpoint {path} does not record num_classes (written by an "
                              f"older version); pass num_classes, or retrain")
    model = build_model(cfg.model, n, cfg.small_stem).to(device)
    check_fits(model, state, path, f"model {cfg.model} with {n} classes (the run's config.yaml)",
               "the run's config.yaml must name the model its checkpoints were trained with")
    model.load_state_dict(state["model"])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def val_records(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(run_paths(run_dir)["metrics"]) if r.get("split") == "val"]
