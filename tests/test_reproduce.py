"""tools/study.py (conditions × seeds, resumable) and tools/reproduce.py --tiny end to end."""
import json
import os
import re

import pytest
import yaml

from conftest import ROOT
from selectivity.study import analysis_runs, analysis_values, claims, conditions, design, runner
from selectivity.train.config import ConfigError


def finished_run(run_dir, epochs):
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    open(os.path.join(run_dir, "checkpoints", "last.pt"), "w").close()
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for e in range(epochs + 1):
            f.write(json.dumps({"split": "val", "epoch": e, "acc1": 0.5}) + "\n")


def test_study_plan_resumes_skips_and_refuses_a_changed_condition(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: synthetic\nepochs: 2\nselectivity_reg: [{alpha: -1.0}]\n")
    out = tmp_path / "study"
    conds = conditions.conditions_from_files([str(cfg)], {})
    assert conds["c"]["threads"] == 1  # side-by-side runs are single-threaded by default
    runner.run_study(conds, [0, 1, 2], str(out), dry_run=True)
    finished_run(str(out / "c" / "s0"), 2)
    finished_run(str(out / "c" / "s1"), 1)
    plan = {(e["condition"], e["seed"]): e["status"]
            for e in runner.plan_study(conds, [0, 1, 2], str(out))}
    assert plan == {("c", 0): "done", ("c", 1): "resume", ("c", 2): "new"}
    entry = [e for e in runner.plan_study(conds, [1], str(out))][0]
    cmd = runner.train_command(entry)
    assert cmd[-1] == "--resume" and "--seed=1" in cmd and cmd[cmd.index("--name") + 1] == "s1"
    # the condition as written: a different setting under the same name is refused
    os.makedirs(out / "c", exist_ok=True)
    with open(out / "c" / "condition.yaml", "w") as f:
        yaml.safe_dump(dict(conds["c"], lr=0.5), f)
    with pytest.raises(ConfigError, match="differs from the one already"):
        runner.plan_study(conds, [0], str(out))
    with pytest.raises(ConfigError, match="decides per run"):
        runner.plan_study({"x": {"seed": 3}}, [0], str(out))
    with pytest.raises(ConfigError, match="twice"):
        runner.plan_study(conds, [0, 0], str(out))
    grid = conditions.expand_alphas(conds, [-1.0, 0.0, 0.3])
    assert list(grid) == ["c_alpha_m1", "c_alpha_0", "c_alpha_p0.3"]
    assert grid["c_alpha_0"]["selectivity_reg"] == []


def test_study_bad_input_is_one_line_exit_2(tool, tmp_path):
    proc = tool("tools/study.py", os.path.join(ROOT, "configs", "study", "alpha_0.yaml"),
                "--out", str(tmp_path), "--set", "seed=3", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "decided by the study" in proc.stderr


def test_window_scaling_for_tiny():
    from selectivity.regularizer import parse_windows
    w = design.scale_windows(parse_windows([{"alpha": -10.0, "start": 5, "end": 8}]), 0.1)
    assert w == [{"alpha": -10.0, "start": 0.5, "end": pytest.approx(0.8)}]
    conds = design.study_conditions(tiny=True)
    assert {c for pair in design.COMPARISONS.values() for c in pair} <= set(conds)
    assert all(c["epochs"] == design.TINY["epochs"] for c in conds.values())


@pytest.mark.timeout(3700)  # the two commands' own limits; the suite's default 1200 s is less
def test_reproduce_tiny_end_to_end_and_resumable(tool, tmp_path):
    """pilot → n → main runs → analyses → findings, then a rerun that trains nothing and writes
    the same findings; a changed rule after the pilot is refused."""
    out = tmp_path / "tiny"
    proc = tool("tools/reproduce.py", "--tiny", "--out", str(out), "--jobs", "2", timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "findings.md").read_text()
    assert "Tiny mode" in text and "paired difference per seed" in text
    for section in ("The design: pilot, power, n", "Seeds that did not learn",
                    "SI emergence and recession", "The α sweep", "When the regularizer starts",
                    "Ablation: selective vs random", "CKA linearity", "Orientation selectivity",
                    "Split-half check", "Why strong α collapses"):
        assert section in text, section
    pilot = json.loads((out / "findings" / "pilot.json").read_text())
    assert pilot["seeds"] == design.TINY_PILOT_SEEDS and set(pilot["n"]) <= set(
        design.study_conditions(tiny=True))
    n_main = sum(pilot["n"].values())
    for name in ("ablate", "cka", "orientation"):  # the pilot's α = 0 seeds, then the main ones
        assert sorted(os.listdir(out / "analysis" / name)) == sorted(
            [f"s{s}" for s in design.TINY_PILOT_SEEDS + list(range(pilot["n"]["alpha_0"]))])
    # every claim: one verdict in the summary, one in its section; the halves in the summary
    from selectivity.study.rules import RULES
    verdicts = re.findall(r"\*\*(supports|contradicts|inconclusive)\*\*", text)
    assert len(verdicts) == 2 * len(RULES)
    assert "(n = 2)" in text and "Wilcoxon p" in text
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert os.path.getsize(out / fig) > 5_000, fig
    # a second call trains nothing and writes the same findings
    again = tool("tools/reproduce.py", "--tiny", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{n_main} of {n_main} runs finished already" in again.stdout
    assert (out / "findings.md").read_text() == text
    # the rules are pinned by the pilot: another threshold is refused, in one line
    record = json.loads((out / "pilot.json").read_text())
    (out / "pilot.json").write_text(json.dumps(dict(record, rules="0" * 16)))
    bad = tool("tools/reproduce.py", "--tiny", "--out", str(out), "--analyse-only", timeout=600)
    assert bad.returncode == 2 and "rules changed since the pilot" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_orientation_and_cka_reductions():
    """The per-seed numbers the claims are decided on, from hand-made records with known means."""
    rec = {"layers": {"relu": {"gosi_mean": 0.5, "control_gosi_mean": 0.1},
                      "layer1.0": {"gosi_mean": 0.3, "control_gosi_mean": 0.1},
                      "layer3.0": {"gosi_mean": 0.2, "control_gosi_mean": 0.15}},
           "baseline": {"shift_invariance_centered": {"layer1": 0.6, "layer3": 0.4}},
           "ablation": [
               {"layer": "relu", "group": "top", "loss_increase": 0.4,
                "shift_invariance_centered": {"layer1": 0.2, "layer3": 0.2}},
               {"layer": "relu", "group": "bottom", "loss_increase": 0.1,
                "shift_invariance_centered": {"layer1": 0.5, "layer3": 0.3}},
               {"layer": "layer1.0", "group": "top", "loss_increase": 0.2,
                "shift_invariance_centered": {"layer1": 0.4, "layer3": 0.4}},
               {"layer": "layer1.0", "group": "bottom", "loss_increase": 0.1,
                "shift_invariance_centered": {"layer1": 0.5, "layer3": 0.5}},
               # a high layer's ablation is not one of the low layers' ablations
               {"layer": "layer3.0", "group": "top", "loss_increase": 9.0,
                "shift_invariance_centered": {"layer1": 0.0, "layer3": 0.0}}]}
    v = analysis_values.orientation_values(rec)
    assert v.gosi_by_group == {"stem": 0.5, "layer1": 0.3, "layer3": 0.2}
    assert v.control_by_group["layer3"] == pytest.approx(0.15)
    assert v.excess(("layer3",)) == pytest.approx(0.05)
    assert v.ablation[("loss", "top")] == pytest.approx(0.3)
    assert v.ablation[("loss", "bottom")] == pytest.approx(0.1)
    # shift invariance of the stages above the low ones (layer3), not of the ablated layer1
    assert v.ablation[("shift", "top")] == pytest.approx(0.3)
    assert v.ablation[("shift", "bottom")] == pytest.approx(0.4)
    assert v.shift_base == pytest.approx(0.4)
    cka = {"rows": ["layer1", "layer2", "logits"], "cols": ["layer1", "layer2", "logits"],
           "matrix": [[1, 0.5, 0.8], [0.5, 1, None], [0.8, None, 1]],
           "random_init": {"matrix": [[1, 0.2, 0.3], [0.2, 1, 0.4], [0.3, 0.4, 1]]}}
    assert claims.stage_logit_cka(cka) == {"layer1": 0.8, "layer2": None}
    assert claims.stage_logit_cka(cka, "random_init") == {"layer1": 0.3, "layer2": 0.4}
    assert claims.cka_mean(cka, "random_init") == pytest.approx(0.35)


def test_analysis_arguments_are_bounded():
    run = type("R", (), {"config": {"epochs": 8}, "seed": 3})()
    assert analysis_runs.tool_args("cka", run) == ["--epochs", "0", "1", "2", "8", "--seed", "3"]
    assert analysis_runs.tool_args("ablate", run) == ["--epochs", "1", "8", "--no-figures"]
    assert analysis_runs.tool_args("orientation", run) == [
        "--epochs", "0", "1", "8", "--ablate-epochs", "8", "--max-images", "1000"]
    tiny = type("R", (), {"config": {"epochs": 1}, "seed": 0})()
    assert analysis_runs.tool_args("cka", tiny) == ["--epochs", "0", "1", "--seed", "0"]
    assert analysis_runs.tool_args("ablate", tiny) == ["--epochs", "1", "--no-figures"]
