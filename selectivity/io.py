"""The one way to write files: atomically, with one error for every failed write.

Every file is written to a temporary name in the same directory, flushed to disk, then renamed over
the target (``os.replace`` is atomic on POSIX), so a killed writer leaves either the old file or
the new one, never a torn one. Every write of the project goes through ``atomic_write``
(checkpoints, config, metrics rewrites, selectivity records, JSON lines, figures), so any failure
to write — whatever the library underneath raised — is the one ``WriteError``:
``cannot write <path>: <reason>``.
"""
from __future__ import annotations

import io
import json
import math
import os
import tempfile

import torch

from selectivity.errors import WriteError


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


def atomic_write(path: str, write_fn) -> None:
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
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(path: str, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def makedirs(path: str) -> None:
    """``os.makedirs(path, exist_ok=True)``, a failure reported like a failed write."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise write_error(path, e) from None


def json_ready(value):
    """Nested dicts / lists of numbers with NaN and inf as null (JSON has neither)."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_jsonl(path: str, records) -> None:
    """Rewrite ``path`` with one JSON object per record, atomically."""
    atomic_write_text(path, "".join(json.dumps(json_ready(r)) + "\n" for r in records))


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSON-lines file (a torn last line from a killed writer is ignored)."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def save_figure(fig, path: str, dpi: int = 120) -> str:
    """Render a matplotlib figure to PNG in memory, then write it atomically; closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    makedirs(os.path.dirname(os.path.abspath(path)))
    atomic_write_bytes(path, buf.getvalue())
    return path
