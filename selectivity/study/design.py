"""The small-scale study's design (tools/reproduce.py): its conditions (configs/study/: ResNet-20
on digits_hard at 16 px, 8 epochs; α = 0, the α grid, paper 1's later starts and its equal
windows), which conditions each claim compares, the pilot's seeds and the cap on the main seeds,
and the tiny mode that runs the same path in minutes."""
from __future__ import annotations

import glob
import math
import os
from collections import OrderedDict

from selectivity.regularizer import parse_windows
from selectivity.study.conditions import PER_RUN
from selectivity.study.launch import ROOT
from selectivity.train.config import ConfigError, load_config, to_dict

CONDITIONS = os.path.join(ROOT, "configs", "study")
BASE = "alpha_0"
STUDY_CLASSES = 10  # digits_hard, the study's dataset (configs/study/)
# {claim: (condition, condition it is compared with)}: Δ = first − second, paired by seed.
COMPARISONS = {
    "alpha_m1": ("alpha_m1", BASE), "alpha_m3": ("alpha_m3", BASE),
    "alpha_m10": ("alpha_m10", BASE), "alpha_p1": ("alpha_p1", BASE),
    "alpha_p3": ("alpha_p3", BASE),
    "from_e2": ("from_e2_m10", "alpha_m10"), "from_e4": ("from_e4_m10", "alpha_m10"),
    "late_start": ("from_e4_m10", BASE), "equal_windows": ("late_m10", "early_m10"),
}
# The pilot's seeds size the study and choose SI's peak epoch; they never enter a verdict. The
# main seeds are 0, 1, …, n − 1 of each condition, n chosen by power, at least N_MIN and at most
# N_CAP (the cap keeps the whole study near an hour on 2 cores; findings.md says where it binds).
PILOT_SEEDS = [100, 101, 102]
N_MIN, N_CAP = 5, 8
# Approximate single-core minutes a run costs (training and its evaluations, 16 px, 8 epochs):
# only to state what a larger n would cost.
RUN_CORE_MINUTES = 1.0

# The tiny mode: the same conditions, claims and steps, small enough for CI on 2 cores. At one
# epoch the evaluations cost as much as the training, hence fewer BatchNorm-calibration images
# and no second val pass with the running statistics.
TINY = {"epochs": 1, "eval_every_steps": 34, "eval_steps_epochs": 1, "eval_batch_size": 540,
        "bn_images": 256, "eval_running_bn": False}
TINY_PILOT_SEEDS = [100, 101]
TINY_N_MIN, TINY_N_CAP = 2, 2


def scale_windows(windows: list, factor: float) -> list:
    """Windows with start/end multiplied by ``factor`` (the tiny mode's shorter training)."""
    out = []
    for w in windows:
        d = {"alpha": w.alpha, "start": w.start * factor}
        if math.isfinite(w.end):
            d["end"] = w.end * factor
        out.append(d)
    return out


def study_conditions(tiny: bool) -> "OrderedDict[str, dict]":
    paths = sorted(glob.glob(os.path.join(CONDITIONS, "*.yaml")))
    if not paths:
        raise ConfigError(f"no condition configs in {CONDITIONS}")
    out = OrderedDict()
    for path in paths:
        cfg = to_dict(load_config(path))
        if tiny:
            factor = TINY["epochs"] / cfg["epochs"]
            cfg.update(TINY)
            cfg["selectivity_reg"] = scale_windows(parse_windows(cfg["selectivity_reg"]), factor)
        cfg["threads"] = 1  # several single-threaded runs side by side
        out[os.path.splitext(os.path.basename(path))[0]] = {
            k: v for k, v in cfg.items() if k not in PER_RUN}
    missing = sorted({c for pair in COMPARISONS.values() for c in pair} - set(out))
    if missing:
        raise ConfigError(f"configs/study/ lacks the condition(s) {', '.join(missing)} the "
                          f"claims compare")
    return out
