"""The analysis tools end to end (tools/cka.py, tools/orientation.py, tools/plot_selectivity.py)
on a tiny run, and the library pieces under them (selectivity/analyses/: cka, orientation, curves,
common: ReLU activity, channel zeroing, gOSI halves, centred shift invariance, the shuffled
val order, the random-init baseline, BatchNorm modes)."""
import json
import math
import os
import shutil
from collections import OrderedDict

import pytest
import torch
from torch import nn

from conftest import run_tool
from selectivity.analyses.cka.cka import LOGITS, count_relu_activity, cka_over_loader
from selectivity.cli import run_cli
from selectivity.train.models import build_model
from selectivity.analyses.orientation.orientation import (
    OrientationIndices, ablation_groups, loss_and_shift_invariance, shift_correlation,
    zero_channels)

EPS = 1e-6
# ResNet-20 on 200 synthetic 32×32 images (val: 40), 3 steps of 64; a step_2.pt inside epoch 1.
TRAIN = ["tools/train.py", "-c", "configs/demo.yaml", "--dataset", "synthetic",
         "--synthetic-size", "200", "--epochs", "1", "--batch-size", "64",
         "--save-every-steps", "2", "--track", "false", "--tensorboard", "false",
         "--progress", "false"]
STAGES = ["layer1", "layer2", "layer3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run_tool(*TRAIN, "--out-dir", str(out), "--name", "r", check=True)
    return str(out / "r")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def in_unit_interval(values, eps=EPS):
    return all(v is not None and -eps <= v <= 1 + eps for v in values)


# ---------------------------------------------------------------- tools/cka.py

def test_cka_within_one_run(run):
    proc = run_tool("tools/cka.py", run, "--steps", check=True)
    recs = read_jsonl(os.path.join(run, "cka.jsonl"))
    assert [r["checkpoint"] for r in recs] == ["epoch_0.pt", "step_2.pt", "epoch_1.pt"]
    assert [r["step"] for r in recs] == [0, 2, 3]
    assert recs[1]["epoch"] == pytest.approx(2 / 3)
    for r in recs:
        assert r["rows"] == r["cols"] == STAGES + [LOGITS]
        m = torch.tensor(r["matrix"], dtype=torch.float64)
        torch.testing.assert_close(m.diagonal(), torch.ones(4, dtype=torch.float64))
        torch.testing.assert_close(m, m.T)
        assert in_unit_interval(m.flatten().tolist())
        assert list(r["relu_active"]) == STAGES and in_unit_interval(r["relu_active"].values())
        assert 0 < min(r["relu_active"].values()) and r["images"] == 40 and r["batches"] == 1
        assert r["run_b"] is None and r["relu_active_b"] is None
        assert r["bn_mode"] == "recalibrate" and r["val_order_seed"] == 0
        base = r["random_init"]
        assert base == recs[0]["random_init"]  # measured once: the same fresh network
        b = torch.tensor(base["matrix"], dtype=torch.float64)
        torch.testing.assert_close(b.diagonal(), torch.ones(4, dtype=torch.float64))
        assert in_unit_interval(b.flatten().tolist()) and list(base["relu_active"]) == STAGES
    # The baseline is a fresh network, not the run's own initialisation (epoch 0).
    assert recs[0]["random_init"]["matrix"] != recs[0]["matrix"]
    for f in ("cka_heatmaps.png", "cka_curves.png", "cka_relu_active.png"):
        assert os.path.getsize(os.path.join(run, "figures", f)) > 0
    assert "summary:" in proc.stdout and "active ReLUs" in proc.stdout


def test_cka_between_two_runs(run, tmp_path):
    # The run against a copy of itself: the same network, so the same-layer entries are exactly 1.
    # In-process (each tool subprocess pays ~10 s of imports on a loaded machine).
    twin = str(tmp_path / "twin")
    shutil.copytree(run, twin)
    tool_main("cka")([run, twin, "--epochs", "1", "--layers", "layer1", "layer3.2",
                      "--heatmap-epochs", "1"])
    (r,) = read_jsonl(os.path.join(run, "cka_vs_twin.jsonl"))
    assert (r["run"], r["run_b"], r["epoch"]) == ("r", "twin", 1)
    assert r["rows"] == r["cols"] == ["layer1", "layer3.2", LOGITS]
    m = torch.tensor(r["matrix"], dtype=torch.float64)
    torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=torch.float64))
    assert in_unit_interval(m.flatten().tolist())
    assert r["relu_active_b"] == r["relu_active"]
    # Two fresh networks of different seeds: their same-layer CKA is below 1 (the baseline).
    assert r["random_init"]["seed_b"] == r["random_init"]["seed"] + 1
    assert r["random_init"]["matrix"][0][0] < 1 - 1e-3
    for f in ("cka_vs_twin_heatmaps.png", "cka_vs_twin_curves.png",
              "cka_vs_twin_relu_active.png"):
        assert os.path.exists(os.path.join(run, "figures", f))


