"""selectivity/aggregate.py: t-intervals, grouping runs by condition, curves, tables."""
import json
import math
import os

import numpy as np
import pytest
import yaml

from selectivity.study import aggregate as agg


def make_run(path, seed, acc_by_epoch, si_by_epoch=None, name=None, extra=None, **config):
    """A fake run directory: config.yaml and val records (older runs lack the newer keys)."""
    os.makedirs(path, exist_ok=True)
    cfg = {"dataset": "digits_hard", "model": "resnet20", "epochs": len(acc_by_epoch) - 1,
           "selectivity_reg": [], "seed": seed, "name": name or os.path.basename(path),
           "out_dir": os.path.dirname(path), **config}
    with open(os.path.join(path, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        for e, acc in enumerate(acc_by_epoch):
            rec = {"split": "val", "epoch": e, "step": 10 * e, "acc1": acc, "loss": 1.0}
            if si_by_epoch is not None:
                rec["si"] = {"layer1.0": si_by_epoch[e], "layer2.0": 2 * si_by_epoch[e]}
                rec["si_mean"] = 1.5 * si_by_epoch[e]
            rec.update(extra or {})
            f.write(json.dumps(rec) + "\n")
            f.write(json.dumps({"split": "train", "epoch": e + 0.5, "loss": 2.0}) + "\n")
    return path


def test_t_interval_matches_the_formula():
    s = agg.summarize([1.0, 2.0, 3.0, None, float("nan")])
    assert s.n == 3 and s.mean == pytest.approx(2.0)
    assert s.half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)  # t(0.975, 2)
    one = agg.summarize([0.5])
    assert one.n == 1 and math.isnan(one.half) and one.fmt() == "0.500 (n = 1)"
    assert agg.summarize([]).fmt() == "– (n = 0)"
    assert "±" in s.fmt() and "(n = 3)" in s.fmt()


def test_groups_by_config_not_name_and_curves(tmp_path):
    # layout of tools/study.py (<cond>/s<seed>) and a flat one (<cond>_s<seed>)
    a = [make_run(str(tmp_path / "study" / "alpha_0" / f"s{s}"), s, [0.1, 0.5 + 0.1 * s],
                  [0.0, 0.2 + 0.01 * s]) for s in range(3)]
    b = [make_run(str(tmp_path / f"alpha_m1_s{s}"), s, [0.1, 0.4], [0.0, 0.1],
                  selectivity_reg=[{"alpha": -1.0}]) for s in range(2)]
    groups = agg.load_groups(a + b)
    assert list(groups) == ["alpha_0", "alpha_m1"]
    assert [r.seed for r in groups["alpha_0"]] == [0, 1, 2]
    c = agg.curve(groups["alpha_0"], "acc1")
    assert list(c.epochs) == [0.0, 1.0] and list(c.n) == [3, 3]
    assert c.mean[1] == pytest.approx(0.6) and c.half[0] == pytest.approx(0, abs=1e-12)
    # a per-layer key: one layer, or the mean over layers
    assert agg.curve(groups["alpha_0"], "si", "layer2.0").mean[1] == pytest.approx(0.42)
    assert agg.final_values(groups["alpha_m1"], "si") == [pytest.approx(0.15)] * 2
    assert agg.layers_of(groups["alpha_0"]) == ["layer1.0", "layer2.0"]
    table = agg.final_table(groups)
    assert "| alpha_0 | 0.6000 ±" in table and "(n = 3)" in table and "(n = 2)" in table
    # keys older runs lack are missing values, not errors
    assert "– (n = 0)" in table


def test_same_label_different_configs_are_not_mixed(tmp_path):
    r1 = make_run(str(tmp_path / "x" / "cond" / "s0"), 0, [0.1, 0.2])
    r2 = make_run(str(tmp_path / "y" / "cond" / "s0"), 0, [0.1, 0.3], lr=0.05)
    groups = agg.load_groups([r1, r2])
    assert len(groups) == 2 and all(len(v) == 1 for v in groups.values())


def test_newer_keys_read_with_get(tmp_path):
    run = make_run(str(tmp_path / "c" / "s0"), 0, [0.1, 0.2], [0.0, 0.1],
                   extra={"si_null_q95": 0.05, "si_above_null": {"layer1.0": 0.5,
                                                                 "layer2.0": 1.0}})
    r = agg.load_run(run)
    assert agg.record_value(r.final, "si_above_null") == pytest.approx(0.75)
    assert agg.record_value(r.final, "si_above_null", "layer1.0") == 0.5
    assert agg.record_value(r.final, "acc1_running") is None
    assert agg.peak(r, "si_mean") == (1.0, pytest.approx(0.15))


def test_not_a_run(tmp_path):
    with pytest.raises(agg.AggregateError, match="no config.yaml"):
        agg.load_run(str(tmp_path))


def test_plot_band_draws_a_band(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [agg.load_run(make_run(str(tmp_path / "c" / f"s{s}"), s, [0.1, 0.2 + s / 10]))
            for s in range(3)]
    fig, ax = plt.subplots()
    agg.plot_band(ax, agg.curve(runs, "acc1"), "acc")
    assert len(ax.collections) == 1  # the fill_between band
    plt.close(fig)
    assert np.isfinite(agg.curve(runs, "acc1").half).all()


def test_command_line_table_and_bad_input(tmp_path, capsys):
    runs = [make_run(str(tmp_path / "c" / f"s{s}"), s, [0.1, 0.2 + s / 10]) for s in range(3)]
    agg.main(runs + ["--keys", "acc1"])
    out = capsys.readouterr().out
    assert "| c | 0.3000 ±" in out and "(n = 3)" in out and "Student-t" in out
    with pytest.raises(SystemExit) as e:
        agg.main([str(tmp_path)])
    assert e.value.code == 2 and "no config.yaml" in capsys.readouterr().err


def test_condition_labels():
    def label(path):
        return agg.condition_label(agg.Run(path, os.path.basename(path), {}, [], []))
    assert label("/r/alpha_m1_s2") == "alpha_m1"
    assert label("/r/study/early/s0") == "early"
    assert label("/r/demo_cls3") == "demo_cls3"  # "s3" inside a word is not a seed
