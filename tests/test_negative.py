"""Responses that go negative (BatchNorm outputs, GELU, ...): SI assumes non-negative ones, so the
tracker and the regularizer stop with one line by default, and measure the positive part with
negative="relu"; the trainer's track_negative does the same, recorded with every result."""
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
    assert "negative='relu'" in msg and "\n" not in msg
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
    with pytest.raises(sel.UnitsError, match="negative must be one of error, relu, got 'abs'"):
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