# ---------------------------------------------------------------- tools/orientation.py

def test_orientation(run):
    layers = ["relu", "layer1.0", "layer3.0"]
    proc = run_tool("tools/orientation.py", run, "--layers", *layers, "--shift-layers", "layer2",
                    "layer3", "--ablate-epochs", "1", "--shift", "3", check=True)
    recs = read_jsonl(os.path.join(run, "orientation.jsonl"))
    assert [r["epoch"] for r in recs] == [0, 1]  # epoch_* checkpoints only by default
    for r in recs:
        g = r["gratings"]
        assert (g["size"], g["n_sf"], g["n_orient"], g["n_phase"]) == (32, 9, 12, 4)
        assert list(r["layers"]) == layers
        for name, units in zip(layers, (16, 16, 64)):
            d = r["layers"][name]
            assert d["units"] == len(d["gosi"]) == len(d["control_gosi"]) == units
            assert in_unit_interval(d["gosi"]) and in_unit_interval(d["control_gosi"])
            assert all(d["gosi"][i] == 0 for i in d["dead_units"]) and d["dead"] < units
            assert in_unit_interval([d["gosi_mean"], d["control_gosi_mean"], d["tuned_frac"]])
        b = r["baseline"]
        assert b["images"] == 40 and b["shift_px"] == 3 and 0 <= b["acc1"] <= 1
        assert math.isfinite(b["loss"]) and b["loss"] > 0
        for key in ("shift_invariance", "shift_invariance_centered"):
            assert list(b[key]) == ["layer2", "layer3"]
            assert all(-1 - EPS <= v <= 1 + EPS for v in b[key].values())
    assert recs[0]["ablation"] == []
    rows = recs[1]["ablation"]
    assert [(a["layer"], a["group"]) for a in rows] == \
        [(n, g) for n in layers for g in ("top", "bottom")]
    for top, bottom in zip(rows[::2], rows[1::2]):
        live = top["of_live"]
        assert top["units"] == bottom["units"] == live // 2 > 0
        assert top["gosi_mean"] >= bottom["gosi_mean"]
        for a in (top, bottom):
            assert math.isfinite(a["loss_increase"]) and a["loss_increase_sem"] >= 0
            assert a["loss"] == pytest.approx(recs[1]["baseline"]["loss"] + a["loss_increase"])
            assert -1 <= a["acc_drop"] <= 1 and set(a["shift_invariance"]) == {"layer2", "layer3"}
    for f in ("orientation_gosi.png", "orientation_gosi_by_epoch.png",
              "orientation_ablation.png", "orientation_shift.png"):
        assert os.path.getsize(os.path.join(run, "figures", f)) > 0
    assert "summary:" in proc.stdout and "ablation at epoch 1" in proc.stdout
    assert all(r["bn_mode"] == "recalibrate" for r in recs)


def test_tools_take_out_and_bn_mode(run, tmp_path):
    # --out holds every output (nothing in RUN); --bn-mode is recorded. At epoch 0 the running
    # statistics are BatchNorm's defaults (0 and 1), so they give another network's CKA than
    # the recalibrated ones.
    out = tmp_path / "elsewhere"
    before = sorted(os.listdir(run))
    tool_main("cka")([run, "--epochs", "0", "--bn-mode", "running", "--out", str(out),
                      "--device", "cpu", "--threads", "1"])
    (r,) = read_jsonl(out / "cka.jsonl")
    assert r["bn_mode"] == "running" and (out / "figures" / "cka_curves.png").exists()
    tool_main("cka")([run, "--epochs", "0", "--out", str(out / "recal")])
    (q,) = read_jsonl(out / "recal" / "cka.jsonl")
    assert q["bn_mode"] == "recalibrate"
    assert max(abs(a - b) for ra, rb in zip(r["matrix"], q["matrix"]) for a, b in zip(ra, rb)) \
        > 1e-3
    tool_main("orientation")([run, "--epochs", "1", "--layers", "layer1.0", "--no-ablation",
                              "--bn-mode", "batch", "--out", str(out)])
    (o,) = read_jsonl(out / "orientation.jsonl")
    assert o["bn_mode"] == "batch" and (out / "figures" / "orientation_shift.png").exists()
    assert sorted(os.listdir(run)) == before


# ---------------------------------------------------------------- one-line errors, exit 2

