"""Where a training run stands and the command that trains one, for the study's runners (runner,
sweep). Runs train through the checkout's ``tools/train.py`` in a subprocess, from the checkout's
root: a run is what a user would have typed."""
from __future__ import annotations

import os
import sys

from selectivity.train.runlog import read_metrics, run_paths

# The checkout this package is installed from (an editable install): its tools/ and configs/.
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "tools", "train.py")


def run_status(run_dir: str, epochs: int) -> str:
    """'done', 'resume' or 'new' for a run directory that should train ``epochs`` epochs."""
    paths = run_paths(run_dir)
    vals = [r for r in read_metrics(paths["metrics"]) if r.get("split") == "val"]
    if vals and vals[-1].get("epoch") == epochs:
        return "done"
    ckpts = paths["checkpoints"]
    return "resume" if os.path.isdir(ckpts) and os.listdir(ckpts) else "new"


def train_command(config: str, out_dir: str, name: str, flags: list[str],
                  resume: bool) -> list[str]:
    """``python tools/train.py -c CONFIG --out-dir OUT --name NAME FLAGS [--resume]``."""
    cmd = [sys.executable, TRAIN, "-c", config, "--out-dir", out_dir, "--name", name] + flags
    return cmd + (["--resume"] if resume else [])
