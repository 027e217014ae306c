"""Fault injection for the reliability tests: kill the process at a named point.

``SELECTIVITY_FAULT=<point>:<n>`` sends SIGKILL to this process the n-th time (1-based) execution
passes ``maybe_fault(<point>)``. Points: ``train_step`` (after a step's optimizer update),
``eval_batch`` (inside an evaluation), ``checkpoint_write`` (with a checkpoint half-written, before
its rename). Unset, each call costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("SELECTIVITY_FAULT", "")
_POINT, _, _N = _SPEC.partition(":")
_counts: dict[str, int] = {}


def maybe_fault(point: str) -> None:
    if point != _POINT:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(_N or 1):
        os.kill(os.getpid(), signal.SIGKILL)
