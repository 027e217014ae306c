"""The command-line tools (argument parsing and printing over one library call each), installed
as ``selectivity.tools``; in a checkout they are plain files (``torchrun tools/train.py``), and
each is also ``python -m selectivity.tools.<name>``.

The console scripts (pyproject.toml: ``selectivity-<name>``) are the ``<name>_cli`` functions
below: each runs a tool's ``main`` with the one-line error handling every tool has
(``selectivity.cli.run_cli``). They are not named like the tools, so that
``selectivity.tools.<name>`` stays the tool's module.
"""
from __future__ import annotations

import importlib

from selectivity.cli import run_cli

TOOLS = ("train", "build_ffcv", "ablate", "cka", "orientation", "plot_selectivity",
         "plot_regularization", "study", "sweep", "reproduce", "bench_train", "bench_loader",
         "bench_memory", "bench_selectivity", "bench_epilogue", "bench_ablation", "bench_cka",
         "gpu_check", "gpu_probe_sync")


def _runner(tool: str):
    def run() -> None:
        run_cli(importlib.import_module(f"selectivity.tools.{tool}").main)
    run.__name__ = f"{tool}_cli"
    return run


globals().update({f"{t}_cli": _runner(t) for t in TOOLS})
