"""Checkpoints: atomic writes, RNG state, and finding the last good checkpoint.

Every file is written to a temporary name in the same directory, flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX), so a killed run leaves either the old file or the
new one, never a torn one. ``last.pt`` is a hard link to the newest ``epoch_*.pt`` /
``step_*.pt`` (no second copy on disk). Loading falls back past any file that does not load.

Every write of the project goes through ``_atomic_write`` (checkpoints, config, metrics rewrites,
selectivity records; figures via selectivity/io.py), so any failure to write — whatever the
library underneath raised — is the one ``WriteError``: ``cannot write <path>: <reason>``.
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

from . import faults
from .errors import CheckpointError, WriteError  # noqa: F401  (importable from here too)


class _RecordingFile:
    """A binary file that remembers the first OSError raised by its writes. torch.save turns a
    failed write into a RuntimeError ("[enforce fail at inline_container.cc…]") that has lost the
    errno; the recorded OSError still has the real reason (No space left on device, …)."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        try:
            return self._f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _reason(e: BaseException) -> str:
    """One line saying why a write failed, whatever the library raised."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def write_error(path: str, e: BaseException) -> WriteError:
    """The one error of every failed write: ``cannot write <path>: <reason>; …``."""
    return WriteError(f"cannot write {path}: {_reason(e)}; free disk space or fix permissions of "
                      f"{os.path.dirname(os.path.abspath(path))} (earlier files are intact)")


def _atomic_write(path: str, write_fn) -> None:
    """Write via ``write_fn(file)`` to a temp file in the same directory, fsync, rename over
    ``path``. On any failure the temp file is removed, ``path`` is untouched, and the failure is
    a ``WriteError`` naming ``path`` and the reason, whatever exception type the writer raised
    (torch.save: RuntimeError; matplotlib, tensorboard: their own)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp, rec = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
        with os.fdopen(fd, "wb") as f:
            rec = _RecordingFile(f)
            write_fn(rec)
            rec.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, WriteError) or not isinstance(e, Exception):
            raise  # already reported, or Ctrl-C / SystemExit: not a write failure
        raise write_error(path, (rec.error if rec is not None else None) or e) from None


def atomic_write_text(path: str, text: str) -> None:
    _atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: str, obj) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def makedirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, a failure reported like a failed write."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None


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

    _atomic_write(path, write)
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
        _atomic_write(last, lambda f: torch.save(state, f))
    return path


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
