"""The rule behind most verdicts of the findings: where a statistic's 95 % interval over seeds
lies."""
from __future__ import annotations

import math

from selectivity.study import aggregate as agg


def verdict_interval(s: agg.Summary, above: float = 0.0) -> str:
    """supports if the interval lies above ``above``, contradicts if below, else inconclusive."""
    if s.n < 2 or not math.isfinite(s.half):
        return "inconclusive"
    if s.low > above:
        return "supports"
    if s.high < above:
        return "contradicts"
    return "inconclusive"
