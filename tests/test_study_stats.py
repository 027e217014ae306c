"""The study's statistics and rules on hand-made numbers with known answers (selectivity.study:
stats, rules, pilot, claims)."""
import json
import math

import pytest

from selectivity.study import aggregate as agg
from selectivity.study import pilot, rules, stats
from selectivity.study.claims import StudyData, evaluate
from selectivity.train.config import ConfigError


def test_paired_interval_and_tests():
    p = stats.paired({0: 1.0, 1: 2.0, 2: 3.0, 3: -0.5, 4: None, 5: math.nan})
    assert p.n == 4 and p.values == {0: 1.0, 1: 2.0, 2: 3.0, 3: -0.5}
    ref = agg.summarize([1.0, 2.0, 3.0, -0.5])
    assert (p.summary.mean, p.summary.half) == (ref.mean, ref.half)
    # exact signed-rank: ranks 2, 3, 4 positive, 1 negative → W- = 1; P(W ≤ 1) = 2/16, two-sided
    assert p.wilcoxon_p == pytest.approx(0.25)
    assert p.sign_p == pytest.approx(10 / 16)  # 3 of 4 positive: 2 · (4 + 1) / 16
    zeros = stats.paired({0: 0.0, 1: 0.0})
    assert zeros.wilcoxon_p == 1.0 and zeros.sign_p == 1.0
    assert math.isnan(stats.paired({0: 1.0}).wilcoxon_p)


def test_exact_rates_and_fisher():
    lo, hi = stats.clopper_pearson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** (1 / 10))
    lo, hi = stats.clopper_pearson(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** (1 / 10))
    assert stats.fisher(5, 5, 0, 5) == pytest.approx(2 / 252)  # the two extreme tables of C(10, 5)
    assert stats.fisher(1, 5, 1, 5) == pytest.approx(1.0)


def test_power_and_n():
    # paired t, d = 1, 5 % two-sided: n = 10 is the first with power ≥ 0.8 (0.803; n = 9: 0.759)
    assert stats.n_for_power(1.0, 1.0) == 10
    assert stats.power(9, 1.0, 1.0) < 0.8 <= stats.power(10, 1.0, 1.0)
    assert stats.n_for_power(0.5, 1.0) < stats.n_for_power(1.0, 1.0) < stats.n_for_power(2.0, 1.0)
    assert stats.n_for_power(math.nan, 1.0) is None
    assert stats.half_width(10, 1.0) == pytest.approx(2.262157 / math.sqrt(10), rel=1e-5)


def _p(values):
    return stats.paired(dict(enumerate(values)))


@pytest.mark.parametrize("kind,acc,si,want", [
    ("mild", [-0.005, -0.004, -0.006], [-0.1, -0.11, -0.09], "supports"),
    ("mild", [-0.05, -0.06, -0.055], [-0.1, -0.11, -0.09], "contradicts"),
    ("mild", [-0.05, 0.04, 0.0], [-0.1, -0.11, -0.09], "inconclusive"),
    ("costs", [-0.02, -0.025, -0.03], [-0.1, -0.11, -0.09], "supports"),
    ("costs", [-0.2, -0.25, -0.22], [-0.1, -0.11, -0.09], "contradicts"),
    ("hurts", [-0.02, -0.025, -0.03], [0.1, 0.11, 0.09], "supports"),
    ("hurts", [0.02, 0.025, 0.03], [0.1, 0.11, 0.09], "contradicts"),
    ("above", [0.02, 0.025, 0.03], None, "supports"),
    ("above", [-0.02, -0.025, -0.03], None, "contradicts"),
    ("above", [0.02], None, "inconclusive"),
])
def test_verdict_kinds(kind, acc, si, want):
    rule = rules.Rule("x", "alpha", "x", kind, ("acc", "si") if si else ("acc",), 0.02, "points")
    got = {"acc": _p(acc)}
    if si:
        got["si"] = _p(si)
    assert rules.verdict(rule, got) == want


def test_early_above_needs_the_pilot_peak_in_the_first_half():
    rule = rules.BY_ID["emergence"]
    st = {"si_minus_null": _p([0.05, 0.06, 0.07])}
    assert rules.verdict(rule, st, peak_in_first_half=True) == "supports"
    assert rules.verdict(rule, st, peak_in_first_half=False) == "inconclusive"


def test_every_rule_has_text_and_its_statistics():
    data = StudyData({})
    results = evaluate(data)  # no runs: every claim inconclusive, nothing raises
    assert set(results) == set(rules.BY_ID)
    assert all(r.verdict == "inconclusive" for r in results.values())
    for r in rules.RULES:
        assert rules.rule_text(r) and r.stats[0] in results[r.id].stats


def test_pilot_record_pins_the_rules(tmp_path):
    path = tmp_path / "pilot.json"
    record = {"rules": rules.fingerprint(), "peak_epoch": None, "n": {"alpha_0": 6}}
    assert pilot.fix(record, str(path)) == record
    assert pilot.fix(dict(record), str(path))["n"] == {"alpha_0": 6}  # same record: accepted
    with pytest.raises(ConfigError, match="no longer give the record"):
        pilot.fix(dict(record, n={"alpha_0": 7}), str(path))
    path.write_text(json.dumps(dict(record, rules="0" * 16)))
    with pytest.raises(ConfigError, match="rules changed since the pilot"):
        pilot.fix(record, str(path))


@pytest.mark.parametrize("kind,worse,want", [
    ("hurts", 1, "supports"), ("hurts", -1, "contradicts"), ("costs", 1, "contradicts"),
    ("mild", 1, "contradicts"), ("mild", -1, "supports"), ("above", 1, "contradicts"),
    ("above", -1, "supports"), ("little", 1, "contradicts")])
def test_rates_decide_an_accuracy_comparison_when_they_differ(kind, worse, want):
    rule = rules.Rule("x", "alpha", "x", kind, ("acc", "si"), 0.02, "points")
    assert rules.verdict(rule, {}, worse=worse) == want  # no learned pairs needed
    assert rules.verdict(rule, {}, worse=0) == "inconclusive"
