"""Checkpoints: RNG state, saving, and finding the last good checkpoint.

Every checkpoint is written with ``selectivity.io.atomic_write`` (a temp file renamed over the
target), so a killed run leaves either the old file or the new one, never a torn one, and a failed
write is the one ``WriteError``. ``last.pt`` is a hard link to the newest ``epoch_*.pt`` /
``step_*.pt`` (no second copy on disk). Loading falls back past any file that does not load.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tempfile
import warnings

import numpy as np
import torch

from selectivity.train import faults
from selectivity.errors import CheckpointError, WriteError  # noqa: F401  (importable from here too)
from selectivity.io import (atomic_torch_save, atomic_write, atomic_write_bytes,  # noqa: F401
                            atomic_write_text, makedirs, write_error)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: dict, ckpt_dir: str, filename: str) -> str:
    """Write ``state`` to ckpt_dir/filename atomically and point last.pt at it."""
    makedirs(ckpt_dir)
    path = os.path.join(ckpt_dir, filename)

    def write(f):
        torch.save(state, f)
        faults.maybe_fault("checkpoint_write")  # tests: killed with the file half-done
        faults.maybe_fault("disk_full")  # tests: the write fails

    atomic_write(path, write)
    last = os.path.join(ckpt_dir, "last.pt")
    tmp_link = os.path.join(ckpt_dir, ".tmp-last.pt")
    try:
        if os.path.lexists(tmp_link):
            os.unlink(tmp_link)
        os.link(path, tmp_link)
        os.replace(tmp_link, last)
    except OSError:  # filesystems without hard links: a second atomic copy
        if os.path.lexists(tmp_link):
            os.unlink(tmp_link)
        atomic_write(last, lambda f: torch.save(state, f))
    return path


def check_fits(model, state: dict, path: str, what: str, fix: str) -> None:
    """The checkpoint's weights have ``model``'s names and shapes: a changed model or class count
    is a one-line ``CheckpointError`` (``... does not fit <what>: <problems>; <fix>``), not
    load_state_dict's screen-long traceback."""
    own, theirs = model.state_dict(), state.get("model")
    if not isinstance(theirs, dict):
        raise CheckpointError(f"checkpoint {path} holds no model weights")
    problems = [f"{k} missing" for k in own if k not in theirs] + \
        [f"{k} unexpected" for k in theirs if k not in own] + \
        [f"{k} {tuple(theirs[k].shape)} vs {tuple(own[k].shape)}" for k in own
         if k in theirs and tuple(getattr(theirs[k], "shape", ())) != tuple(own[k].shape)]
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {path} does not fit {what}: "
                              f"{'; '.join(problems[:3])}{more}; {fix}")


def _order_key(path: str):
    m = re.search(r"(epoch|step)_(\d+)", os.path.basename(path))
    return int(m.group(2)) if m else -1


def checkpoint_paths(ckpt_dir: str) -> list[str]:
    """Saved checkpoints, newest first by training step recorded in the name."""
    paths = glob.glob(os.path.join(ckpt_dir, "epoch_*.pt")) + \
        glob.glob(os.path.join(ckpt_dir, "step_*.pt"))
    return sorted(paths, key=lambda p: (os.path.getmtime(p), _order_key(p)), reverse=True)


def remove_stale_temp_files(directories) -> list[str]:
    """Delete ``.tmp-*`` files left by writes that were killed before their rename."""
    removed = []
    for d in directories:
        for path in glob.glob(os.path.join(d, ".tmp-*")):
            os.unlink(path)
            removed.append(path)
    return removed


def load_state(path: str, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=False)


def load_last_good(ckpt_dir: str, map_location="cpu") -> tuple[dict, str] | None:
    """The newest checkpoint that loads: last.pt, else epoch/step files newest first."""
    candidates = [os.path.join(ckpt_dir, "last.pt")] + checkpoint_paths(ckpt_dir)
    for path in candidates:
        if not os.path.exists(path):
            continue
        try:
            return load_state(path, map_location), path
        except Exception as e:  # a torn or foreign file: say so, try the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {e}")
    return None
