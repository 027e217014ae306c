"""The training engine end to end: the run directory, DDP under torchrun (kills: test_faults.py)."""
import json
import os


from selectivity.train.checkpoint import load_state

# Small and deterministic: digits, ResNet-20, 2 epochs of 11 steps.
FAST = ["-c", "configs/demo.yaml", "--epochs", "2", "--batch-size", "128", "--deterministic",
        "true", "--log-every-steps", "5", "--progress", "false", "--eval-every-steps", "0"]


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