def tool_main(tool_name):
    import importlib
    return importlib.import_module(f"selectivity.tools.{tool_name}").main


def test_unknown_layer_is_a_one_line_error(run):
    proc = run_tool("tools/cka.py", run, "--layers", "layer9")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: units: no module named 'layer9' (did you mean "), \
        proc.stderr


@pytest.mark.parametrize("tool_name", ["cka", "orientation"])
def test_bad_runs_and_names_exit_2_with_one_line(run, tmp_path, capsys, tool_name):
    main = tool_main(tool_name)  # in-process: the same run_cli path as the command line
    cases = {"run directory not found": [str(tmp_path / "nope")],
             "no module named 'layer9'": [run, "--layers", "layer9"],
             "no module named 'layer3.7'": [run, "--layers", "layer1", "layer3.7"],
             "'logits' is always included": [run, "--layers", "layer1", "logits"],
             "--bn-mode: invalid choice": [run, "--bn-mode", "train"],
             "--device: invalid choice": [run, "--device", "tpu"]}
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    shutil.copy(os.path.join(run, "config.yaml"), empty)
    cases["no epoch_* checkpoints in"] = [str(empty)]
    cases["no checkpoint at epoch 7"] = [run, "--epochs", "7"]
    for message, argv in cases.items():
        with pytest.raises(SystemExit) as exc:
            run_cli(main, argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("tool_name", ["ablate", "cka", "orientation"])
def test_a_config_naming_another_model_than_the_checkpoints_is_one_line(run, tmp_path, capsys,
                                                                         tool_name):
    """config.yaml names resnet32, the checkpoints hold a resnet20: one line, exit 2 (not
    load_state_dict's traceback)."""
    wrong = tmp_path / "wrong"
    shutil.copytree(run, wrong)
    with open(wrong / "config.yaml") as f:
        text = f.read()
    (wrong / "config.yaml").write_text(text.replace("model: resnet20", "model: resnet32"))
    with pytest.raises(SystemExit) as exc:
        run_cli(tool_main(tool_name), [str(wrong), "--epochs", "1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: checkpoint ") and "does not fit model resnet32 with 10 " \
        "classes (the run's config.yaml): layer1.3" in err, err


# ---------------------------------------------------------------- library pieces

def test_relu_activity_counts_every_relu_call_inside_a_layer():
    class Reuse(nn.Module):  # one ReLU module called twice, as in torchvision's blocks
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.relu(x) - 1.0)

    net = nn.Sequential(OrderedDict(block=Reuse(), lin=nn.Identity(), out=nn.ReLU()))
    x = torch.tensor([[2.0, 0.5, -1.0, 3.0]])  # 1st call: 3/4 > 0; 2nd (x−1): 2/4 > 0
    with count_relu_activity(net, ["block", "block.relu", "lin", "out"]) as acc:
        net(x)
        net(x)
    f = acc.fractions()
    assert f["block"] == f["block.relu"] == pytest.approx(5 / 8)
    assert math.isnan(f["lin"])  # no ReLU inside
    assert f["out"] == pytest.approx(2 / 4)  # the output of the 2nd call: [1, 0, 0, 2]
    assert acc.relus["block"] == ["block.relu"]
    assert all(not m._forward_hooks for m in net.modules())


def test_cka_over_loader_skips_batches_too_small_for_the_estimator():
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(lin=nn.Linear(5, 4), relu=nn.ReLU()))
    x = torch.randn(11, 5)
    full = cka_over_loader(net, [(x[:8], None)], ["lin"])[1]
    torch.testing.assert_close(cka_over_loader(net, [(x[:8], None), (x[8:], None)], ["lin"])[1],
                               full)
    with pytest.raises(ValueError, match="at least 4 images"):
        cka_over_loader(net, [(x[8:], None)], ["lin"])


def test_zero_channels_masks_only_the_chosen_channels_and_is_removed():
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(2, 4, 1), relu=nn.ReLU()))
    x = torch.randn(3, 2, 5, 5).to(memory_format=torch.channels_last)
    ref = net(x)
    with zero_channels(net, "conv", torch.tensor([1, 3])):
        got = net(x)
    assert torch.equal(got[:, [1, 3]], torch.zeros_like(got[:, [1, 3]]))
    assert torch.equal(got[:, [0, 2]], ref[:, [0, 2]])
    assert torch.equal(net(x), ref)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        with zero_channels(net, "nope", [0]):
            pass


