"""Fault injection for the reliability tests.

``SELECTIVITY_FAULT=<point>:<n>`` triggers a fault the n-th time (1-based) execution passes
``maybe_fault(<point>)``. Points and what they do:
  train_step        SIGKILL after a step's optimizer update
  eval_batch        SIGKILL inside an evaluation
  checkpoint_write  SIGKILL with a checkpoint half-written, before its rename
  disk_full         raise OSError(ENOSPC) while writing a checkpoint
  nan_loss          make a training step's loss NaN (the caller asks ``maybe_fault`` and acts)
Unset, each call costs one string comparison.
"""
from __future__ import annotations

import errno
import os
import signal

_SPEC = os.environ.get("SELECTIVITY_FAULT", "")
_POINT, _, _N = _SPEC.partition(":")
_counts: dict[str, int] = {}


def maybe_fault(point: str) -> bool:
    """Trigger the configured fault if this is its point and occurrence; True for nan_loss."""
    if point != _POINT:
        return False
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(_N or 1):
        return False
    if point == "disk_full":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if point == "nan_loss":
        return True
    os.kill(os.getpid(), signal.SIGKILL)
    return False
