"""The command-line tools (argument parsing and printing over one library call each), installed
as ``selectivity.tools``; in a checkout they are plain files (``torchrun tools/train.py``).

The console scripts (pyproject.toml) are the functions below: each runs a tool's ``main`` with the
one-line error handling every tool has (``selectivity.cli.run_cli``).
"""
from __future__ import annotations

import importlib

from selectivity.cli import run_cli


def _runner(tool: str):
    def run() -> None:
        run_cli(importlib.import_module(f"selectivity.tools.{tool}").main)
    run.__name__ = tool
    return run


TOOLS = ("train", "ablate", "cka", "orientation", "plot_selectivity", "plot_regularization",
         "sweep", "build_ffcv")
train, ablate, cka, orientation, plot_selectivity, plot_regularization, sweep, build_ffcv = (
    _runner(t) for t in TOOLS)
