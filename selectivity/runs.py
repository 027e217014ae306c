"""Reading a finished (or running) run directory: its config, checkpoints, model and data.

The analysis tools (ablate, cka, orientation, plots) start here, so they all agree on what a
checkpoint's "epoch" is and rebuild the model and data exactly as training did.
"""
from __future__ import annotations

import dataclasses
import os
import re

import torch

from .checkpoint import CheckpointError, load_state
from .config import Config, load_config
from .models import build_model
from .runlog import read_metrics, run_paths


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
            state = torch.load(os.path.join(ckpt_dir, f), map_location="cpu", weights_only=False,
                               mmap=True)
            epoch = state["epoch"] + state["batch_in_epoch"] / max(_steps_per_epoch(state), 1)
            out.append(CheckpointInfo(os.path.join(ckpt_dir, f), epoch, state["step"]))
    return sorted(out, key=lambda c: c.step)


def _steps_per_epoch(state: dict) -> int:
    return state.get("steps_per_epoch", 0)


def select_checkpoints(run_dir: str, epochs: list[float] | None) -> list[CheckpointInfo]:
    """The checkpoints at the given epochs (all when None); a missing epoch is an error."""
    ckpts = list_checkpoints(run_dir)
    if epochs is None:
        return ckpts
    chosen = []
    for e in epochs:
        match = [c for c in ckpts if abs(c.epoch - e) < 1e-9]
        if not match:
            raise CheckpointError(f"no checkpoint at epoch {e} in {run_dir}; available: "
                                  f"{', '.join(f'{c.epoch:g}' for c in ckpts)}")
        chosen.append(match[0])
    return chosen


def load_model(cfg: Config, ckpt: str | CheckpointInfo, device="cpu", num_classes=None):
    """The model of a checkpoint, in eval mode, channels_last as trained."""
    path = ckpt.path if isinstance(ckpt, CheckpointInfo) else ckpt
    state = load_state(path, map_location=device)
    n = num_classes or state["model"]["fc.weight"].shape[0]
    model = build_model(cfg.model, n, cfg.small_stem).to(device)
    model.load_state_dict(state["model"])
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def val_records(run_dir: str) -> list[dict]:
    return [r for r in read_metrics(run_paths(run_dir)["metrics"]) if r.get("split") == "val"]
