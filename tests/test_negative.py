"""Responses that go negative (BatchNorm outputs, GELU, ...): SI assumes non-negative ones, so the
tracker and the regularizer stop with one line by default, and measure the positive part with
negative="relu", or subtract each unit's lowest class mean with negative="shift" (SI in [0, 1], not
the papers' SI); the trainer's track_negative does the same, recorded with every result."""
import json
import os

import pytest
import torch
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import selectivity as sel

TINY = ["-c", "configs/demo.yaml", "--dataset", "synthetic", "--data-backend", "device",
        "--synthetic-size", "128", "--image-size", "16", "--epochs", "1", "--batch-size", "32",
        "--eval-batch-size", "64", "--log-every-steps", "2", "--progress", "false",
        "--eval-every-steps", "0", "--null-permutations", "2", "--bn-images", "64",
        "--track-units", "bn"]


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))


def test_first_batch_with_negative_responses_is_one_line_naming_layer_and_fraction():
    model, x, y = net(), torch.randn(16, 6), torch.arange(16) % 3
    tracker = sel.SelectivityTracker(model, 3, units=["1"])
    with pytest.raises(sel.UnitsError) as e, tracker.track(y):
        model(x)
    msg = str(e.value)
    assert msg.startswith("layer 1: 100.0% of its 5 units have negative per-image responses")
    assert "negative='relu'" in msg and "negative='shift'" in msg and "not the papers' SI" in msg
    assert "\n" not in msg
    tracker.remove()
    sel.SelectivityRegularizer(model, 3, units=["1"])
    with pytest.raises(sel.UnitsError, match="layer 1: 100.0% of its 5 units"):
        model(x)  # the regularizer's forward, before its term


def test_relu_measures_the_positive_part_and_si_stays_in_0_1():
    model, x, y = net(), torch.randn(64, 6), torch.arange(64) % 3
    tracker = sel.SelectivityTracker(model, 3, units=["1"], negative="relu")
    seen = []
    model[1].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad(), tracker.track(y):
        model(x)
    out = seen[0]
    r = tracker.compute()["1"]
    assert r.negative == "relu"
    expected = torch.stack([out.clamp_min(0)[y == k].double().sum(0) for k in range(3)])
    torch.testing.assert_close(r.sums, expected, rtol=1e-6, atol=1e-6)
    assert bool(((r.si >= 0) & (r.si <= 1)).all())
    reg = sel.SelectivityRegularizer(model, 3, units=["1"], negative="relu")
    model(x)
    assert 0 <= float(reg.term(y)) <= 1


def test_responses_that_turn_negative_later_stop_compute():
    model, y = nn.Sequential(nn.Identity()), torch.tensor([0, 1])
    tracker = sel.SelectivityTracker(model, 2, units=["0"])
    with tracker.track(y):
        model(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))  # first batch: all positive
    with tracker.track(y):
        model(torch.tensor([[-5.0, 2.0], [-5.0, 4.0]]))  # unit 0's class means now negative
    with pytest.raises(sel.UnitsError, match="layer 0: 50.0% of its 2 units have negative "
                                             "class-mean responses"):
        tracker.compute()


def test_unknown_choice_is_one_line():
    with pytest.raises(sel.UnitsError, match="negative must be one of error, relu, shift, got 'abs'"):
        sel.SelectivityTracker(net(), 3, units=["1"], negative="abs")


