"""Combining runs: conditions × seeds → means with 95 % intervals, curves with bands, tables.

Every figure and table of a multi-seed study goes through here, so they all say the same thing:

- **The interval is a two-sided 95 % Student-t interval over seeds**: mean ± t(0.975, n−1) · s/√n,
  s the sample standard deviation (ddof = 1) of the per-seed values. Seeds are the independent
  replicates; spreads over units, images or permutations inside one run are *not* intervals here.
  With n = 1 there is no interval (half-width NaN, shown as "n = 1"); with n = 0 the mean is NaN.
- A **run** is a directory written by tools/train.py (``config.yaml``, ``metrics.jsonl``). Its
  **condition** is its config without the keys that only say where or how it ran (seed, name,
  out_dir, threads, …), so runs that differ in their seed alone share a condition whatever their
  names are; the condition's label is the run name without a seed suffix (``alpha_m1_s2`` →
  ``alpha_m1``), or the parent directory's name when the run is named for its seed alone
  (``<study>/alpha_m1/s2`` → ``alpha_m1``), which is the layout tools/study.py writes.
- Val records (``split == "val"``) are read with ``.get`` throughout: ``acc1``, ``loss``, ``si``
  ({layer: mean SI}), ``si_mean``, ``si_null`` and, where the run recorded them, ``si_null_q95``,
  ``si_above_null`` ({layer: fraction of units above their null 95 % quantile}), ``acc1_running``,
  ``bn_mode``; a key a run lacks is a missing value for that run (n says how many had it).
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import yaml

from selectivity.train.runlog import read_metrics, run_paths

CONFIDENCE = 0.95
INTERVAL = "95 % Student-t interval over seeds (mean ± t₀.₉₇₅,ₙ₋₁·s/√n)"
# Keys that say where or how a run ran, not what it is: equal conditions differ only in these.
RUN_ONLY_KEYS = ("seed", "name", "out_dir", "threads", "device", "workers", "progress",
                 "tensorboard", "cache_dir", "log_every_steps", "save_every_epochs",
                 "save_every_steps", "save_steps_epochs")
# "_s2", "-seed3", or the whole name "s0"; not "cls3" (a separator or the start must precede)
_SEED_SUFFIX = re.compile(r"(?:^|[_\-.])(?:seed|s)[_\-]?\d+$")


class AggregateError(ValueError):
    """A directory that is not a run, or runs that cannot be combined; the message says which."""


# ----- statistics --------------------------------------------------------------------------------


def t_quantile(df: int, q: float = 0.5 + CONFIDENCE / 2) -> float:
    """Student-t quantile (scipy's when present; else a table for the small n of seed studies)."""
    try:
        from scipy.stats import t
        return float(t.ppf(q, df))
    except ImportError:  # scipy comes with scikit-learn, so this is a fallback only
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
                 8: 2.306, 9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}
        if q != 0.975:
            raise
        return table.get(df) or table[min(table, key=lambda k: abs(k - df))]


@dataclass
class Summary:
    mean: float
    half: float      # half-width of the 95 % t-interval (NaN for n < 2)
    n: int
    sd: float
    values: list = field(default_factory=list)

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
        """``0.812 ± 0.021 (n = 3)``; ``0.812 (n = 1)`` without an interval; ``– (n = 0)``."""
        if self.n == 0 or not math.isfinite(self.mean):
            return "– (n = 0)"
        m = f"{self.mean * scale:.{digits}f}"
        if not math.isfinite(self.half):
            return f"{m} (n = {self.n})"
        return f"{m} ± {self.half * scale:.{digits}f} (n = {self.n})"


