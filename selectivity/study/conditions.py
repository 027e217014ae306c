"""Conditions: a condition is one config trained once per seed (runner). Its config is validated
here and written to disk without the keys the study decides per run; config files and α grids
become conditions."""
from __future__ import annotations

import math
import os

from selectivity.regularizer import parse_windows
from selectivity.train.config import ConfigError, from_dict, load_config, to_dict

# Keys the study decides per run (the run's place and seed); a condition may not set them.
PER_RUN = ("seed", "name", "out_dir")


def condition_config(values: dict) -> dict:
    """A condition's full config (validated) without the per-run keys, as written to disk."""
    cfg = to_dict(from_dict(values))
    parse_windows(cfg["selectivity_reg"])
    return {k: v for k, v in cfg.items() if k not in PER_RUN}


def check_sets(sets: dict) -> None:
    """Overrides for every condition may not set what the study decides per run."""
    for key in PER_RUN:
        if key in sets:
            raise ConfigError(f"--set {key}=… is decided by the study (--seeds, --out, the "
                              f"config file names); remove it")


def conditions_from_files(paths: list[str], sets: dict) -> dict:
    """{condition name (file stem): config values (file + sets, threads 1 unless set)}."""
    out = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in out:
            raise ConfigError(f"two configs would share the condition name {name!r}; rename one")
        cfg = to_dict(load_config(path, sets))
        if "threads" not in sets and cfg["threads"] == 0:
            cfg["threads"] = 1  # many single-threaded runs side by side, not one wide run
        out[name] = {k: v for k, v in cfg.items() if k not in PER_RUN}
    return out


def alpha_name(alpha: float) -> str:
    """-1.0 → 'm1', 0.3 → 'p0.3', 0 → '0' (the configs/reg_sweep naming)."""
    if alpha == 0:
        return "0"
    return ("m" if alpha < 0 else "p") + f"{abs(alpha):g}"


def expand_alphas(conditions: dict, alphas: list[float]) -> dict:
    """Each condition × each α (constant from epoch 0), named ``<name>_alpha_<α>``."""
    bad = [a for a in alphas if not math.isfinite(a)]
    if bad:
        raise ConfigError(f"--alphas: {bad[0]} is not a finite number")
    out = {}
    for name, values in conditions.items():
        for a in alphas:
            out[f"{name}_alpha_{alpha_name(a)}"] = dict(
                values, selectivity_reg=[] if a == 0 else [{"alpha": float(a)}])
    return out
