"""Console scripts (``selectivity-train``, ``selectivity-ablate``, …) of an installed package.

The tools stay files in ``tools/`` (so ``torchrun tools/train.py`` works in a checkout); the
package installs that folder as ``selectivity.tools`` and each script runs a tool's ``main`` with
the one-line error handling every tool has.
"""
from __future__ import annotations

import importlib

from selectivity.errors import run_cli


def _runner(tool: str):
    def run() -> None:
        run_cli(importlib.import_module(f"selectivity.tools.{tool}").main)
    run.__name__ = tool
    return run


TOOLS = ("train", "ablate", "cka", "orientation", "plot_selectivity", "plot_regularization",
         "sweep", "build_ffcv")
train, ablate, cka, orientation, plot_selectivity, plot_regularization, sweep, build_ffcv = (
    _runner(t) for t in TOOLS)
