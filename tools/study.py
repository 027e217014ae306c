#!/usr/bin/env python
"""Run conditions × seeds, resumably: the replicated version of tools/sweep.py.

    python tools/study.py CONFIG [CONFIG ...] --out DIR [--seeds 0 1 2] [--jobs 2] [--set key=value]
    python tools/study.py configs/study/*.yaml --out runs/study --seeds 0 1 2 --jobs 2
    python tools/study.py configs/paper/resnet20_cifar10.yaml --alphas -10 -1 0 1 10 \
        --set data_dir=/data/cifar-10-batches-py --out runs/cifar_alpha

Each config file is one *condition* (named by its file name); each condition trains once per seed
with tools/train.py (a subprocess, ``--threads 1`` unless ``--set threads=…``) into
``DIR/<condition>/s<seed>``. The merged config of a condition (the file plus ``--set``) is written
to ``DIR/<condition>/condition.yaml`` and every seed trains from it, so what ran is on disk beside
the runs. Re-running the same command is safe:
  finished run (its last val record is at its final epoch)  → skipped
  unfinished run (killed, crashed, or more epochs asked)    → continued with --resume
  no run yet                                                → started
A condition whose saved condition.yaml differs from the new one is refused (one line, exit 2):
mixing two settings under one name would silently average them. ``--jobs N`` runs N trainings at
once (each single-threaded); a failed run does not stop the study, the exit status is 1 when any
failed. ``--dry-run`` prints the plan only.
``--alphas A [A ...]``: every config becomes one condition per α, ``<name>_alpha_<A>``, with a
constant α from epoch 0 (``selectivity_reg: [{alpha: A}]``; paper 2's sweep): the α grid of any
preset without a file per value. Combine the runs with selectivity/aggregate.py (or
tools/plot_regularization.py DIR/*/s*).
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import yaml

from selectivity.train.config import (ConfigError, from_dict, load_config, parse_sets,
                                to_dict)
from selectivity.errors import run_cli
from selectivity.regularizer import parse_windows
from selectivity.train.runlog import read_metrics, run_paths

# Keys the study decides per run (the run's place and seed); a condition may not set them.
PER_RUN = ("seed", "name", "out_dir")
_print_lock = threading.Lock()


def status(run_dir: str, epochs: int) -> str:
    """'done', 'resume' or 'new' for a run directory that should train ``epochs`` epochs."""
    paths = run_paths(run_dir)
    vals = [r for r in read_metrics(paths["metrics"]) if r.get("split") == "val"]
    if vals and vals[-1].get("epoch") == epochs:
        return "done"
    ckpts = paths["checkpoints"]
    return "resume" if os.path.isdir(ckpts) and os.listdir(ckpts) else "new"


def condition_config(values: dict) -> dict:
    """A condition's full config (validated) without the per-run keys, as written to disk."""
    cfg = to_dict(from_dict(values))
    parse_windows(cfg["selectivity_reg"])
    return {k: v for k, v in cfg.items() if k not in PER_RUN}


def plan_study(conditions: dict, seeds: list[int], out: str) -> list[dict]:
    """conditions: {name: config values (dict)} → one entry per (condition, seed), checked.

    Nothing is written here: every condition is validated before the first run starts."""
    if not conditions:
        raise ConfigError("no conditions given")
    if not seeds:
        raise ConfigError("no seeds given (--seeds 0 1 2)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"a seed is given twice: {seeds}")
    plan = []
    for name, values in conditions.items():
        bad = [k for k in PER_RUN if k in values]
        if bad:
            raise ConfigError(f"condition {name!r} sets {bad[0]!r}, which the study decides per "
                              f"run (--seeds, --out); remove it")
        cfg = condition_config(values)
        cond_dir = os.path.join(out, name)
        saved = os.path.join(cond_dir, "condition.yaml")
        if os.path.exists(saved):
            with open(saved) as f:
                old = yaml.safe_load(f) or {}
            changed = sorted(k for k in set(old) | set(cfg) if old.get(k) != cfg.get(k))
            if changed:
                raise ConfigError(f"condition {name!r} differs from the one already in "
                                  f"{cond_dir} ({', '.join(changed)}); use another --out or "
                                  f"delete {cond_dir}")
        for seed in seeds:
            run_dir = os.path.join(cond_dir, f"s{seed}")
            plan.append({"condition": name, "seed": seed, "config": cfg, "cond_dir": cond_dir,
                         "run_dir": run_dir, "status": status(run_dir, cfg["epochs"])})
    return plan


def train_command(entry: dict) -> list[str]:
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"),
           "-c", os.path.join(entry["cond_dir"], "condition.yaml"),
           "--out-dir", entry["cond_dir"], "--name", f"s{entry['seed']}",
           f"--seed={entry['seed']}"]
    return cmd + (["--resume"] if entry["status"] == "resume" else [])


