"""The analysis tools run on a study's runs (reproduce.py, for the claims on checkpoints): tools/ablate.py, tools/cka.py and
tools/orientation.py, each as a subprocess through its own command line (what a user would type)
on every seed, into ``<out>/analysis/<tool>/<seed>``, with bounded arguments. A finished one (its
``.done`` marker holding the same arguments) is skipped, so the study stays resumable."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from selectivity.study.launch import ROOT

CKA_EPOCHS = (0, 1, 2)        # and the final one: the early epochs, where paper 1 looks
ABLATION_EPOCHS = (1,)        # the first trained checkpoint, and the final one
ORIENTATION_IMAGES = 1000     # val images for loss and shift invariance (the tool's default: all)


def _final_epoch(run) -> float:
    return float(run.config.get("epochs", 0))


def _epochs(early, run) -> list[str]:
    final = _final_epoch(run)
    return [f"{e:g}" for e in sorted({e for e in early if e < final} | {final})]


def tool_args(tool: str, run) -> list[str]:
    """The bounded arguments each tool gets. CKA's fresh random-init baseline is seeded from the
    run's own seed, so the baseline spans as many initialisations as there are seeds."""
    if tool == "cka":
        return ["--epochs"] + _epochs(CKA_EPOCHS, run) + ["--seed", str(run.seed)]
    if tool == "ablate":
        return ["--epochs"] + _epochs(ABLATION_EPOCHS, run) + ["--no-figures"]
    if tool == "orientation":
        return ["--epochs"] + _epochs((0.0, 1.0), run) + [
            "--ablate-epochs", f"{_final_epoch(run):g}", "--max-images", str(ORIENTATION_IMAGES)]
    raise ValueError(f"no analysis tool {tool!r}")


def run_tool(tool: str, runs, out: str, jobs: int) -> dict:
    """``tools/<tool>.py RUN --out <out>/analysis/<tool>/<seed> [tool_args]`` for every run;
    {run path: its output folder, or the error}. A folder whose .done marker holds the same
    arguments is taken as it is; different arguments measure it again."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def one(run):
        d = os.path.join(out, "analysis", tool, os.path.basename(run.path))
        args = tool_args(tool, run)
        marker = os.path.join(d, ".done")
        if os.path.exists(marker):
            with open(marker) as f:
                if f.read() == json.dumps(args):
                    return run.path, d
            os.remove(marker)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"{tool}.log"), "w") as log:
            rc = subprocess.call([sys.executable, os.path.join(ROOT, "tools", f"{tool}.py"),
                                  run.path, "--out", d] + args, cwd=ROOT, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        if rc != 0:
            return run.path, f"tools/{tool}.py exited {rc}; see {d}/{tool}.log"
        with open(marker, "w") as f:
            f.write(json.dumps(args))
        return run.path, d

    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:
        return dict(pool.map(one, runs))


def records(runs, done: dict, name: str) -> tuple[dict, list]:
    """({seed: {epoch: record}}, the errors) from ``run_tool``'s result: the records of the
    tool's ``name`` (e.g. cka.jsonl) measured on a checkpoint of an epoch."""
    per_seed, failed = {}, []
    for run in runs:
        v = done.get(run.path)
        if v is None:
            continue
        if not os.path.isdir(v):
            failed.append(v)
            continue
        with open(os.path.join(v, name)) as f:
            recs = [json.loads(line) for line in f if line.strip()]
        per_seed[run.seed] = {round(float(r["epoch"]), 6): r for r in recs
                              if str(r.get("checkpoint", "")).startswith("epoch_")}
    return per_seed, failed


def failed_note(failed, what) -> str:
    return (f"\n\n{len(failed)} {what} run(s) failed: " + "; ".join(failed)) if failed else ""
