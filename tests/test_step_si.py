"""The trainer's train SI of every step: kept on the device, written to TensorBoard at the log
cadence (one value per step), equal to the train record's si_train at log steps; with
train_si_decay the state is exponentially weighted."""
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TINY = ["-c", "configs/demo.yaml", "--dataset", "synthetic", "--data-backend", "device",
        "--synthetic-size", "320", "--image-size", "16", "--epochs", "1", "--batch-size", "32",
        "--eval-batch-size", "64", "--log-every-steps", "4", "--progress", "false",
        "--eval-every-steps", "0", "--null-permutations", "2", "--bn-images", "64"]


@pytest.mark.parametrize("decay", ["0", "0.9"])
def test_train_si_of_every_step_reaches_tensorboard(tool, tmp_path, decay):
    tool("tools/train.py", *TINY, "--train-si-decay", decay, "--out-dir", str(tmp_path),
         "--name", "r", check=True)
    run = tmp_path / "r"
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    mean = events.Scalars("si_train_step/mean")
    assert [e.step for e in mean] == list(range(1, 11))  # 320 / 32 = 10 steps, every one
    layers = [t for t in events.Tags()["scalars"] if t.startswith("si_train_step/layer")]
    assert len(layers) == 9  # resnet20's residual blocks
    with open(run / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8]
    for r in train:  # TensorBoard keeps float32
        assert mean[r["step"] - 1].value == pytest.approx(r["si_train"], rel=1e-6)
        assert 0 < r["si_train"] < 1