def _run_one(entry: dict, env: dict, quiet: bool) -> int:
    tag = f"{entry['condition']}/s{entry['seed']}"
    cmd = train_command(entry)
    os.makedirs(entry["run_dir"], exist_ok=True)
    with open(os.path.join(entry["run_dir"], "train.log"), "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        rc = proc.wait()
    if rc == 0:
        with open(os.path.join(entry["run_dir"], "train.log")) as f:
            done = [ln.strip() for ln in f if ln.startswith("done:")]
        if not quiet:
            with _print_lock:
                print(f"  {tag}: {done[-1] if done else 'finished'}", flush=True)
    return rc


def run_study(conditions: dict, seeds: list[int], out: str, jobs: int = 1,
              dry_run: bool = False, quiet: bool = False) -> list[str]:
    """Train every (condition, seed) not yet finished; returns the failed runs' tags."""
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    plan = plan_study(conditions, seeds, out)
    if not quiet or dry_run:
        for e in plan:
            print(f"{e['condition'] + '/s' + str(e['seed']):32s} {e['status']}")
    if dry_run:
        return []
    for e in plan:
        os.makedirs(e["cond_dir"], exist_ok=True)
        path = os.path.join(e["cond_dir"], "condition.yaml")
        if not os.path.exists(path):
            from selectivity.train.checkpoint import atomic_write_text
            atomic_write_text(path, yaml.safe_dump(e["config"], sort_keys=False))
    todo = [e for e in plan if e["status"] != "done"]
    if not quiet:
        print(f"{len(plan) - len(todo)} of {len(plan)} runs finished already; "
              f"{len(todo)} to train with {jobs} job(s)", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", "1"))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        rcs = list(pool.map(lambda e: _run_one(e, env, quiet), todo))
    failed = [f"{e['condition']}/s{e['seed']}" for e, rc in zip(todo, rcs) if rc != 0]
    for tag in failed:
        print(f"FAILED: {tag}; see {os.path.join(out, tag, 'train.log')}", file=sys.stderr)
    return failed


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
    out = {}
    for name, values in conditions.items():
        for a in alphas:
            out[f"{name}_alpha_{alpha_name(a)}"] = dict(
                values, selectivity_reg=[] if a == 0 else [{"alpha": float(a)}])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="one config file per condition")
    p.add_argument("--out", required=True, help="the study's directory (DIR/<condition>/s<seed>)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (default 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every condition (repeatable)")
    p.add_argument("--alphas", type=float, nargs="+", metavar="A",
                   help="one condition per α and config (constant α from epoch 0)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    args = p.parse_args(argv)
    sets = parse_sets(args.set)
    for key in PER_RUN:
        if key in sets:
            raise ConfigError(f"--set {key}=… is decided by the study (--seeds, --out, the "
                              f"config file names); remove it")
    conditions = conditions_from_files(args.configs, sets)
    if args.alphas:
        bad = [a for a in args.alphas if not math.isfinite(a)]
        if bad:
            raise ConfigError(f"--alphas: {bad[0]} is not a finite number")
        conditions = expand_alphas(conditions, args.alphas)
    failed = run_study(conditions, args.seeds, args.out, args.jobs, args.dry_run)
    if failed:
        sys.exit(1)
    if not args.dry_run:
        print(f"all runs finished in {args.out}")


if __name__ == "__main__":
    run_cli(main)
