"""A list of configs trained one after another, resumably, into sibling run directories
(tools/sweep.py): ``configs/reg_sweep/alpha_m1.yaml`` → ``<out_dir>/alpha_m1``. Every config is
loaded and checked before the first run starts; a finished run is skipped, an unfinished one
resumed; each run's output goes to the terminal (prefixed with its name) and to its train.log."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import yaml

from selectivity.regularizer import parse_windows
from selectivity.study.launch import ROOT, run_status
from selectivity.study.launch import train_command as _train_command
from selectivity.train.config import ConfigError, load_config, parse_sets, to_dict
from selectivity.train.runlog import run_paths


def run_name(config_path: str) -> str:
    return os.path.splitext(os.path.basename(config_path))[0]


def changed_keys(run_dir: str, cfg) -> list[str]:
    """Keys whose value differs from the run directory's saved config.yaml (none if no run)."""
    path = run_paths(run_dir)["config"]
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = yaml.safe_load(f) or {}
    return [k for k, v in to_dict(cfg).items() if k in saved and saved[k] != v]


def train_command(config: str, out_dir: str, name: str, raw_sets: list[str],
                  resume: bool) -> list[str]:
    flags = []
    for item in raw_sets:  # --key=value: a value starting with "-" stays a value
        key, _, value = item.partition("=")
        flags.append(f"--{key.strip().lstrip('-').replace('-', '_')}={value}")
    return _train_command(config, out_dir, name, flags, resume)


def plan_sweep(configs: list[str], out_dir: str, sets: dict) -> list[tuple]:
    """[(config, name, run dir, status)], every config loaded and checked; warns on stderr where a
    run's saved config differs from its config now."""
    for key in ("out_dir", "name"):
        if key in sets:
            raise ConfigError(f"--set {key}=… is decided by the sweep (--out-dir, the config file "
                              f"names); remove it")
    names = [run_name(c) for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two configs would share the run directory {dup[0]!r}; rename one")
    plan = []
    for config, name in zip(configs, names):
        cfg = load_config(config, sets)
        parse_windows(cfg.selectivity_reg)
        run_dir = os.path.join(out_dir, name)
        plan.append((config, name, run_dir, run_status(run_dir, cfg.epochs)))
        changed = changed_keys(run_dir, dataclasses.replace(cfg, out_dir=out_dir, name=name))
        if changed:
            print(f"warning: {name}: the config differs from the one its run started with "
                  f"({', '.join(changed)}); delete {run_dir} to start it afresh", file=sys.stderr)
    return plan


def _train(cmd: list[str], name: str, run_dir: str, env: dict) -> int:
    """One run: its output to train.log and, prefixed with its name, to stdout."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(f"  {name}: {line}")
            sys.stdout.flush()
        return proc.wait()


def run_sweep(configs: list[str], out_dir: str, raw_sets: list[str] = (),
              dry_run: bool = False) -> tuple[int, list[str]]:
    """Print the plan, then train every run not finished: (runs planned, names of failed runs)."""
    raw_sets = list(raw_sets)
    plan = plan_sweep(configs, out_dir, parse_sets(raw_sets))
    for config, name, run_dir, st in plan:
        print(f"{name:24s} {st:7s} {config}")
    if dry_run:
        return len(plan), []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    failed = []
    for i, (config, name, run_dir, st) in enumerate(plan):
        if st == "done":
            print(f"[{i + 1}/{len(plan)}] {name}: finished, skipped", flush=True)
            continue
        cmd = train_command(config, out_dir, name, raw_sets, resume=st == "resume")
        print(f"[{i + 1}/{len(plan)}] {name}: {'resuming' if st == 'resume' else 'starting'}",
              flush=True)
        rc = _train(cmd, name, run_dir, env)
        if rc != 0:
            failed.append(name)
            print(f"[{i + 1}/{len(plan)}] {name}: FAILED (exit {rc}); see {run_dir}/train.log",
                  flush=True)
    return len(plan), failed
