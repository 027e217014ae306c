"""The run directory's logs: ``metrics.jsonl`` (one JSON object per line) and TensorBoard.

Only rank 0 writes. On resume from a checkpoint taken at global step S, lines logged after S by the
killed run are dropped (the file is rewritten atomically) and TensorBoard purges events after S,
so a resumed run's logs read exactly like an uninterrupted run's.

A failed write (a full disk, lost permissions) is the one ``cannot write <path>: <reason>``
error, from metrics.jsonl and from TensorBoard alike. A record is appended with a single write of
its whole line; a write that fails part-way is cut off again, so the file always ends on a whole
record.
"""
from __future__ import annotations

import json
import math
import os
import threading

from selectivity.train.checkpoint import atomic_write_text, makedirs, write_error


def run_paths(run_dir: str) -> dict:
    return {k: os.path.join(run_dir, v) for k, v in {
        "config": "config.yaml", "metrics": "metrics.jsonl", "checkpoints": "checkpoints",
        "selectivity": "selectivity", "tb": "tb", "figures": "figures"}.items()}


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    return records


def _clean(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class _LineAppender:
    """An append-only file of whole lines (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(path, e) from None

    def append(self, line: str) -> None:
        data = line.encode()
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:  # os.write may write less than asked
                view = view[os.write(self._fd, view):]
        except OSError as e:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise write_error(self.path, e) from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _TensorBoard:
    """A SummaryWriter whose every failure is the one write error. Its events are written by a
    background thread; a failed write there is re-raised by the writer's next call (and reported
    here), so that thread's own traceback is silenced (``_quiet_tensorboard_threads``)."""

    def __init__(self, logdir: str, purge_step):
        from torch.utils.tensorboard import SummaryWriter
        self._dir = logdir
        _quiet_tensorboard_threads()
        self._writer = self._guard(SummaryWriter)(logdir, purge_step=purge_step)

    def _guard(self, fn):
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 — tensorboard raises many types for a bad write
                raise write_error(self._dir, e) from None
        return call

    def __getattr__(self, name):
        attr = getattr(self._writer, name)
        return self._guard(attr) if callable(attr) else attr


_hook_installed = False


def _quiet_tensorboard_threads() -> None:
    global _hook_installed
    if _hook_installed:
        return
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread":  # tensorboard's event writer
            return
        previous(args)

    threading.excepthook = hook
    _hook_installed = True


class RunLog:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.paths = run_paths(run_dir)
        self.tb = None
        self._file = None
        if not enabled:
            return
        for key in ("checkpoints", "selectivity", "figures"):
            makedirs(self.paths[key])
        keep = [] if resume_step is None else \
            [r for r in read_metrics(self.paths["metrics"]) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.paths["metrics"], "".join(json.dumps(r) + "\n" for r in keep))
        self._file = _LineAppender(self.paths["metrics"])
        if tensorboard:
            self.tb = _TensorBoard(self.paths["tb"], purge_step=resume_step)

    def write(self, record: dict) -> None:
        """Append one record; its numeric top-level values also go to TensorBoard as split/key."""
        if not self.enabled:
            return
        record = _clean(record)
        self._file.append(json.dumps(record) + "\n")
        if self.tb is not None:
            split, step = record.get("split", "train"), record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key not in ("step", "epoch"):
                    self.tb.add_scalar(f"{split}/{key}", value, step)

    def close(self, quiet: bool = False) -> None:
        """Close the files; ``quiet``: on the way out of another error, whose report is the one
        that counts, so a failure to flush TensorBoard is not raised over it."""
        if not self.enabled:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        tb, self.tb = self.tb, None
        if tb is not None:
            try:
                tb.close()
            except Exception:
                if not quiet:
                    raise
