"""Selectivity tracking: planted units, agreement with an independent recomputation, run outputs."""
import glob
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from selectivity.train.callbacks import Tracking
from selectivity.errors import UnitsError
from selectivity.tracker import SelectivityTracker, summarize
from selectivity.units import UnitHooks


class Planted(nn.Module):
    """Two units after a ReLU: unit 0 fires only for class c (input channel 0 carries the label
    indicator), unit 1 is label-independent positive noise (input channel 1)."""

    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x)


def planted_data(n_per_class=40, K=10, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(n_per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    x = torch.zeros(len(labels), 2, 4, 4)
    x[:, 0] = (labels == c).float()[:, None, None] * (1 + torch.rand(len(labels), 1, 1, generator=g))
    x[:, 1] = torch.rand(len(labels), 4, 4, generator=g) + 0.5
    return x, labels


def batches(x, y, batch):
    for i in range(0, len(y), batch):
        yield x[i:i + batch], y[i:i + batch], torch.arange(i, min(i + batch, len(y)))


@pytest.mark.parametrize("c", [0, 3, 9])
def test_planted_unit_is_above_its_null_and_label_free_unit_is_not(c):
    x, y = planted_data(c=c)
    model = Planted()
    tracker = SelectivityTracker(model, 10, "relu", dataset_labels=y, null_permutations=40, seed=1)
    for images, labels, idx in batches(x, y, 64):
        with tracker.track(labels, idx):
            model(images)
    r = tracker.compute()["relu"]
    assert abs(float(r.si[0]) - 1.0) < 1e-6 and int(r.pref_class[0]) == c
    assert r.null_si.shape == (40, 2)
    q = r.unit_null_q95
    assert r.si[0] > q[0] + 0.5  # the planted unit: far above its null
    assert r.si[1] <= q[1]  # the label-free unit: within its null
    assert r.frac_above_null == 0.5
    # The label-free unit sits inside an independent null spread (200 fresh permutations).
    from selectivity import ops
    means = x[:, 1].mean((1, 2))
    nulls = []
    for s in range(200):
        perm = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(s))]
        sums, counts = ops.new_state(10, 1)
        ops.accumulate(means[:, None], perm, sums, counts)
        nulls.append(float(ops.selectivity_index(sums, counts).si[0]))
    assert np.percentile(nulls, 1) <= float(r.si[1]) <= np.percentile(nulls, 99)
    assert abs(float(r.null_si[:, 1].mean()) - np.mean(nulls)) < 3 * np.std(nulls) / np.sqrt(40)


def test_update_after_forward_equals_track_and_null_is_fixed():
    x, y = planted_data()
    model = Planted()
    a = SelectivityTracker(model, 10, "relu", dataset_labels=y, null_permutations=5, seed=5)
    a.enabled = False
    b = SelectivityTracker(model, 10, "relu", dataset_labels=y, null_permutations=5, seed=5)
    for images, labels, idx in batches(x, y, 50):
        model(images)
        b.update(labels, idx)
    a.enabled, b.enabled = True, False
    for images, labels, idx in batches(x, y, 50):
        with a.track(labels, idx):
            model(images)
    ra, rb = a.compute()["relu"], b.compute()["relu"]
    torch.testing.assert_close(ra.si, rb.si, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ra.null_si, rb.null_si, rtol=1e-6, atol=1e-7)
    # The null is a function of the indices, not of the order the images come in.
    c = SelectivityTracker(model, 10, "relu", dataset_labels=y, null_permutations=5, seed=5)
    a.enabled = False
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(3))
    for i in range(0, len(y), 37):
        idx = order[i:i + 37]
        with c.track(y[idx], idx):
            model(x[idx])
    torch.testing.assert_close(c.compute()["relu"].null_si, ra.null_si, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="indices"):
        with c.track(y[:3]):
            model(x[:3])
    with pytest.raises(RuntimeError, match="no tracked layer ran"):
        b.enabled = True
        b.update(y[:3], torch.arange(3))


def test_state_dict_round_trip_and_reset():
    x, y = planted_data()
    model = Planted()
    t = SelectivityTracker(model, 10, "relu")
    with t.track(y[:100]):
        model(x[:100])
    state = t.state_dict()
    u = SelectivityTracker(model, 10, "relu")
    u.enabled = False
    u.load_state_dict(state)
    torch.testing.assert_close(u.compute()["relu"].si, t.compute()["relu"].si)
    t.reset()
    assert t.compute() == {}


