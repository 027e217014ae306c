"""tools/study.py (conditions × seeds, resumable) and tools/reproduce.py --tiny end to end."""
import json
import os
import re

import pytest
import yaml

from conftest import ROOT
from selectivity.study import analysis_runs, checkpoint_claims, conditions, design, runner
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
    assert {design.BASE, design.EARLY, design.LATE, design.STRONG} <= set(conds)
    assert all(c["epochs"] == design.TINY["epochs"] for c in conds.values())


@pytest.mark.timeout(3700)  # the two commands' own limits; the suite's default 1200 s is less
def test_reproduce_tiny_end_to_end_and_resumable(tool, tmp_path):
    out = tmp_path / "tiny"
    proc = tool("tools/reproduce.py", "--tiny", "--out", str(out), "--jobs", "2", timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (out / "findings.md").read_text()
    assert "Tiny mode" in text and "Student-t" in text
    for section in ("SI emergence and recession", "The α sweep", "Early-only vs late",
                    "Ablation: selective vs random", "CKA linearity", "Orientation selectivity"):
        assert section in text
    assert "run(s) failed" not in text  # ablation, CKA and orientation ran on both seeds
    for name in ("ablate", "cka", "orientation"):
        assert sorted(os.listdir(out / "analysis" / name)) == ["s0", "s1"]
    verdicts = re.findall(r"\*\*(supports|contradicts|inconclusive)\*\*", text)
    assert len(verdicts) == 12
    assert "(n = 2)" in text  # two seeds in tiny mode, and the tables say so
    for fig in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert os.path.getsize(out / fig) > 5_000, fig
    # every run finished; a second call trains nothing and writes the same findings
    again = tool("tools/reproduce.py", "--tiny", "--out", str(out), timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "12 of 12 runs finished already" in again.stdout
    assert (out / "findings.md").read_text() == text


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
    v = checkpoint_claims.orientation_values(rec)
    assert v["gosi"] == {"stem": 0.5, "layer1": 0.3, "layer3": 0.2}
    assert v["control"]["layer3"] == pytest.approx(0.15)
    assert v["ablation"][("loss", "top")] == pytest.approx(0.3)
    assert v["ablation"][("loss", "bottom")] == pytest.approx(0.1)
    # shift invariance of the stages above the low ones (layer3), not of the ablated layer1
    assert v["ablation"][("shift", "top")] == pytest.approx(0.3)
    assert v["ablation"][("shift", "bottom")] == pytest.approx(0.4)
    assert v["shift_base"] == pytest.approx(0.4)
    cka = {"rows": ["layer1", "layer2", "logits"], "cols": ["layer1", "layer2", "logits"],
           "matrix": [[1, 0.5, 0.8], [0.5, 1, None], [0.8, None, 1]],
           "random_init": {"matrix": [[1, 0.2, 0.3], [0.2, 1, 0.4], [0.3, 0.4, 1]]}}
    assert checkpoint_claims.stage_logit_cka(cka) == {"layer1": 0.8, "layer2": None}
    assert checkpoint_claims.stage_logit_cka(cka, "random_init") == {"layer1": 0.3, "layer2": 0.4}


def test_analysis_arguments_are_bounded():
    run = type("R", (), {"config": {"epochs": 10}})()
    assert analysis_runs.tool_args("cka", run) == ["--epochs", "0", "1", "2", "3", "5", "10"]
    assert analysis_runs.tool_args("orientation", run) == ["--epochs", "0", "1", "10", "--ablate-epochs",
                                                 "10", "--max-images", "1000"]
    tiny = type("R", (), {"config": {"epochs": 1}})()
    assert analysis_runs.tool_args("cka", tiny) == ["--epochs", "0", "1"]
    assert analysis_runs.tool_args("ablate", tiny) == []