def summarize(values) -> Summary:
    """Mean, 95 % t-interval half-width, n and sd of the finite values (None/NaN are dropped)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, [])
    mean = float(np.mean(vals))
    if n == 1:
        return Summary(mean, math.nan, 1, math.nan, vals)
    sd = float(np.std(vals, ddof=1))
    return Summary(mean, t_quantile(n - 1) * sd / math.sqrt(n), n, sd, vals)


# ----- runs and conditions -----------------------------------------------------------------------


@dataclass
class Run:
    path: str
    name: str
    config: dict
    val: list
    train: list

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def final(self) -> dict:
        return self.val[-1] if self.val else {}


def load_run(path: str) -> Run:
    paths = run_paths(path)
    if not os.path.exists(paths["config"]):
        raise AggregateError(f"not a run directory (no config.yaml): {path}")
    with open(paths["config"]) as f:
        config = yaml.safe_load(f) or {}
    records = read_metrics(paths["metrics"])
    return Run(path, os.path.basename(os.path.normpath(path)), config,
               [r for r in records if r.get("split") == "val"],
               [r for r in records if r.get("split") == "train"])


def condition_key(config: dict) -> str:
    """What the run *is*: its config without the run-only keys, as a stable string."""
    return yaml.safe_dump({k: v for k, v in sorted(config.items()) if k not in RUN_ONLY_KEYS})


def condition_label(run: Run) -> str:
    stripped = _SEED_SUFFIX.sub("", run.name)
    if stripped and stripped != run.name:
        return stripped
    if not stripped:  # the run is named for its seed alone: the folder above names the condition
        return os.path.basename(os.path.dirname(os.path.abspath(run.path)))
    return run.name


def group_runs(runs: list[Run]) -> "OrderedDict[str, list[Run]]":
    """label → runs of one condition (first-seen order). Two different configs that would get the
    same label are told apart by a numeric suffix, so no figure mixes conditions."""
    by_key: "OrderedDict[str, list[Run]]" = OrderedDict()
    for run in runs:
        by_key.setdefault(condition_key(run.config), []).append(run)
    out: "OrderedDict[str, list[Run]]" = OrderedDict()
    for members in by_key.values():
        label = condition_label(members[0])
        base, k = label, 2
        while label in out:
            label, k = f"{base}#{k}", k + 1
        out[label] = sorted(members, key=lambda r: (r.seed is None, r.seed))
    return out


def load_groups(paths: list[str]) -> "OrderedDict[str, list[Run]]":
    return group_runs([load_run(p) for p in paths])


# ----- values from records -----------------------------------------------------------------------


def record_value(record: dict, key: str, layer: str | None = None):
    """A scalar from one val record: ``key`` itself when it is a number; for a per-layer dict
    (``si``, ``si_above_null``, …) the value of ``layer``, or the mean over layers (each layer
    weighted equally) when ``layer`` is None. None where the record lacks it."""
    v = record.get(key)
    if isinstance(v, dict):
        if layer is not None:
            v = v.get(layer)
        else:
            vals = [x for x in v.values() if isinstance(x, (int, float))]
            v = float(np.mean(vals)) if vals else None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def final_values(runs: list[Run], key: str, layer: str | None = None) -> list:
    """Per run, the value at its last val record (runs without val records give None)."""
    return [record_value(r.final, key, layer) if r.val else None for r in runs]


def at_epoch(run: Run, epoch: float, key: str, layer: str | None = None, tol: float = 1e-6):
    """The value of the val record at ``epoch`` (None if the run has no record there)."""
    for rec in run.val:
        e = rec.get("epoch")
        if e is not None and abs(float(e) - epoch) <= tol:
            return record_value(rec, key, layer)
    return None


def peak(run: Run, key: str, layer: str | None = None):
    """(epoch, value) of the largest value of ``key`` over the run's val records."""
    best = (None, None)
    for rec in run.val:
        v = record_value(rec, key, layer)
        if v is not None and (best[1] is None or v > best[1]):
            best = (float(rec["epoch"]), v)
    return best


@dataclass
class Curve:
    epochs: np.ndarray
    mean: np.ndarray
    half: np.ndarray
    n: np.ndarray


def curve(runs: list[Run], key: str, layer: str | None = None) -> Curve:
    """Mean over seeds and 95 % t-band at every epoch any run evaluated (epochs matched to 1e-6;
    n per epoch says how many runs had a value there)."""
    epochs = sorted({round(float(r["epoch"]), 6) for run in runs for r in run.val
                     if r.get("epoch") is not None})
    return curve_from(epochs, lambda e: [at_epoch(run, e, key, layer) for run in runs])


def curve_from(epochs, values_at) -> Curve:
    """The mean over seeds and 95 % t-band at each of ``epochs``; ``values_at(epoch)`` gives that
    epoch's per-seed values (None where a seed has none)."""
    stats = [summarize(values_at(e)) for e in epochs]
    return Curve(np.array(epochs, dtype=float), np.array([s.mean for s in stats]),
                 np.array([s.half for s in stats]), np.array([s.n for s in stats]))


def layers_of(runs: list[Run], key: str = "si") -> list[str]:
    """The layer names of a per-layer key, in the order the first run that has them logged."""
    for run in runs:
        for rec in run.val:
            if isinstance(rec.get(key), dict):
                return list(rec[key])
    return []


# ----- output ------------------------------------------------------------------------------------


def plot_band(ax, c: Curve, label: str | None = None, color=None, scale: float = 1.0,
              linestyle: str = "-", marker: str | None = "."):
    """Mean line with its 95 % band (where n ≥ 2) on a matplotlib axis."""
    ok = np.isfinite(c.mean)
    line, = ax.plot(c.epochs[ok], c.mean[ok] * scale, color=color, linestyle=linestyle,
                    marker=marker, markersize=3, label=label)
    band = ok & np.isfinite(c.half)
    if band.any():
        ax.fill_between(c.epochs[band], (c.mean[band] - c.half[band]) * scale,
                        (c.mean[band] + c.half[band]) * scale, color=line.get_color(),
                        alpha=0.2, linewidth=0)
    return line


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def final_table(groups: "OrderedDict[str, list[Run]]",
                keys=("acc1", "si_mean", "si_null", "si_above_null")) -> str:
    """One row per condition: the final val value of every key, mean ± half-width (n)."""
    rows = [[label] + [summarize(final_values(runs, k)).fmt(4) for k in keys]
            for label, runs in groups.items()]
    return markdown_table(["condition"] + [f"final {k}" for k in keys], rows)


def main(argv=None) -> None:
    """``python -m selectivity.study.aggregate RUN [RUN ...]``: the final-value table of the runs,
    grouped into conditions (mean ± 95 % t-interval over seeds, n)."""
    import argparse
    import sys
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("runs", nargs="+", help="run directories (e.g. runs/study/*/s*)")
    p.add_argument("--keys", nargs="+", default=["acc1", "si_mean", "si_null", "si_above_null"],
                   help="val-record keys to tabulate (their final values)")
    args = p.parse_args(argv)
    try:
        groups = load_groups(args.runs)
    except AggregateError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(final_table(groups, tuple(args.keys)))
    print(f"\n± : {INTERVAL}; n: runs with the value")


if __name__ == "__main__":
    main()
