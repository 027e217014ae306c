"""Selectivity tracking: planted units, agreement with an independent recomputation, run outputs."""
import glob
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from selectivity.tracker import Tracker, UnitProbe


class Planted(nn.Module):
    """Two units after a ReLU: unit 0 fires only for class c (input channel 0 carries the label
    indicator), unit 1 is label-independent positive noise (input channel 1)."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x)


class ListLoader:
    """The loader-contract pieces the tracker reads: labels, indices(), iteration."""

    def __init__(self, images, labels, batch):
        self.images, self.all_labels, self.batch = images, labels, batch
        self.labels = labels.numpy()

    def indices(self):
        return np.arange(len(self.labels))

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch):
            yield self.images[i:i + self.batch], self.all_labels[i:i + self.batch]


def fake_trainer(model, loader, num_classes, tmp_path):
    return SimpleNamespace(model=model, val_loader=loader, num_classes=num_classes,
                           device=torch.device("cpu"), epoch=0, step=0,
                           dist=SimpleNamespace(is_main=True),
                           paths={"selectivity": str(tmp_path)}, log=SimpleNamespace(tb=None))


def planted_data(n_per_class=40, K=10, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(n_per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    x = torch.zeros(len(labels), 2, 4, 4)
    x[:, 0] = (labels == c).float()[:, None, None] * (1 + torch.rand(len(labels), 1, 1, generator=g))
    x[:, 1] = torch.rand(len(labels), 4, 4, generator=g) + 0.5
    return x, labels


def run_eval(tracker, trainer, loader):
    tracker.eval_begin(trainer)
    for images, labels in loader:
        tracker.before_batch(trainer, images, labels, train=False)
        trainer.model(images)
        tracker.after_batch(trainer)
    return tracker.eval_end(trainer, {"epoch": 1, "step": 10})


@pytest.mark.parametrize("c", [0, 3, 9])
def test_planted_unit_si_one_and_label_free_unit_within_null(tmp_path, c):
    x, y = planted_data(c=c)
    model, loader = Planted(), ListLoader(x, y, batch=64)
    trainer = fake_trainer(model, loader, 10, tmp_path)
    tracker = Tracker("relu", seed=0)
    tracker.setup(trainer)
    record = run_eval(tracker, trainer, loader)
    saved = torch.load(tmp_path / "epoch_1.pt", weights_only=False)["layers"]["relu"]
    assert abs(float(saved["si"][0]) - 1.0) < 1e-6 and int(saved["pref_class"][0]) == c
    # The null spread: SI of the label-free unit under many label permutations.
    from selectivity import ops
    means = x[:, 1].mean((1, 2)).double()
    nulls = []
    for s in range(200):
        perm = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(s))]
        sums, counts = ops.new_state(10, 1)
        ops.accumulate(means[:, None].float(), perm, sums, counts)
        nulls.append(float(ops.selectivity_index(sums, counts).si[0]))
    si1 = float(saved["si"][1])
    assert np.percentile(nulls, 1) <= si1 <= np.percentile(nulls, 99)
    # The tracker's own null (a fixed permutation) has the real class counts, and is not selective.
    assert torch.equal(saved["null_counts"], saved["counts"])
    assert float(saved["si_null"][0]) < 0.5
    assert record["si"]["relu"] == pytest.approx(float(saved["si"].mean()))


def test_null_is_fixed_across_evaluations(tmp_path):
    x, y = planted_data()
    model, loader = Planted(), ListLoader(x, y, batch=50)
    trainer = fake_trainer(model, loader, 10, tmp_path)
    tracker = Tracker("relu", seed=5)
    tracker.setup(trainer)
    a, b = run_eval(tracker, trainer, loader), run_eval(tracker, trainer, loader)
    assert a["si_null"] == b["si_null"] and a["si_mean"] == b["si_mean"]


def test_probe_names_repeated_module_calls():
    relu = nn.ReLU()
    model = nn.Sequential(relu, nn.Identity(), relu)
    seen = []
    probe = UnitProbe(model, "relu", lambda name, out: seen.append(name))
    probe.enabled = True
    model(torch.randn(2, 3))
    model(torch.randn(2, 3))
    assert seen == ["0", "0#1", "0", "0#1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from conftest import run_tool
    out = tmp_path_factory.mktemp("runs")
    run_tool("tools/train.py", "-c", "configs/demo.yaml", "--epochs", "2", "--batch-size", "128",
             "--eval-every-steps", "5", "--out-dir", str(out), "--name", "d", "--progress",
             "false", check=True)
    return str(out / "d")


def test_tracker_equals_independent_recomputation(demo_run):
    """Per-unit SI in selectivity/epoch_2.pt == SI recomputed from stored activations of the
    epoch-2 checkpoint on the same val data (numpy, class means, no selectivity.ops)."""
    from selectivity.data.datasets import build_dataset
    from selectivity.data.torch_loader import TorchLoader
    from selectivity.models import residual_blocks
    from selectivity.runs import load_model, run_config

    cfg = run_config(demo_run)
    model = load_model(cfg, os.path.join(demo_run, "checkpoints", "epoch_2.pt"))
    ds = build_dataset("digits", "val")
    loader = TorchLoader(ds, batch_size=100, train=False, augment="none", image_size=32,
                         device=torch.device("cpu"))
    acts = {n: [] for n in residual_blocks(model)}
    for n, b in residual_blocks(model).items():
        b.register_forward_hook(lambda m, i, o, n=n: acts[n].append(o.mean((2, 3)).double()))
    with torch.no_grad():
        for images, _ in loader:
            model(images)
    saved = torch.load(os.path.join(demo_run, "selectivity", "epoch_2.pt"), weights_only=False)
    labels = ds.labels
    for name, chunks in acts.items():
        a = torch.cat(chunks).numpy()
        means = np.stack([a[labels == k].mean(0) for k in range(10)])
        mu_max = means.max(0)
        mu_rest = (means.sum(0) - mu_max) / 9
        si = (mu_max - mu_rest) / (mu_max + mu_rest + 1e-7)
        np.testing.assert_allclose(saved["layers"][name]["si"].numpy(), si, rtol=1e-5, atol=1e-6)
        assert np.array_equal(saved["layers"][name]["pref_class"].numpy(), means.argmax(0))


def test_run_outputs_metrics_tensorboard_figures(demo_run, tool):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    vals = [json.loads(l) for l in open(os.path.join(demo_run, "metrics.jsonl"))
            if '"val"' in l]
    assert [r["step"] for r in vals] == [0, 5, 10, 11, 22]  # + evals at steps 5, 10 of epoch 1
    for r in vals:
        assert {"si", "si_mean", "si_null", "si_train"} <= set(r)
        assert len(r["si"]) == 9 and 0 <= r["si_mean"] <= 1 and 0 <= r["si_null"] <= 1
    assert vals[-1]["si_train"] is not None
    assert len(glob.glob(os.path.join(demo_run, "selectivity", "*.pt"))) == len(vals)
    ea = EventAccumulator(os.path.join(demo_run, "tb"), size_guidance={"histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"si/layer1.0", "si_null/layer3.2", "val/si_mean", "val/acc1"} <= set(tags["scalars"])
    assert "si_hist/layer2.1" in tags["histograms"]
    assert len(ea.Scalars("si/layer1.0")) == len(vals)
    tool("tools/plot_selectivity.py", demo_run, check=True)
    for f in ("si_by_stage.png", "si_heatmap_d.png"):
        assert os.path.getsize(os.path.join(demo_run, "figures", f)) > 10_000


def test_tracker_state_is_o_k_times_u():
    """State per layer is sums [K, U] fp64 + counts [K] int64, whatever the batches seen."""
    from selectivity.models import build_model, unit_registry
    from selectivity.tracker import LayerStates

    model = build_model("resnet20", 10).eval()
    states, labels = LayerStates(1000), None
    probe = UnitProbe(model, "blocks", lambda n, out: states.add(n, out, labels))
    probe.enabled = True
    expected = {n: 1000 * u * 8 + 1000 * 8 for n, u in unit_registry(model).items()}
    with torch.no_grad():
        for b in (1, 7, 33):
            labels = torch.randint(0, 1000, (b,))
            model(torch.randn(b, 3, 32, 32))
            got = {n: s.numel() * s.element_size() + c.numel() * c.element_size()
                   for n, (s, c) in states.states.items()}
            assert got == expected
    assert int(states.states["layer1.0"][1].sum()) == 41


def test_reduced_reads_the_states_in_place_in_one_process():
    """Without a process group the SI is read from the live states (no 121 MB copy per log step);
    the DDP path, a reduced copy, is tested in test_ops_ddp.py and test_faults.py."""
    from selectivity.tracker import LayerStates

    states = LayerStates(3)
    states.add("layer", torch.rand(4, 5, 2, 2), torch.tensor([0, 2, 2, 1]))
    (sums, counts), = states.reduced().values()
    assert sums is states.states["layer"][0] and counts is states.states["layer"][1]
