"""Unit ablation across training, for a run directory (paper 1's protocol; what
``tools/ablate.py`` prints and plots; details and choices: docs/ablation.md).

For each chosen checkpoint ``ablation_rows`` (1) ranks every residual block's units by class
selectivity on the ranking split — a fixed stratified fraction of the *training* split, without
augmentation (selectivity/train/splits.py) — and (2) ablates k units per block in all blocks of
a stage at once (or of the whole network), for each condition (selective | random | least) and
each k of the grid, measuring top-1 accuracy and loss on the *validation* split. Both steps run
inside ``evaluation.bn_statistics(model, bn_mode, calibration)`` (default recalibrate: the
BatchNorm statistics recomputed on the run's fixed training images, the model's own restored
afterwards), and every row states its ``bn_mode``.

``AblationRequest`` holds the choices (the tool's flags); ``ablation_rows(run, request)`` returns
the rows of ``ablation.jsonl`` and rewrites that file after every checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import time
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np
import torch

from selectivity.analyses.ablation import ablation as A
from selectivity.analyses.common import calibration_for, keep_or_replay, measuring
from selectivity.train.checkpoint import makedirs
from selectivity.errors import AblationError, CheckpointError
from selectivity.io import read_jsonl, write_jsonl
from selectivity.train.config import data_spec
from selectivity.train.models import unit_registry
from selectivity.train.splits import ranking_loader
from selectivity.train.runs import choose_checkpoints, load_model, run_config, val_records
from selectivity.unit_ranking import rank_units
from selectivity.units import resolve_units


@dataclasses.dataclass
class AblationRequest:
    epochs: Sequence[float] | None = None      # checkpoints by (fractional) epoch; None: all
    stages: Sequence[str] | None = None        # stages ablated one at a time; None: all
    whole: bool = False                        # all blocks of the network at once
    conditions: Sequence[str] = A.CONDITIONS
    fractions: Sequence[float] | None = None   # fractions of each block's units
    k_grid: Sequence[int] | str | None = None  # units per block, or "paper"
    mode: str = "zero"                         # zero | mean
    random_draws: int = 3
    random_fixed: bool = False                 # one random set per draw (default: per batch)
    seed: int = 0                              # random draws and the ranking split
    rank_fraction: float = 0.2
    rank_max_images: int = 50_000
    batch_size: int = 64                       # evaluation batch (the unit of random re-draws)
    max_images: int | None = None              # images per forward pass
    bn_mode: str = "recalibrate"


# ---------------------------------------------------------------------------- conditions

def scope_units(registry: "OrderedDict[str, int]", req: AblationRequest
                ) -> "OrderedDict[str, OrderedDict]":
    """{scope name: {block: units}} for the requested stages (or the whole network)."""
    if req.whole:
        return OrderedDict([(A.WHOLE, OrderedDict(registry))])
    stages = A.scopes_by_stage(registry)
    wanted = list(req.stages) if req.stages else list(stages)
    unknown = [s for s in wanted if s not in stages]
    if unknown:
        raise AblationError(f"unknown stage {unknown[0]!r}; this model has "
                            f"{', '.join(stages)} (or use --whole)")
    return OrderedDict((s, OrderedDict((n, registry[n]) for n in stages[s])) for s in wanted)


def conditions_for(scopes, req: AblationRequest, note: Callable[[str], None] = print) -> list:
    conds = []
    for scope, units in scopes.items():
        kw = dict(random_draws=req.random_draws, redraw=not req.random_fixed, scope=scope)
        if req.k_grid == "paper" or req.k_grid == ["paper"]:
            widths = set(units.values())
            if len(widths) > 1:
                raise AblationError("--k-grid paper needs blocks of one width; use --fractions "
                                    "with --whole")
            kw["k_grid"] = A.paper_k_grid(widths.pop())
        elif req.k_grid:
            cap = min(units.values())
            kw["k_grid"] = sorted({k for k in req.k_grid if k <= cap} | {0})
            dropped = [k for k in req.k_grid if k > cap]
            if dropped:
                note(f"note: {scope}: k {', '.join(map(str, dropped))} > {cap} units per block; "
                     f"dropped")
        else:
            fr = list(req.fractions) if req.fractions else list(A.DEFAULT_FRACTIONS)
            kw["fractions"] = sorted(set(fr) | {0.0})
        conds += A.make_conditions(units, req.conditions, **kw)
    return conds


# ---------------------------------------------------------------------------- measuring

def rows_for(results, ckpt, rankings, scopes, logged_acc, req: AblationRequest, n_rank
             ) -> list[dict]:
    """Aggregate the results (random draws averaged) into ablation.jsonl rows."""
    base = [r for r in results if r.condition.units_ablated == 0]
    acc0 = base[0].acc1
    loss0 = base[0].loss
    groups: "OrderedDict[tuple, list]" = OrderedDict()
    for r in results:
        c = r.condition
        groups.setdefault((c.scope, c.kind, c.grid), []).append(r)
    rows = []
    for (scope, kind, grid), rs in groups.items():
        c = rs[0].condition
        units = scopes[scope]
        ks = [k for _, k in c.k]
        total = sum(units.values())
        sis = torch.cat([rankings[n].si for n in units])
        if kind == "random":
            si_abl = float(sis.mean())  # the expectation over random sets
        else:
            picked = [rankings[n].most(k) if kind == "selective" else rankings[n].least(k)
                      for n, k in c.k]
            vals = torch.cat([rankings[n].si[p] for (n, _), p in zip(c.k, picked)])
            si_abl = float(vals.mean()) if vals.numel() else None
        accs = [r.acc1 for r in rs]
        row = {"epoch": round(ckpt.epoch, 6), "step": ckpt.step,
               "checkpoint": os.path.basename(ckpt.path), "stage": scope, "condition": kind,
               "k": ks[0] if len(set(ks)) == 1 else None, "grid": grid,
               "fraction": sum(ks) / total, "units_ablated": sum(ks), "units": total,
               "acc1": float(np.mean(accs)), "loss": float(np.mean([r.loss for r in rs])),
               "norm_acc1": float(np.mean(accs)) / acc0 if acc0 > 0 else None,
               "acc1_unablated": acc0, "loss_unablated": loss0, "acc1_logged": logged_acc,
               "chance": 1.0 / len(rs[0].count), "bn_mode": req.bn_mode,
               "mode": req.mode, "si_ablated": si_abl,
               "images": rs[0].images, "rank_images": n_rank}
        if kind == "random":
            row.update(acc1_sd=float(np.std(accs)), acc1_draws=accs,
                       norm_acc1_draws=[a / acc0 if acc0 > 0 else None for a in accs],
                       loss_draws=[r.loss for r in rs], redraw=not req.random_fixed)
        rows.append(row)
    return rows


def logged_accuracy(run: str, bn_mode: str) -> dict:
    """{step: the trainer's val accuracy of the same weights under ``bn_mode``}, from the run's
    metrics (``acc1`` is measured with the run's ``bn_mode``, ``acc1_running`` with the running
    statistics); empty where the run logged no comparable value."""
    out = {}
    for r in val_records(run):
        if r.get("bn_mode", "running") == bn_mode and "acc1" in r:
            out[r["step"]] = r["acc1"]
        elif bn_mode == "running" and r.get("acc1_running") is not None:
            out[r["step"]] = r["acc1_running"]
    return out


@dataclasses.dataclass
class Progress:
    """What ``ablation_rows`` reports as it goes (the tool prints it)."""
    checkpoints: int
    conditions: int
    rank_images: int
    val_images: int


def ablation_rows(run: str, req: AblationRequest, device="cpu", out_jsonl: str | None = None,
                  on_start: Callable[[Progress], None] | None = None,
                  on_checkpoint: Callable[[object, list, float | None, float], None] | None = None,
                  note: Callable[[str], None] = print) -> list[dict]:
    """The ablation rows of ``run`` (module doc). ``out_jsonl`` (default ``run/ablation.jsonl``
    is the tool's) is rewritten after every checkpoint. ``on_checkpoint(ckpt, new_rows,
    logged_acc, seconds)`` is called after each checkpoint."""
    if req.mode not in A.MODES:
        raise AblationError(f"unknown mode {req.mode!r}; choose one of {', '.join(A.MODES)}")
    cfg = run_config(run)
    ckpts = choose_checkpoints(run, req.epochs, steps=True)
    # The same model (so the same scopes and conditions) at every checkpoint: check the request
    # before any data is read.
    model = load_model(cfg, ckpts[0], device)
    scopes = scope_units(unit_registry(model), req)
    layers = [n for units in scopes.values() for n in units]
    conds = conditions_for(scopes, req, note)
    from selectivity.pipelines import build_loader
    ecfg = dataclasses.replace(cfg, eval_batch_size=req.batch_size)
    data = data_spec(ecfg)
    val_ld = build_loader(data, "val", device)
    rank_ld = ranking_loader(data, device, req.rank_fraction, req.seed, req.rank_max_images,
                             req.batch_size)
    num_classes, n_val, n_rank = val_ld.num_classes, len(val_ld.labels), len(rank_ld.labels)
    val, rank = keep_or_replay(val_ld, cfg.image_size), keep_or_replay(rank_ld, cfg.image_size)
    calib = calibration_for(cfg, device, req.bn_mode)
    logged = logged_accuracy(run, req.bn_mode)
    if on_start is not None:
        on_start(Progress(len(ckpts), len(conds), n_rank, n_val))
    if out_jsonl:
        makedirs(os.path.dirname(os.path.abspath(out_jsonl)))
    rows = []
    for ckpt in ckpts:
        t0 = time.perf_counter()
        model = load_model(cfg, ckpt, device)
        with measuring(model, req.bn_mode, calib):
            hooked = resolve_units(model, layers)
            rankings = rank_units(model, rank, layers=hooked, num_classes=num_classes)
            results = A.evaluate_ablations(model, val, conds, rankings, layers=layers,
                                           mode=req.mode, seed=req.seed,
                                           max_images=req.max_images)
        acc_log = logged.get(ckpt.step)
        new = rows_for(results, ckpt, rankings, scopes, acc_log, req, n_rank)
        rows += new
        if out_jsonl:
            write_jsonl(out_jsonl, rows)
        if on_checkpoint is not None:
            on_checkpoint(ckpt, new, acc_log, time.perf_counter() - t0)
    return rows


def read_rows(path: str) -> list[dict]:
    """The rows of an ``ablation.jsonl``; a missing file is an error saying how to make it."""
    if not os.path.exists(path):
        raise CheckpointError(f"no {path}; run tools/ablate.py without --plot-only first")
    return read_jsonl(path)
