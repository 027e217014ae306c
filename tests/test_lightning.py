"""The Lightning callback (examples/lightning_loop.py): logged values equal the tracker's on the
same weights and data, and a fit killed after epoch 1 and resumed logs what an uninterrupted one does."""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
import selectivity as sel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--image-size", "8", "--alpha", "-1.0", "--alpha-from", "1"]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("lightning_loop", ROOT / "examples" /
                                                  "lightning_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def uninterrupted(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer, cb = example.main(["--epochs", "2", "--out", str(out), *ARGS])
    return out, trainer, cb


def _csv_rows(out: Path) -> list[dict]:
    with open(out / "csv" / "version_0" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("si/mean")]


def test_logged_values_equal_the_tracker_on_the_same_weights_and_data(example, uninterrupted):
    out, trainer, cb = uninterrupted
    module = trainer.lightning_module
    _, val, calibration = example.loaders(8, 64)
    tracker = sel.SelectivityTracker(module, 10, "blocks", dataset_labels=val.dataset.labels,
                                     null_permutations=example.NULL_PERMUTATIONS)
    with torch.no_grad(), sel.bn_statistics(module, "recalibrate", calibration):
        for x, y, idx in val:
            with tracker.track(y, idx):
                module(x)
    results = tracker.compute()
    tracker.remove()
    logged = cb.history[-1]["metrics"]
    expected = {}
    for kind, value in (("si", lambda r: r.mean), ("si_null", lambda r: r.null_mean),
                        ("si_null_q95", lambda r: r.null_q95)):
        for n, r in results.items():
            expected[f"{kind}/{n}"] = value(r)
        for stage in ("net.layer1", "net.layer2", "net.layer3"):
            expected[f"{kind}_stage/{stage}"] = np.mean(
                [value(r) for n, r in results.items() if n.startswith(stage + ".")])
        expected[f"{kind}/mean"] = np.mean([value(r) for r in results.values()])
    expected["si_above_null/mean"] = np.mean([r.frac_above_null for r in results.values()])
    assert set(logged) == set(expected) and len(results) == 9
    for k, v in expected.items():
        assert abs(logged[k] - v) <= 1e-9, (k, logged[k], v)
    # what the loggers hold: CSV exactly (float64), TensorBoard as float32
    rows = _csv_rows(out)
    assert len(rows) == 2
    for k, v in expected.items():
        assert abs(float(rows[-1][k]) - v) <= 1e-9, k
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tb" / "version_0"))
    events.Reload()
    for k in ("si_stage/net.layer3", "si_null_stage/net.layer3", "si/mean"):
        assert abs(events.Scalars(k)[-1].value - expected[k]) <= 1e-6, k


def test_killed_after_epoch_1_and_resumed_logs_what_an_uninterrupted_fit_does(
        example, uninterrupted, tmp_path):
    _, _, full = uninterrupted
    example.main(["--epochs", "1", "--out", str(tmp_path), *ARGS])
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    _, resumed = example.main(["--epochs", "2", "--out", str(tmp_path), "--resume", *ARGS])
    assert [h["epoch"] for h in resumed.history] == [0, 1]  # epoch 0's from the checkpoint
    for a, b in zip(resumed.history, full.history):
        assert a["metrics"].keys() == b["metrics"].keys()
        for k in a["metrics"]:
            assert abs(a["metrics"][k] - b["metrics"][k]) <= 1e-9, (a["epoch"], k)


def test_a_checkpoint_from_other_settings_is_one_line(example):
    cb = example.callback([], -1.0, 1)
    state = cb.state_dict()
    other = example.callback([], -2.0, 1)
    with pytest.raises(ValueError, match=r"written with regularizer = \[\(-1.0, 1.0, inf\)\]"):
        other.load_state_dict(state)


def test_without_lightning_the_import_names_the_extra():
    code = ("import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
            "try:\n    import selectivity.integrations.lightning\n"
            "except ImportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == ("selectivity.integrations.lightning needs Lightning: "
                                  "pip install selectivity-tracking[lightning]")


def test_the_training_loss_gets_the_regularizer_term_in_its_windows_only(example):
    from types import SimpleNamespace
    import torch.nn.functional as F
    torch.manual_seed(0)
    module = example.DigitsModule()
    cb = example.callback([], -1.0, 1)
    cb.setup(None, module, "fit")
    x, y = torch.randn(8, 3, 8, 8), torch.arange(8) % 4
    batch = (x, y, torch.arange(8))
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=0), module)  # before the window
    assert not cb.reg.enabled
    torch.testing.assert_close(module.training_step(batch, 0), F.cross_entropy(module(x), y))
    cb.on_train_epoch_start(SimpleNamespace(current_epoch=1), module)  # α = -1 from epoch 1
    loss = module.training_step(batch, 0)
    cb.reg.enabled = False
    ref = sel.SelectivityRegularizer(module, 10)
    expected = F.cross_entropy(module(x), y) + ref.term(y)  # loss - α * SI_reg, α = -1
    ref.remove()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    assert abs(float((loss - F.cross_entropy(module(x), y)).detach())) > 1e-4  # the term is there


def test_a_negative_choice_names_every_logged_value_and_a_bad_one_is_one_line():
    from selectivity.integrations.lightning import SelectivityCallback
    model, y = torch.nn.Sequential(torch.nn.Identity()), torch.tensor([0, 1, 2, 0])
    x = torch.tensor([[-1.0, 2.0], [1.0, 0.0], [3.0, 1.0], [0.0, -2.0]])
    tracker = sel.SelectivityTracker(model, 3, ["0"], negative="shift", dataset_labels=y.tolist(),
                                     null_permutations=2)
    with tracker.track(y, torch.arange(4)):
        model(x)
    cb = SelectivityCallback(3, ["0"], null_permutations=2, negative="shift")
    logged = cb.metrics(tracker.compute())
    assert logged and all(k.startswith("si_shift") for k in logged), list(logged)
    assert {"si_shift/0", "si_shift_stage/0", "si_shift_null/mean",
            "si_shift_above_null/mean"} <= set(logged)
    assert cb.state_dict()["settings"]["negative"] == "shift"
    with pytest.raises(sel.UnitsError, match="negative must be one of error, relu, shift"):
        SelectivityCallback(3, negative="abs")