def test_units_that_do_not_exist_are_one_line_errors():
    model = Planted()
    with pytest.raises(UnitsError) as e:
        SelectivityTracker(model, 10, "blocks")
    msg = str(e.value)
    assert "\n" not in msg and "'blocks' matched no module" in msg and "relu" in msg
    with pytest.raises(UnitsError, match="no module named 'rleu'.*did you mean relu"):
        SelectivityTracker(model, 10, "rleu")


def test_trainer_adapter_records_the_null(tmp_path):
    x, y = planted_data()
    model = Planted()
    trainer = SimpleNamespace(model=model, num_classes=10, device=torch.device("cpu"), epoch=0,
                              step=0, dist=SimpleNamespace(is_main=True),
                              val_loader=SimpleNamespace(labels=y.numpy()),
                              paths={"selectivity": str(tmp_path)}, log=SimpleNamespace(tb=None))
    cb = Tracking("relu", seed=0, null_permutations=10)
    cb.setup(trainer)
    cb.eval_begin(trainer)
    for images, labels, idx in batches(x, y, 64):
        cb.before_batch(trainer, images, labels, False, indices=idx)
        model(images)
        cb.after_batch(trainer)
    record = cb.eval_end(trainer, {"epoch": 1, "step": 10, "bn_mode": "running"})
    saved = torch.load(tmp_path / "epoch_1.pt", weights_only=False)
    layer = saved["layers"]["relu"]
    assert saved["bn_mode"] == "running" and layer["si_null"].shape == (10, 2)
    assert record["si"]["relu"] == pytest.approx(float(layer["si"].mean()))
    assert record["si_above_null"]["relu"] == 0.5
    assert record["si_null"] <= record["si_null_q95"] < record["si_mean"]


