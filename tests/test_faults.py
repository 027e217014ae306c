"""Reliability: kills at several points, Ctrl-C, torn checkpoints, NaN loss, a failed write, DDP
exactness.

Faults are injected with SELECTIVITY_FAULT (selectivity/faults.py): a real SIGKILL of the training
process at a named point, a NaN loss at step n, or ENOSPC from a checkpoint write. A real full
disk (a small tmpfs) is in test_reliability.py.
"""
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from selectivity.train.checkpoint import load_last_good, load_state
from selectivity.train.runlock import RunLock

FAST = ["-c", "configs/demo.yaml", "--epochs", "2", "--batch-size", "128", "--deterministic",
        "true", "--log-every-steps", "5", "--progress", "false", "--eval-every-steps", "4"]


def vals(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items() if k != "images_per_sec"}
                for l in f if '"val"' in l]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from conftest import run_tool
    out = tmp_path_factory.mktemp("ref")
    run_tool("tools/train.py", *FAST, "--out-dir", str(out), "--name", "ref", check=True)
    return str(out / "ref")


@pytest.mark.parametrize("fault", ["train_step:16", "eval_batch:4", "checkpoint_write:2"])
def test_sigkill_then_resume_is_exact(tool, tmp_path, reference, fault):
    """Killed mid-epoch 2 / mid-evaluation / while writing a checkpoint, then --resume: same
    weights, same val metrics (incl. selectivity) as the uninterrupted run."""
    out = str(tmp_path)
    killed = tool("tools/train.py", *FAST, "--out-dir", out, "--name", "k",
                  env={"SELECTIVITY_FAULT": fault})
    assert killed.returncode == -9, killed.stderr
    with RunLock(os.path.join(out, "k")):  # the kernel dropped the dead run's lock
        pass
    tool("tools/train.py", *FAST, "--out-dir", out, "--name", "k", "--resume", check=True)
    assert_same_run(reference, os.path.join(out, "k"))


def assert_same_run(reference, run):
    ref, res = (load_state(os.path.join(d, "checkpoints", "last.pt")) for d in (reference, run))
    assert ref["step"] == res["step"]
    for key, value in ref["model"].items():
        assert torch.equal(value, res["model"][key]), key
    assert vals(reference) == vals(run)
    assert not [f for d, _, files in os.walk(run) for f in files if f.startswith(".tmp")]


def ctrl_c_as_at_a_terminal():
    """A shell starts background jobs with SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler: a test suite run from a script with `&` (as CI may be) would send
    Ctrl-C to a process that cannot receive it. Give the run a terminal's default disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(600)
def test_ctrl_c_is_one_line_exit_130_and_resume_is_exact(tmp_path, reference):
    """SIGINT (what Ctrl-C sends) once training is under way: one line, exit 130, no traceback;
    --resume then ends exactly where the uninterrupted run ends."""
    import time
    out = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "tools/train.py", *FAST, "--out-dir", out,
                             "--name", "c"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            preexec_fn=ctrl_c_as_at_a_terminal)
    first = os.path.join(out, "c", "checkpoints", "epoch_0.pt")
    try:
        while not os.path.exists(first) and proc.poll() is None:
            time.sleep(0.05)  # polling for a file, not a time limit: the run takes many seconds
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err[-3000:]
    assert re.fullmatch(r"interrupted at epoch \d+ step \d+; resume with --resume", lines[-1])
    assert not any("Traceback" in line for line in lines), err[-3000:]
    with RunLock(os.path.join(out, "c")):  # released on the way out
        pass
    tool_proc = subprocess.run([sys.executable, "tools/train.py", *FAST, "--out-dir", out,
                                "--name", "c", "--resume"], cwd=ROOT, capture_output=True,
                               text=True, timeout=500, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert tool_proc.returncode == 0, tool_proc.stderr[-3000:]
    assert_same_run(reference, os.path.join(out, "c"))


def test_torn_checkpoint_is_never_loaded(tmp_path, reference):
    import shutil
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(reference, "checkpoints"), ckpt)
    os.unlink(ckpt / "last.pt")
    data = (ckpt / "epoch_2.pt").read_bytes()
    (ckpt / "last.pt").write_bytes(data[: len(data) // 2])  # a torn file where last.pt was
    (ckpt / "epoch_2.pt").write_bytes(data[: len(data) // 3])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint"):
        state, path = load_last_good(str(ckpt))
    assert path.endswith("epoch_1.pt") and state["epoch"] == 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tool, tmp_path):
    proc = tool("tools/train.py", *FAST, "--out-dir", str(tmp_path), "--name", "n",
                env={"SELECTIVITY_FAULT": "nan_loss:15"})  # step 15: inside epoch 2
    assert proc.returncode == 2
    assert "error: non-finite loss (nan) at epoch 1 step 14" in proc.stderr.splitlines()[-1]
    state, path = load_last_good(str(tmp_path / "n" / "checkpoints"))
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_nan_loss_skip_policy_counts_skips(tool, tmp_path):
    tool("tools/train.py", *FAST, "--nan-policy", "skip", "--out-dir", str(tmp_path), "--name",
         "s", env={"SELECTIVITY_FAULT": "nan_loss:3"}, check=True)
    last = vals(str(tmp_path / "s"))[-1]
    assert last["skipped_steps"] == 1 and last["epoch"] == 2 and last["loss"] is not None


def test_disk_full_during_checkpoint_keeps_previous(tool, tmp_path):
    proc = tool("tools/train.py", *FAST, "--out-dir", str(tmp_path), "--name", "f",
                env={"SELECTIVITY_FAULT": "disk_full:2"})  # epoch_1.pt's write fails
    assert proc.returncode == 2
    last = proc.stderr.splitlines()[-1]
    assert re.fullmatch(r"error: cannot write \S+/f/checkpoints/epoch_1\.pt: No space left on "
                        r"device; .*\(earlier files are intact\)", last), proc.stderr
    ckpt = tmp_path / "f" / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["epoch_0.pt", "last.pt"]
    assert load_state(str(ckpt / "last.pt"))["step"] == 0


def test_ddp_selectivity_sums_equal_single_process(tool, tmp_path):
    """Epoch-0 evaluation (same initial weights): 2 gloo ranks with uneven last batches vs one
    process. 360 val images → 180 per rank → batches of 64, 64, 52."""
    common = [*FAST, "--epochs", "1", "--eval-batch-size", "64", "--out-dir", str(tmp_path)]
    tool("tools/train.py", *common, "--name", "one", check=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "tools/train.py", *common, "--name", "two"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(tmp_path / n / "selectivity" / "epoch_0.pt", weights_only=False)
                for n in ("one", "two"))
    assert list(one["layers"]) == list(two["layers"])
    for name, a in one["layers"].items():
        b = two["layers"][name]
        assert torch.equal(a["counts"], b["counts"]) and int(a["counts"].sum()) == 360
        # fp32 convolutions of different batch compositions round differently; the reduction
        # itself is fp64 and exact, so the sums agree to fp32 rounding of the activations.
        torch.testing.assert_close(a["sums"], b["sums"], rtol=1e-5, atol=1e-6)
        # The null: the same permutations by dataset index on every rank, so the same null SIs.
        torch.testing.assert_close(a["si_null"], b["si_null"], rtol=1e-4, atol=1e-6)
        assert a["si_null"].shape == (10, a["si"].numel())
