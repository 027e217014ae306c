"""The one command of the small-scale study (tools/reproduce.py): pilot → n → main runs →
findings, every step resumable.

1. train every condition on the pilot seeds, and analyse their α = 0 checkpoints;
2. the pilot's record: SI's peak epoch and each condition's n (pilot.py), pinned with the rules;
3. train every condition on its main seeds 0 … n − 1, and analyse the α = 0 checkpoints;
4. write the findings from the main seeds (findings.py), the pilot's record beside them.

Runs live in ``<out>/<condition>/s<seed>``; the analyses in ``<out>/analysis/<tool>/s<seed>``.
A finished run or analysis is skipped, an unfinished run resumed."""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field

from selectivity.study import aggregate as agg
from selectivity.study import pilot as pilot_step
from selectivity.study.analysis_runs import records, run_tool
from selectivity.study.analysis_values import ablation_auc
from selectivity.study.claims import StudyData
from selectivity.study.design import (BASE, N_CAP, N_MIN, PILOT_SEEDS, TINY_N_CAP, TINY_N_MIN,
                                      TINY_PILOT_SEEDS, study_conditions)
from selectivity.study.findings import write_findings
from selectivity.study.launch import ROOT
from selectivity.study.runner import run_study
from selectivity.train.config import ConfigError

DEFAULT_OUT = os.path.join(ROOT, "runs", "reproduce")
DEFAULT_DOCS = os.path.join(ROOT, "docs")
TOOLS = ("ablate", "cka", "orientation")


@dataclass
class Reproduction:
    """What a call did: the runs that failed (then nothing after them was done), or the findings
    written; seconds spent training and in all."""
    failed: list = field(default_factory=list)
    findings: str | None = None
    docs: str = ""
    train_s: float = 0.0
    total_s: float = 0.0


def load(out: str, seeds: dict, jobs: int, analyse: bool) -> tuple[StudyData, list]:
    """The runs of ``seeds`` ({condition: seeds}) and, with ``analyse``, the analyses of the
    α = 0 ones (run here if missing). Returns the data and the analyses that failed."""
    runs = {c: {s: agg.load_run(os.path.join(out, c, f"s{s}")) for s in ss}
            for c, ss in seeds.items()}
    analyses, failed = {}, []
    base = list(runs.get(BASE, {}).values())
    if analyse and base:
        for tool in TOOLS:
            done = run_tool(tool, base, out, jobs)
            if tool == "ablate":
                per = {r.seed: ablation_auc(done[r.path]) for r in base
                       if os.path.isdir(done[r.path])}
                failed += [v for v in done.values() if not os.path.isdir(v)]
            else:
                per, bad = records(base, done, f"{tool}.jsonl")
                failed += bad
            analyses[tool] = per
    return StudyData(runs, analyses), failed


def reproduce(out: str = DEFAULT_OUT, docs: str | None = None, jobs: int = 2, tiny: bool = False,
              analyse_only: bool = False) -> Reproduction:
    """Run the study (unless ``analyse_only``: findings from the runs there are) and write
    ``<docs>/findings.md`` with ``<docs>/findings/``; ``docs`` defaults to docs/ of the
    checkout, or ``out`` with ``tiny`` (a tiny run never overwrites the committed findings)."""
    docs = docs or (out if tiny else DEFAULT_DOCS)
    conditions = study_conditions(tiny)
    pilot_seeds = TINY_PILOT_SEEDS if tiny else PILOT_SEEDS
    n_min, n_cap = (TINY_N_MIN, TINY_N_CAP) if tiny else (N_MIN, N_CAP)
    t0, t_train = time.time(), 0.0

    def train(seeds) -> list:
        nonlocal t_train
        if analyse_only:
            return []
        t = time.time()
        failed = run_study(conditions, seeds, out, jobs)
        t_train += time.time() - t
        return failed

    # 1-2: the pilot and its record
    failed = train(pilot_seeds)
    if failed:
        return Reproduction(failed=failed, docs=docs)
    pilot_data, bad = load(out, {c: pilot_seeds for c in conditions}, jobs, analyse=True)
    if bad:
        return Reproduction(failed=bad, docs=docs)
    record = pilot_step.fix(pilot_step.plan(pilot_data, n_min, n_cap),
                            os.path.join(out, "pilot.json"))
    # 3: the main seeds
    main = {c: list(range(record["n"].get(c, n_min))) for c in conditions}
    failed = train(main)
    if failed:
        return Reproduction(failed=failed, docs=docs)
    missing = [f"{c}/s{s}" for c, ss in main.items() for s in ss
               if not os.path.exists(os.path.join(out, c, f"s{s}", "config.yaml"))]
    if missing:
        raise ConfigError(f"{len(missing)} main run(s) missing in {out} (e.g. {missing[0]}); "
                          f"run without --analyse-only first")
    data, bad = load(out, main, jobs, analyse=True)
    if bad:
        return Reproduction(failed=bad, docs=docs)
    data.peak_epoch = math.nan if record["peak_epoch"] is None else record["peak_epoch"]
    # 4: the findings, the pilot's record beside them
    command = "python tools/reproduce.py" + (" --tiny" if tiny else "")
    path = write_findings(data, record, docs, command, tiny)
    shutil.copyfile(os.path.join(out, "pilot.json"), os.path.join(docs, "findings", "pilot.json"))
    return Reproduction(findings=path, docs=docs, train_s=t_train, total_s=time.time() - t0)