def test_ablation_groups_exclude_dead_units_and_split_by_gosi():
    gosi = torch.tensor([0.9, 0.0, 0.1, 0.5, 0.0, 0.7, 0.3], dtype=torch.float64)
    dead = torch.tensor([False, True, False, False, True, False, False])
    idx = OrientationIndices(*(torch.zeros(7),) * 4, gosi, dead)
    top, bottom = ablation_groups(idx)
    assert top.tolist() == [0, 5] and bottom.tolist() == [2, 6]  # median unit 3 in neither


def test_shift_correlation_centred_ignores_the_shared_unit_profile():
    torch.manual_seed(0)
    profile = torch.linspace(0, 10, 50)
    a = profile + 0.1 * torch.randn(200, 50)
    b = profile + 0.1 * torch.randn(200, 50)  # shifted responses: only the profile survives
    assert shift_correlation(a, b) > 0.99
    assert abs(shift_correlation(a, b, centered=True)) < 0.1
    assert shift_correlation(a, a, centered=True) == pytest.approx(1.0)


def test_loss_and_shift_invariance_sees_the_ablation_hook():
    torch.manual_seed(0)
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 6, 1), relu=nn.ReLU(),
                                    pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                    fc=nn.Linear(6, 3)))
    batches = [(torch.randn(8, 3, 8, 8), torch.randint(0, 3, (8,))) for _ in range(2)]
    base = loss_and_shift_invariance(net, batches, ["relu"], 2)
    expected = torch.cat([nn.functional.cross_entropy(net(x), y, reduction="none")
                          for x, y in batches]).double()
    torch.testing.assert_close(base.loss, expected)
    # A pointwise layer's spatial means ignore a circular shift exactly, centred or not.
    assert base.shift_invariance["relu"] == pytest.approx(1.0)
    assert base.shift_invariance_centered["relu"] == pytest.approx(1.0)
    with zero_channels(net, "relu", list(range(6))):
        dead = loss_and_shift_invariance(net, batches, ["relu"], 2)
    logits = net.fc.bias.expand(16, 3)
    torch.testing.assert_close(
        dead.loss, nn.functional.cross_entropy(logits, torch.cat([y for _, y in batches]),
                                               reduction="none").double())
    assert math.isnan(dead.shift_invariance["relu"])  # all units constant: undefined, not 0


def test_epochs_can_be_named_as_the_tools_print_them():
    from selectivity.train.checkpoint import CheckpointError
    from selectivity.train.runs import nearest_epoch as nearest
    epochs = [0.0, 5 / 22, 10 / 22, 1.0, 12.0]
    assert nearest(0.227, epochs, "r") == nearest(0.227273, epochs, "r") == 5 / 22
    assert nearest(12, epochs, "r") == 12.0 and nearest(0.3, epochs, "r") is None
    with pytest.raises(CheckpointError, match="ambiguous"):
        nearest(0.5, [0.5001, 0.4999], "r")


# ---------------------------------------------------------------- the val order and CKA

