"""amp_dtype (fp16 | bf16 | auto) on the CPU: each trains, records its precision, keeps a
GradScaler only with fp16, and a run killed mid-epoch and resumed equals an uninterrupted one."""
import os

import pytest
import torch

from selectivity.train.checkpoint import load_state
from selectivity.train.config import Config, amp_dtype
from test_faults import assert_same_run, vals

TINY = ["-c", "configs/demo.yaml", "--dataset", "synthetic", "--data-backend", "device",
        "--synthetic-size", "256",
        "--image-size", "16", "--epochs", "2", "--batch-size", "32", "--eval-batch-size", "64",
        "--deterministic", "true", "--log-every-steps", "4", "--progress", "false",
        "--eval-every-steps", "0", "--null-permutations", "2", "--bn-images", "64", "--amp", "true"]


def test_auto_is_bf16_on_cpu_and_fp16_on_cuda():
    assert amp_dtype(Config(), "cpu") == torch.bfloat16
    assert amp_dtype(Config(), "cuda") == torch.float16
    assert amp_dtype(Config(amp_dtype="fp16"), "cpu") == torch.float16
    assert amp_dtype(Config(amp_dtype="bf16"), "cuda") == torch.bfloat16


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_amp_dtype_trains_and_resumes_exactly(tool, tmp_path, dtype):
    out = str(tmp_path)
    args = [*TINY, "--amp-dtype", dtype, "--out-dir", out]
    tool("tools/train.py", *args, "--name", "ref", check=True)
    ref = os.path.join(out, "ref")
    records = vals(ref)
    assert records and all(r["precision"] == dtype for r in records)
    assert all(r["loss"] == r["loss"] for r in records)  # finite: no NaN from the autocast
    scaler = load_state(os.path.join(ref, "checkpoints", "last.pt"))["scaler"]
    assert bool(scaler) == (dtype == "fp16"), scaler  # GradScaler state only with fp16
    killed = tool("tools/train.py", *args, "--name", "k", env={"SELECTIVITY_FAULT": "train_step:11"})
    assert killed.returncode == -9, killed.stderr
    tool("tools/train.py", *args, "--name", "k", "--resume", check=True)
    assert_same_run(ref, os.path.join(out, "k"))


def test_unknown_amp_dtype_is_one_line(tool, tmp_path):
    proc = tool("tools/train.py", *TINY, "--amp-dtype", "fp8", "--out-dir", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: config key 'amp_dtype': unknown value 'fp8'; choose one "
                                   "of auto, fp16, bf16")
