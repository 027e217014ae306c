"""The training engine end to end: run directory, exact resume after SIGKILL, DDP under torchrun."""
import json
import os

import pytest
import torch

from selectivity.checkpoint import load_state

# Small and deterministic: digits, ResNet-20, 2 epochs of 11 steps.
FAST = ["-c", "configs/demo.yaml", "--epochs", "2", "--batch-size", "128", "--deterministic",
        "true", "--log-every-steps", "5", "--progress", "false"]


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def test_run_directory(tool, tmp_path):
    tool("tools/train.py", *FAST, "--out-dir", str(tmp_path), "--name", "r", check=True)
    run = tmp_path / "r"
    assert (run / "config.yaml").exists() and list((run / "tb").iterdir())
    ckpts = sorted(os.listdir(run / "checkpoints"))
    assert ckpts == ["epoch_0.pt", "epoch_1.pt", "epoch_2.pt", "last.pt"]
    vals = [r for r in metrics(run) if r["split"] == "val"]
    assert [r["epoch"] for r in vals] == [0, 1, 2]
    for r in vals:
        assert {"epoch", "step", "split", "loss", "acc1", "images_per_sec"} <= set(r)
    assert vals[-1]["step"] == 2 * (1437 // 128) and vals[-1]["images_per_sec"] > 0
    state = load_state(str(run / "checkpoints" / "last.pt"))
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "step"} <= set(state)
    # Refuses to overwrite an existing run without --resume.
    proc = tool("tools/train.py", *FAST, "--out-dir", str(tmp_path), "--name", "r")
    assert proc.returncode == 2 and "already holds a run; pass --resume" in proc.stderr


@pytest.mark.parametrize("fault", ["train_step:16", "checkpoint_write:2"])
def test_sigkill_then_resume_is_exact(tool, tmp_path, fault):
    """Killed mid-epoch 2 (or while writing epoch 1's checkpoint), resumed: identical result."""
    out = str(tmp_path)
    tool("tools/train.py", *FAST, "--out-dir", out, "--name", "ref", check=True)
    killed = tool("tools/train.py", *FAST, "--out-dir", out, "--name", "k",
                  env={"SELECTIVITY_FAULT": fault})
    assert killed.returncode == -9, killed.stderr
    tool("tools/train.py", *FAST, "--out-dir", out, "--name", "k", "--resume", check=True)
    ref, res = (load_state(os.path.join(out, n, "checkpoints", "last.pt")) for n in ("ref", "k"))
    assert ref["step"] == res["step"]
    for key, value in ref["model"].items():
        assert torch.equal(value, res["model"][key]), key
    strip = lambda rs: [{k: v for k, v in r.items() if k != "images_per_sec"}
                        for r in rs if r["split"] == "val"]
    assert strip(metrics(os.path.join(out, "ref"))) == strip(metrics(os.path.join(out, "k")))
    assert not [f for f in os.listdir(os.path.join(out, "k", "checkpoints"))
                if f.startswith(".tmp")]


def test_torchrun_two_processes_gloo(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
         "tools/train.py", *FAST, "--epochs", "1", "--batch-size", "64", "--out-dir", out,
         "--name", "ddp"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    vals = [r for r in metrics(os.path.join(out, "ddp")) if r["split"] == "val"]
    assert [r["epoch"] for r in vals] == [0, 1]  # rank 0 alone writes: one line per eval
    assert vals[-1]["images"] == 360  # val shards: disjoint, every image once
    # 2 ranks × 22 steps of 64 images: each rank ran half the epoch's batches.
    assert vals[-1]["step"] == (1437 // 2) // 64