def test_trainer_track_units_bn_needs_a_choice_then_records_it(tool, tmp_path):
    proc = tool("tools/train.py", *TINY, "--out-dir", str(tmp_path), "--name", "a")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: layer ") and "negative per-image responses" in proc.stderr
    assert proc.stderr.count("\n") == 1
    tool("tools/train.py", *TINY, "--track-negative", "relu", "--out-dir", str(tmp_path),
         "--name", "b", check=True)
    run = os.path.join(tmp_path, "b")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        vals = [r for r in map(json.loads, f) if r["split"] == "val"]
    assert vals and all(r["track_negative"] == "relu" for r in vals)
    assert all(0 <= v <= 1 for r in vals for v in r["si"].values())
    saved = torch.load(os.path.join(run, "selectivity", "epoch_1.pt"))
    assert saved["negative"] == "relu"
    events = EventAccumulator(os.path.join(run, "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert any(t.startswith("si_relu/") for t in tags) and not any(t.startswith("si/") for t in tags)
    assert any(t.startswith("si_relu_train_step/") for t in tags)


def _identity_tracker(negative, **kw):
    model = nn.Sequential(nn.Identity())
    return model, sel.SelectivityTracker(model, 3, units=["0"], negative=negative, **kw)


# Per-image responses of 2 units; labels 0, 1, 2, 0, 1, 2. Class means: unit 0 (-2, 1, 4),
# unit 1 (3, -1, -1).
HAND_X = torch.tensor([[-3.0, 2.0], [0.0, -1.0], [5.0, -2.0], [-1.0, 4.0], [2.0, -1.0], [3.0, 0.0]])
HAND_Y = torch.tensor([0, 1, 2, 0, 1, 2])


def test_shift_formula_on_a_hand_made_tensor():
    """Shifted class means: unit 0 (0, 3, 6): μ_max 6, μ_-max 1.5, SI 4.5 / 7.5 = 0.6; unit 1
    (4, 0, 0): μ_max 4, μ_-max 0, SI 4 / (4 + ε). The tracker (with and without its incremental
    path) and the regularizer's minibatch SI agree."""
    eps = sel.tracker.EPS
    model, tracker = _identity_tracker("shift", incremental=True)
    for half in (slice(0, 3), slice(3, 6)):  # two steps: the state, not one batch
        with tracker.track(HAND_Y[half]):
            model(HAND_X[half])
    r = tracker.compute()["0"]
    expected = torch.tensor([4.5 / (7.5 + eps), 4.0 / (4.0 + eps)], dtype=torch.float64)
    torch.testing.assert_close(r.si, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.mu_max, torch.tensor([6.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(r.mu_rest, torch.tensor([1.5, 0.0], dtype=torch.float64))
    torch.testing.assert_close(r.shifted_by, torch.tensor([-2.0, -1.0], dtype=torch.float64))
    assert r.negative == "shift" and r.pref_class.tolist() == [2, 0]
    torch.testing.assert_close(r.sums, torch.stack([HAND_X[HAND_Y == k].double().sum(0)
                                                    for k in range(3)]))  # as accumulated
    torch.testing.assert_close(tracker.step_si()["0"], r.si.mean(), rtol=1e-12, atol=0)
    reg = sel.SelectivityRegularizer(model, 3, units=["0"], negative="shift")
    model(HAND_X.float())
    torch.testing.assert_close(float(reg.term(HAND_Y)), float(expected.mean()), rtol=1e-6, atol=0)
    torch.testing.assert_close(reg.last_layers.double(), expected.mean().view(1), rtol=1e-6, atol=0)


def test_shift_equals_the_plain_si_where_the_lowest_class_mean_is_0():
    """Non-negative responses whose lowest class mean is 0 in every unit: nothing is subtracted, and
    the SI, the per-step SI and the regularizer's term are the plain ones, bit for bit. (The null's
    permuted classes have their own lowest means, not 0 here: its shifted SI differs.)"""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(48) % 3
    x = torch.rand(48, 5, generator=g) * (y != 2).unsqueeze(1)  # class 2: all 0
    x[y == 0, 0] = 0.0  # unit 0: classes 0 and 2 both at 0
    out = {}
    for negative in ("error", "shift"):
        model, tracker = _identity_tracker(negative, incremental=True)
        for b in range(0, 48, 16):
            with tracker.track(y[b:b + 16]):
                model(x[b:b + 16])
        reg = sel.SelectivityRegularizer(model, 3, units=["0"], negative=negative)
        model(x)
        out[negative] = (tracker.compute()["0"], tracker.step_si()["0"], reg.term(y))
    (plain, plain_step, plain_reg), (shift, shift_step, shift_reg) = out["error"], out["shift"]
    assert torch.equal(shift.shifted_by, torch.zeros(5, dtype=torch.float64))
    assert torch.equal(shift.si, plain.si)
    assert torch.equal(shift.mu_max, plain.mu_max) and torch.equal(shift.mu_rest, plain.mu_rest)
    assert torch.equal(shift_step, plain_step) and torch.equal(shift_reg, plain_reg)
    assert 0 < float(plain.si.min())  # the data are not trivially SI 0


def test_shift_keeps_si_in_0_1_where_responses_go_negative():
    model, y = net(), torch.arange(64) % 3
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    tracker = sel.SelectivityTracker(model, 3, units=["1"], negative="shift",
                                     dataset_labels=y.tolist(), null_permutations=4)
    seen = []
    model[1].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad(), tracker.track(y, torch.arange(64)):
        model(x)
    r = tracker.compute()["1"]
    means = torch.stack([seen[0][y == k].double().mean(0) for k in range(3)])
    assert bool((means < 0).any())  # the case this is for
    torch.testing.assert_close(r.shifted_by, means.min(0).values)
    for si in (r.si, r.null_si):
        assert bool(((si >= 0) & (si <= 1)).all())
    reg = sel.SelectivityRegularizer(model, 3, units=["1"], negative="shift")
    model(x)
    term = reg.term(y)
    assert 0 <= float(term) <= 1 and term.requires_grad


def test_trainer_track_negative_shift_is_recorded(tool, tmp_path):
    tool("tools/train.py", *TINY, "--track-negative", "shift", "--out-dir", str(tmp_path),
         "--name", "s", check=True)
    run = os.path.join(tmp_path, "s")
    with open(os.path.join(run, "metrics.jsonl")) as f:
        vals = [r for r in map(json.loads, f) if r["split"] == "val"]
    assert vals and all(r["track_negative"] == "shift" for r in vals)
    assert all(0 <= v <= 1 for r in vals for v in r["si"].values())
    saved = torch.load(os.path.join(run, "selectivity", "epoch_1.pt"))
    assert saved["negative"] == "shift"
    assert all(bool((layer["shifted_by"] < 0).any()) for layer in saved["layers"].values())
    events = EventAccumulator(os.path.join(run, "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert any(t.startswith("si_shift/") for t in tags) and not any(t.startswith("si/") for t in tags)
    assert any(t.startswith("si_shift_train_step/") for t in tags)
