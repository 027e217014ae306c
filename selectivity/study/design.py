"""The small-scale study's design (tools/reproduce.py): its conditions (configs/study/, ResNet-20 on
digits_hard: α = 0, the α grid, paper 1's early-only / late windows of equal length), their names
as the claims use them, and the tiny mode that runs the same path in minutes."""
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
BASE, MODERATE, STRONG, POSITIVE, EARLY, LATE = ("alpha_0", "alpha_m1", "alpha_m10", "alpha_p10",
                                                 "early_m10", "late_m10")
# The tiny mode: the same conditions and analysis, small enough for CI on 2 cores. At 16 px and
# one epoch the evaluations cost as much as the training, hence fewer BatchNorm-calibration images,
# no second val pass with the running statistics, and 3 evaluations inside the epoch.
TINY = {"epochs": 1, "image_size": 16, "eval_every_steps": 22, "eval_batch_size": 540,
        "bn_images": 256, "eval_running_bn": False}
TINY_SEEDS = [0, 1]
SEEDS = [0, 1, 2]
POINT = 0.01  # one accuracy point
STUDY_CLASSES = 10  # digits_hard, the study's dataset (configs/study/)


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
    return out