def test_hooks_name_repeated_module_calls():
    relu = nn.ReLU()
    model = nn.Sequential(relu, nn.Identity(), relu)
    seen = []
    hooks = UnitHooks(model, "relu", lambda name, out: seen.append(name))
    model(torch.randn(2, 3))
    model(torch.randn(2, 3))
    assert seen == ["0", "0#1", "0", "0#1"]
    hooks.enabled = False
    model(torch.randn(2, 3))
    assert len(seen) == 4


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
    from selectivity.pipelines.datasets import build_dataset
    from selectivity.pipelines.torch_loader import TorchLoader
    from selectivity.train.models import residual_blocks
    from selectivity.train.runs import load_model, run_config

    from selectivity.evaluation import bn_statistics
    from selectivity.train.config import data_spec
    from selectivity.train.splits import calibration_batches

    cfg = run_config(demo_run)
    model = load_model(cfg, os.path.join(demo_run, "checkpoints", "epoch_2.pt"))
    ds = build_dataset("digits", "val")
    # The trainer's batches and thread count: BatchNorm recalibration sums float32 statistics, and
    # near-silent units amplify a different summation order beyond the tolerance below.
    loader = TorchLoader(ds, batch_size=cfg.eval_batch_size, train=False, augment="none",
                         image_size=32, device=torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    acts = {n: [] for n in residual_blocks(model)}
    for n, b in residual_blocks(model).items():
        b.register_forward_hook(lambda m, i, o, n=n: acts[n].append(o.mean((2, 3)).double()))
    calibration = calibration_batches(data_spec(cfg), "cpu", cfg.bn_images)
    with pytest.raises(ValueError, match="empty"):
        with bn_statistics(model, "recalibrate", []):
            pass
    with torch.no_grad():
        with bn_statistics(model, "recalibrate", calibration):
            for chunks in acts.values():  # the recalibration's own forward passes
                chunks.clear()
            for images, _ in loader:
                model(images)
    torch.set_num_threads(threads)
    saved = torch.load(os.path.join(demo_run, "selectivity", "epoch_2.pt"), weights_only=False)
    assert saved["bn_mode"] == "recalibrate"
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
    """One tiled state for all layers: sums [1, tiles, K, T] fp64 + counts [1, K] fp64, whatever the
    batches seen; the per-layer view keeps the [K, U] sums and int64 counts."""
    from selectivity.train.models import build_model, unit_registry

    model = build_model("resnet20", 10).eval()
    tracker = SelectivityTracker(model, 1000)
    units = sum(unit_registry(model).values())
    tiles = -(-units // tracker.tile)
    with torch.no_grad():
        for b in (1, 7, 33):
            with tracker.track(torch.randint(0, 1000, (b,))):
                model(torch.randn(b, 3, 32, 32))
            assert tuple(tracker.sums.shape) == (1, tiles, 1000, tracker.tile)
            assert tuple(tracker.counts.shape) == (1, 1000)
    per_layer = tracker.states.states
    assert {n: tuple(s.shape) for n, (s, _) in per_layer.items()} == \
        {n: (1000, u) for n, u in unit_registry(model).items()}
    assert int(per_layer["layer1.0"][1].sum()) == 41 and per_layer["layer1.0"][1].dtype == torch.int64


def test_compute_copies_per_layer_sums_only_when_read():
    """compute() reduces the live state; a layer's [K, U] sums are copied out on first read only
    (the copy of every layer at K = 1000 costs more than the reduction)."""
    model = Planted()
    tracker = SelectivityTracker(model, 3, "relu")
    x, labels = torch.rand(4, 5, 2, 2), torch.tensor([0, 2, 2, 1])
    with tracker.track(labels):
        model(x)
    r = tracker.compute()["relu"]
    assert callable(r.__dict__["_sums"])
    expected = torch.zeros(3, 5, dtype=torch.float64).index_add_(0, labels, x.relu().mean((2, 3)).double())
    torch.testing.assert_close(r.sums, expected)
    assert isinstance(r.__dict__["_sums"], torch.Tensor)


def test_step_si_is_the_mean_si_of_compute_every_step_also_decayed(monkeypatch):
    """step_si() (the incremental cache) equals compute()'s full reduction at every step; with decay
    the state equals a direct recomputation, across renormalizations (forced often here)."""
    import selectivity.tracker as tracker_module

    monkeypatch.setattr(tracker_module, "RENORMALIZE_ABOVE", 50.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 1), nn.ReLU())
    lam = 0.7
    plain = SelectivityTracker(model, 6, "relu", incremental=True)
    decayed = SelectivityTracker(model, 6, "relu", incremental=True, decay=lam)
    seen = []
    with torch.no_grad():
        for step in range(25):
            x, y = torch.rand(8, 3, 5, 5), torch.randint(0, min(6, 2 + step), (8,))
            model(x)
            plain.update(y)
            decayed.update(y)
            seen.append((x, y))
            for t in (plain, decayed):
                full = t.compute()
                for name, si in t.step_si().items():
                    assert abs(float(si) - full[name].mean) <= 1e-12
    assert decayed._weight < 50.0  # renormalized on the way
    # Direct recomputation of the decayed class means of layer "1".
    sums = torch.zeros(6, 6, dtype=torch.float64)
    counts = torch.zeros(6, dtype=torch.float64)
    with torch.no_grad():
        for t, (x, y) in enumerate(seen):
            w = lam ** (len(seen) - 1 - t)
            sums.index_add_(0, y, model[0](x).relu().mean((2, 3)).double() * w)
            counts.index_add_(0, y, torch.full((8,), w, dtype=torch.float64))
    r = decayed.compute()["1"]
    present = counts > 0
    torch.testing.assert_close(r.sums[present] / r.counts[present, None], sums[present] / counts[present, None],
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(decayed.compute()["1"].si, plain.compute()["1"].si)


def test_a_per_layer_state_dict_still_loads():
    """A state_dict of the per-layer tracker ({"states": {layer: (sums, counts)}, "null_states"})."""
    x, y = planted_data()
    model = Planted()
    t = SelectivityTracker(model, 10, "relu")
    with t.track(y[:100]):
        model(x[:100])
    expected = t.compute()["relu"]
    old = {"states": {"relu": (expected.sums.clone(), expected.counts.clone())}, "null_states": []}
    u = SelectivityTracker(model, 10, "relu")
    u.load_state_dict(old)
    torch.testing.assert_close(u.compute()["relu"].si, expected.si, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="null permutations"):
        SelectivityTracker(model, 10, "relu", dataset_labels=y, null_permutations=2).load_state_dict(old)


def test_labels_belong_to_one_forward():
    model = Planted()
    t = SelectivityTracker(model, 3, "relu")
    x, y = torch.rand(4, 5, 2, 2), torch.tensor([0, 2, 2, 1])
    with pytest.raises(RuntimeError, match="one forward pass"):
        with t.track(y):
            model(x)
            model(x)
    with pytest.raises(ValueError, match="one entry per image"):
        with t.track(y[:3]):
            model(x)
    model(x)
    t.update(y)
    with pytest.raises(RuntimeError, match="no tracked layer ran"):
        t.update(y)
    assert int(t.compute()["relu"].counts.sum()) == 4