def write_image_folder(root, classes=4, per_class=24, size=16, seed=0):
    """An ImageFolder (root/{train,val}/c<k>/*.png): each class a fixed template plus noise,
    listed class by class as ImageFolder lists them."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, (classes, size, size, 3))
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                img = 0.5 * templates[c] + 0.5 * rng.uniform(0, 255, (size, size, 3))
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:03d}.png")


def test_cka_on_a_class_sorted_image_folder_equals_shuffled_within_noise(tmp_path):
    # The analyses draw val batches in a fixed shuffled order (analyses.common.val_loader). The
    # noise of the minibatch estimator is measured, not guessed: the spread of CKA over 8 other
    # shuffles. Our order (seed 0) must sit inside it; the folder's own class-sorted order (batches of one
    # class) must sit far outside it, or this test would not show that the shuffle matters.
    import numpy as np
    from selectivity.analyses.common import random_init_model
    from selectivity.analyses.cka.run import order_spread
    from selectivity.train.config import Config
    write_image_folder(tmp_path)
    cfg = Config(dataset="imagefolder", data_dir=str(tmp_path), image_size=16,
                 eval_batch_size=8, workers=0, model="resnet20")
    model = random_init_model(cfg, 4, 0, "cpu")
    r = order_spread(cfg, model, seeds=range(9), batch_size=8, bn_mode="recalibrate")
    assert r["rows"] == STAGES + [LOGITS]
    assert np.array_equal(r["dataset"], r["by_class"])  # ImageFolder lists images by class
    shuffled = np.stack(r["shuffled"])
    ours, others = shuffled[0], shuffled[1:]
    mean, sd = others.mean(0), others.std(0, ddof=1)
    off = ~np.eye(len(r["rows"]), dtype=bool)
    # Measured here: |ours − mean| ≤ 3.0 s.d. (logits entries; ≤ 0.6 s.d. between stages).
    assert (np.abs(ours - mean)[off] <= 5 * sd[off] + 1e-3).all()
    # Measured here: the class-sorted CKA(layer1, layer2) is 30 s.d. below the shuffled mean.
    assert (np.abs(r["by_class"] - mean)[off] / sd[off]).max() > 10


def test_val_loader_order_is_a_fixed_permutation(tmp_path):
    from selectivity.analyses.common import val_loader
    from selectivity.train.config import Config
    write_image_folder(tmp_path, classes=3, per_class=5, size=8)
    cfg = Config(dataset="imagefolder", data_dir=str(tmp_path), image_size=8, workers=0)
    orders = {s: val_loader(cfg, "cpu", seed=s).dataset.indices.tolist() for s in (0, 0, 1)}
    a = val_loader(cfg, "cpu", seed=0).dataset.indices.tolist()
    assert a == orders[0] and sorted(a) == list(range(15)) and a != orders[1]
    assert a != sorted(a)
    labels = val_loader(cfg, "cpu", order="by_class").dataset.labels.tolist()
    assert labels == sorted(labels)


# ---------------------------------------------------------------- tools/plot_selectivity.py

def fake_run(root, name, p=12, seed=0):
    """A run folder with two selectivity records (two stages, [P, U] null) and nothing else."""
    g = torch.Generator().manual_seed(seed)
    run = root / name
    (run / "selectivity").mkdir(parents=True)
    for step, epoch in ((0, 0), (10, 1)):
        layers = {n: {"si": torch.rand(8, generator=g, dtype=torch.float64),
                      "si_null": 0.1 * torch.rand(p, 8, generator=g, dtype=torch.float64)}
                  for n in ("layer1.0", "layer1.1", "layer2.0")}
        torch.save({"epoch": epoch, "step": step, "layers": layers, "bn_mode": "recalibrate"},
                   run / "selectivity" / f"epoch_{epoch}.pt")
    return run


def test_plot_selectivity_compares_runs_in_a_folder_of_its_own(tmp_path, capsys):
    import importlib
    from selectivity.analyses.curves.run import load_evals, stage_series
    plot = importlib.import_module("selectivity.tools.plot_selectivity")
    a, b = fake_run(tmp_path, "a"), fake_run(tmp_path, "b", seed=1)
    plot.main([str(a), str(b)])
    out = tmp_path / "compare_a_vs_b"
    assert sorted(os.listdir(out)) == ["si_by_stage.png", "si_heatmap_a.png", "si_heatmap_b.png"]
    assert not (a / "figures").exists() and not (b / "figures").exists()
    plot.main([str(a)])  # one run: its own figures/
    assert (a / "figures" / "si_by_stage.png").exists()
    # The null: the stage's mean SI under each permutation (blocks weighted equally), reported
    # as the mean and the 95 % quantile of those P values.
    evals = load_evals(str(a))
    series = stage_series(evals)["layer1"]
    nulls = [evals[-1]["layers"][n]["si_null"] for n in ("layer1.0", "layer1.1")]
    per_perm = (nulls[0].mean(1) + nulls[1].mean(1)) / 2
    assert series["null"][-1] == pytest.approx(float(per_perm.mean()))
    assert series["null_top"][-1] == pytest.approx(float(torch.quantile(per_perm, 0.95)))
    assert series["band"] == {"q95"} and series["null_top"][-1] > series["null"][-1]
    assert "95 % quantile" in capsys.readouterr().out


def test_default_layers_of_a_model_without_residual_blocks():
    # Ukita's plain CNN and VGG16 have no blocks and no stages: the analyses then look at the
    # units the run tracked (track_units), as training did.
    from types import SimpleNamespace
    from selectivity.analyses.cka.run import default_layers as cka_layers
    from selectivity.errors import UnitsError
    from selectivity.analyses.orientation.run import default_layers, default_shift_layers
    net = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), act=nn.ReLU(),
                                    conv2=nn.Conv2d(4, 4, 3), act2=nn.ReLU(),
                                    pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(),
                                    fc=nn.Linear(4, 3)))
    cfg = SimpleNamespace(track_units="relu")
    assert default_layers(net, cfg) == cka_layers(net, cfg) == ["act", "act2"]
    assert default_shift_layers(net, ["conv", "act", "conv2", "act2"]) == ["act", "conv2", "act2"]
    with pytest.raises(UnitsError, match="no layer1..layerN stages"):
        cka_layers(net)
    resnet = build_model("resnet20", 10)
    assert default_layers(resnet, cfg)[:2] == ["relu", "layer1.0"] and \
        cka_layers(resnet, cfg) == STAGES
