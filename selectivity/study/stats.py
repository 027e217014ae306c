"""The study's statistics: paired differences over seeds (t-interval, Wilcoxon signed-rank and
sign test), exact rates (Clopper–Pearson) compared by Fisher's exact test, and the number of
seeds a paired t-test needs for a given power. scipy computes every distribution; this module only
says which test answers which question."""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from selectivity.study import aggregate as agg

LEVEL = 0.05  # two-sided: every interval is 95 %, every test at 5 %
POWER = 0.80


@dataclass
class Paired:
    """Per-seed values (paired differences, or one condition's values) and what they say."""
    values: dict          # {seed: value}, finite values only
    summary: agg.Summary  # mean ± the 95 % t half-width, n
    wilcoxon_p: float     # Wilcoxon signed-rank, two-sided, exact where scipy can (NaN: n < 2)
    sign_p: float         # sign test (binomial on the signs, zeros dropped), two-sided

    @property
    def n(self) -> int:
        return self.summary.n

    @property
    def sd(self) -> float:
        return self.summary.sd

    def fmt(self, digits: int = 3, scale: float = 1.0) -> str:
        if not self.n:
            return "–"
        tests = "" if self.n < 2 else (f"; Wilcoxon p = {self.wilcoxon_p:.2g}, "
                                       f"sign p = {self.sign_p:.2g}")
        return self.summary.fmt(digits, scale) + tests


def paired(values: dict) -> Paired:
    """``values``: {seed: value or None}; None and non-finite values are left out."""
    vals = {s: float(v) for s, v in sorted(values.items())
            if v is not None and math.isfinite(v)}
    x = list(vals.values())
    w = s = math.nan
    if len(x) >= 2:
        nonzero = [v for v in x if v != 0]
        if not nonzero:
            w = s = 1.0  # every difference is exactly 0: no evidence either way
        else:
            w = float(stats.wilcoxon(x, zero_method="wilcox").pvalue)
            s = float(stats.binomtest(sum(v > 0 for v in nonzero), len(nonzero)).pvalue)
    return Paired(vals, agg.summarize(x), w, s)


def differences(a: dict, b: dict) -> dict:
    """{seed: a − b} over the seeds both have (a value each)."""
    return {s: a[s] - b[s] for s in a if s in b and a[s] is not None and b[s] is not None}


def clopper_pearson(k: int, n: int) -> tuple[float, float]:
    """The exact 95 % interval of a rate k/n."""
    if n == 0:
        return (math.nan, math.nan)
    ci = stats.binomtest(k, n).proportion_ci(1 - LEVEL, method="exact")
    return (float(ci.low), float(ci.high))


def fisher(k1: int, n1: int, k2: int, n2: int) -> float:
    """Fisher's exact test (two-sided) of k1/n1 against k2/n2."""
    if n1 == 0 or n2 == 0:
        return math.nan
    return float(stats.fisher_exact([[k1, n1 - k1], [k2, n2 - k2]]).pvalue)


def power(n: int, sd: float, effect: float) -> float:
    """Power of the two-sided paired t-test at level LEVEL with n seeds, for a true mean
    difference ``effect`` and a per-seed spread ``sd`` (noncentral t)."""
    if n < 2:
        return 0.0
    if sd == 0:
        return 1.0
    df = n - 1
    t = stats.t.ppf(1 - LEVEL / 2, df)
    nc = abs(effect) / sd * math.sqrt(n)
    return float(stats.nct.sf(t, df, nc) + stats.nct.cdf(-t, df, nc))


def n_for_power(sd: float, effect: float, n_max: int = 1000) -> int | None:
    """The smallest n (≥ 2) with power ≥ POWER; None if the spread is unknown (NaN) or n_max
    seeds are not enough."""
    if not math.isfinite(sd):
        return None
    for n in range(2, n_max + 1):
        if power(n, sd, effect) >= POWER:
            return n
    return None


def half_width(n: int, sd: float) -> float:
    """The 95 % t half-width n seeds give at a per-seed spread sd."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    return float(stats.t.ppf(1 - LEVEL / 2, n - 1)) * sd / math.sqrt(n)
