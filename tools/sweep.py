#!/usr/bin/env python
"""Run a list of configs one after another, resumably, into sibling run directories.

    python tools/sweep.py CONFIG [CONFIG ...] --out-dir runs/reg_sweep [--set key=value ...]
    python tools/sweep.py configs/reg_sweep/*.yaml --out-dir runs/reg_sweep --set epochs=4

Each config trains with tools/train.py (a subprocess) into ``<out-dir>/<config file name>``
(``configs/reg_sweep/alpha_m1.yaml`` → ``<out-dir>/alpha_m1``); ``--set`` overrides apply to every
run (YAML values, as with train.py's flags). Re-running the same command is safe:
  finished run (its last val record is at its final epoch)  → skipped
  unfinished run (killed, crashed, or more epochs asked)    → continued with --resume
  no run yet                                                → started
Each run's output is appended to ``<out-dir>/<name>/train.log``. A failed run does not stop the
sweep; the exit status is non-zero when any run failed. ``--dry-run`` prints the plan only.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import yaml

from selectivity.train.config import ConfigError, load_config, parse_sets, to_dict
from selectivity.errors import run_cli
from selectivity.regularizer import parse_windows
from selectivity.train.runlog import read_metrics, run_paths


def run_name(config_path: str) -> str:
    return os.path.splitext(os.path.basename(config_path))[0]


def status(run_dir: str, epochs: int) -> str:
    """'done', 'resume' or 'new' for the run directory of a config training ``epochs`` epochs."""
    paths = run_paths(run_dir)
    vals = [r for r in read_metrics(paths["metrics"]) if r.get("split") == "val"]
    if vals and vals[-1].get("epoch") == epochs:
        return "done"
    ckpts = paths["checkpoints"]
    return "resume" if os.path.isdir(ckpts) and os.listdir(ckpts) else "new"


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
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train.py"), "-c", config,
           "--out-dir", out_dir, "--name", name]
    for item in raw_sets:  # --key=value: a value starting with "-" stays a value
        key, _, value = item.partition("=")
        cmd.append(f"--{key.strip().lstrip('-').replace('-', '_')}={value}")
    return cmd + (["--resume"] if resume else [])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="CONFIG")
    p.add_argument("--out-dir", required=True, help="parent directory of the runs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every run (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    args = p.parse_args(argv)

    sets = parse_sets(args.set)
    for key in ("out_dir", "name"):
        if key in sets:
            raise ConfigError(f"--set {key}=… is decided by the sweep (--out-dir, the config file "
                              f"names); remove it")
    names = [run_name(c) for c in args.configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two configs would share the run directory {dup[0]!r}; rename one")
    # Every config is loaded (and so checked) before the first run starts.
    plan = []
    for config, name in zip(args.configs, names):
        cfg = load_config(config, sets)
        parse_windows(cfg.selectivity_reg)
        run_dir = os.path.join(args.out_dir, name)
        plan.append((config, name, run_dir, status(run_dir, cfg.epochs)))
        changed = changed_keys(run_dir, dataclasses.replace(cfg, out_dir=args.out_dir, name=name))
        if changed:
            print(f"warning: {name}: the config differs from the one its run started with "
                  f"({', '.join(changed)}); delete {run_dir} to start it afresh", file=sys.stderr)
    for config, name, run_dir, st in plan:
        print(f"{name:24s} {st:7s} {config}")
    if args.dry_run:
        return

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    failed = []
    for i, (config, name, run_dir, st) in enumerate(plan):
        if st == "done":
            print(f"[{i + 1}/{len(plan)}] {name}: finished, skipped", flush=True)
            continue
        cmd = train_command(config, args.out_dir, name, args.set, resume=st == "resume")
        print(f"[{i + 1}/{len(plan)}] {name}: {'resuming' if st == 'resume' else 'starting'}",
              flush=True)
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
            rc = proc.wait()
        if rc != 0:
            failed.append(name)
            print(f"[{i + 1}/{len(plan)}] {name}: FAILED (exit {rc}); see {run_dir}/train.log",
                  flush=True)
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)
    print(f"all {len(plan)} runs finished in {args.out_dir}")


if __name__ == "__main__":
    run_cli(main)
