"""The one command of the small-scale study (tools/reproduce.py): train every condition of the
design for every seed (runner: resumable), then write the findings from the runs there are."""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from selectivity.study import aggregate as agg
from selectivity.study.design import SEEDS, TINY_SEEDS, study_conditions
from selectivity.study.findings import write_findings
from selectivity.study.launch import ROOT
from selectivity.study.runner import run_study
from selectivity.train.config import ConfigError

DEFAULT_OUT = os.path.join(ROOT, "runs", "reproduce")
DEFAULT_DOCS = os.path.join(ROOT, "docs")


@dataclass
class Reproduction:
    """What a call did: the runs that failed to train (then nothing else was done), or the
    findings written; seconds spent training and in all."""
    failed: list = field(default_factory=list)
    findings: str | None = None
    docs: str = ""
    train_s: float = 0.0
    total_s: float = 0.0


def reproduce(out: str = DEFAULT_OUT, docs: str | None = None, seeds: list[int] | None = None,
              jobs: int = 2, tiny: bool = False, analyse_only: bool = False) -> Reproduction:
    """Train (unless ``analyse_only``) and write ``<docs>/findings.md`` and ``<docs>/findings/``;
    ``docs`` defaults to docs/ of the checkout, or ``out`` with ``tiny``."""
    seeds = seeds or (TINY_SEEDS if tiny else SEEDS)
    if not tiny and len(seeds) < 3:
        raise ConfigError(f"the study needs at least 3 seeds for its intervals, got {seeds}")
    docs = docs or (out if tiny else DEFAULT_DOCS)
    conditions = study_conditions(tiny)
    t0 = time.time()
    if not analyse_only:
        failed = run_study(conditions, seeds, out, jobs)
        if failed:
            return Reproduction(failed=failed, docs=docs)
    t_train = time.time() - t0
    run_dirs = [os.path.join(out, c, f"s{s}") for c in conditions for s in seeds]
    run_dirs = [d for d in run_dirs if os.path.exists(os.path.join(d, "config.yaml"))]
    if not run_dirs:
        raise ConfigError(f"no runs in {out}; run without --analyse-only first")
    groups = OrderedDict()
    for cond in conditions:  # group by the study's own condition names (its folders)
        runs = [agg.load_run(d) for d in run_dirs if os.path.basename(os.path.dirname(d)) == cond]
        if runs:
            groups[cond] = runs
    command = "python tools/reproduce.py" + (" --tiny" if tiny else "")
    path = write_findings(groups, docs, command, tiny, out, jobs)
    return Reproduction(findings=path, docs=docs, train_s=t_train, total_s=time.time() - t0)
