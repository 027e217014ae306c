"""Conditions × seeds, resumably (tools/study.py): every condition trains once per seed into
``<out>/<condition>/s<seed>``, from the merged config written to
``<out>/<condition>/condition.yaml``. A finished run is skipped, an unfinished one resumed; a condition whose saved config differs from
the new one is refused; a failed run does not stop the others."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import yaml

from selectivity.io import atomic_write_text
from selectivity.study.conditions import (PER_RUN, check_sets, condition_config,
                                          conditions_from_files, expand_alphas)
from selectivity.study.launch import ROOT, run_status
from selectivity.study.launch import train_command as _train_command
from selectivity.train.config import ConfigError, parse_sets

_print_lock = threading.Lock()


def plan_study(conditions: dict, seeds, out: str) -> list[dict]:
    """conditions: {name: config values (dict)} → one entry per (condition, seed), checked;
    ``seeds``: one list for every condition, or {name: its seeds}.

    Nothing is written here: every condition is validated before the first run starts."""
    if not conditions:
        raise ConfigError("no conditions given")
    per = seeds if isinstance(seeds, dict) else {name: seeds for name in conditions}
    for some in per.values():
        if not some:
            raise ConfigError("no seeds given (--seeds 0 1 2)")
        if len(set(some)) != len(some):
            raise ConfigError(f"a seed is given twice: {some}")
    plan = []
    for name, values in conditions.items():
        if name not in per:
            continue
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
        for seed in per[name]:
            run_dir = os.path.join(cond_dir, f"s{seed}")
            plan.append({"condition": name, "seed": seed, "config": cfg, "cond_dir": cond_dir,
                         "run_dir": run_dir, "status": run_status(run_dir, cfg["epochs"])})
    return plan


def train_command(entry: dict) -> list[str]:
    return _train_command(os.path.join(entry["cond_dir"], "condition.yaml"), entry["cond_dir"],
                          f"s{entry['seed']}", [f"--seed={entry['seed']}"],
                          resume=entry["status"] == "resume")


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


def run_study(conditions: dict, seeds, out: str, jobs: int = 1,
              dry_run: bool = False, quiet: bool = False) -> list[str]:
    """Train every (condition, seed) not yet finished (``seeds`` as in ``plan_study``); returns
    the failed runs' tags."""
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


def study_from_files(configs: list[str], out: str, seeds: list[int], jobs: int = 1,
                     raw_sets: list[str] = (), alphas: list[float] | None = None,
                     dry_run: bool = False) -> list[str]:
    """tools/study.py: each config file a condition (``--set`` applied to each; with ``alphas``,
    one condition per α and file), trained for every seed; returns the failed runs' tags."""
    sets = parse_sets(list(raw_sets))
    check_sets(sets)
    conditions = conditions_from_files(configs, sets)
    if alphas:
        conditions = expand_alphas(conditions, alphas)
    return run_study(conditions, seeds, out, jobs, dry_run)
