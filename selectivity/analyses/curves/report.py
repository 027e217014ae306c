"""The selectivity figures of one or more runs as ``tools/plot_selectivity.py`` reports them:
``report`` draws ``si_by_stage.png`` and a ``si_heatmap_<run>.png`` per run and hands each run's
final mean SI per stage to ``echo``."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Sequence

from selectivity.analyses.common import run_label
from selectivity.analyses.curves.run import load_evals, stage_series
from selectivity.errors import CheckpointError
from selectivity.train.checkpoint import makedirs


def default_out(runs: Sequence[str]) -> str:
    """One run: its figures/. Several: a new folder beside the first run, named for the
    comparison (compare_<a>_vs_<b>...), so no run's own figures are overwritten."""
    if len(runs) == 1:
        return os.path.join(runs[0], "figures")
    labels = [run_label(r) for r in runs]
    parent = os.path.dirname(os.path.abspath(os.path.normpath(runs[0])))
    return os.path.join(parent, "compare_" + "_vs_".join(labels))


def final_line(label: str, series: dict) -> str:
    """A run's last mean SI per stage, with its null (and the null's 95 % quantile)."""
    last = {st: (v["si"][-1], v["null"][-1], v["null_top"][-1], v["band"])
            for st, v in series.items()}
    return f"{label}: final mean SI by stage " + ", ".join(
        f"{st} {si:.3f} (null {nl:.3f}" + (f", 95 % quantile {top:.3f})" if band == {"q95"}
                                           else ")")
        for st, (si, nl, top, band) in last.items())


def report(runs: Sequence[str], out: str | None = None,
           echo: Callable[[str], None] = print) -> list[str]:
    """The figures of ``runs`` into ``out`` (default ``default_out(runs)``); returns the paths."""
    from selectivity.analyses.curves.figures import plot_heatmap, plot_stages

    for run in runs:
        if not os.path.isdir(run):
            raise CheckpointError(f"run directory not found: {run}")
    out = out or default_out(runs)
    makedirs(out)
    series, written = OrderedDict(), []
    for run in runs:
        evals = load_evals(run)
        label = run_label(run)
        series[label] = stage_series(evals)
        path = os.path.join(out, f"si_heatmap_{label}.png")
        plot_heatmap(run, evals, path)
        written.append(path)
    path = os.path.join(out, "si_by_stage.png")
    plot_stages(series, path)
    written.insert(0, path)
    for label, s in series.items():
        echo(final_line(label, s))
    echo("wrote " + ", ".join(written))
    return written
