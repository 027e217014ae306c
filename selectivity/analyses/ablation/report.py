"""The ablation of a run as ``tools/ablate.py`` reports it: ``report`` measures (or, with
``plot_only``, re-reads) ``ablation.jsonl``, draws the figures and hands every line it has to say
to ``echo``: progress per checkpoint, then the AUC summary table (``summary_lines``)."""
from __future__ import annotations

import os
import time
from typing import Callable

from selectivity.analyses.ablation import ablation as A
from selectivity.analyses.ablation.run import AblationRequest, Progress, ablation_rows, read_rows
from selectivity.analyses.common import set_threads
from selectivity.train.distributed import choose_device
from selectivity.train.runs import run_config

# The tool's --help after its synopsis: what is measured and what is written.
HELP = """
For each chosen checkpoint (default: all of RUN/checkpoints, sub-epoch step_*.pt included):
  1. rank every residual block's units by class selectivity on the ranking split — a fixed
     stratified --rank-fraction of the TRAINING split, without augmentation;
  2. ablate k units per block in all blocks of a stage at once (or of the whole network with
     --whole), for each condition and each k of the grid, and measure top-1 accuracy and loss on
     the VALIDATION split (never the ranking images).
Both with the BatchNorm statistics of --bn-mode (default: recomputed on the run's fixed training
images before each checkpoint; the checkpoint itself is untouched).
Grid: --fractions of each block's units (default 0 1/8 1/4 3/8 1/2 3/4 1), or --k-grid with
absolute units per block (k larger than a stage's blocks is dropped for that stage), or
--k-grid paper (paper 1: steps of 15 to C/2, then 40; for big models).
Random units are re-drawn for every batch of --batch-size images (paper 1) unless
--random-fixed; --random-draws independent draws are averaged (their s.d. is kept).

Writes (OUT defaults to RUN; OUT/ablation.jsonl is rewritten atomically after every checkpoint):
  OUT/ablation.jsonl             one line per (checkpoint, stage, condition, k): epoch, step, stage,
                                 condition, k, fraction, acc1, loss, norm_acc1 (acc1 / unablated
                                 acc1), acc1_unablated, bn_mode, per-draw values for random,
                                 si_ablated, ...
  OUT/figures/ablation_curves_<stage>.png   normalized accuracy against k, a panel per checkpoint
  OUT/figures/ablation_auc.png   area under that curve (mean over the grid) against epoch
and prints a summary table. The measurement is selectivity.analyses.ablation.run.ablation_rows;
details and choices: docs/ablation.md.
"""


def summary_lines(rows) -> list[str]:
    """The AUC table of ``rows``: one line per (checkpoint, stage), a column per condition
    (random: ± s.d. over draws) and selective − random."""
    table = A.auc_table(rows)
    acc0 = {(r["epoch"], r["step"], r["stage"]): r["acc1_unablated"] for r in rows}
    conds = [c for c in A.CONDITIONS if any(c in v for v in table.values())]
    head = f"{'epoch':>7} {'step':>5} {'stage':>7} {'acc1':>6} " + " ".join(
        f"{'AUC ' + c:>14}" for c in conds)
    if "selective" in conds and "random" in conds:
        head += f" {'sel-rand':>8}"
    lines = [head]
    for key, v in table.items():
        line = f"{key[0]:7.3f} {key[1]:5d} {key[2]:>7} {acc0[key]:6.3f} "
        line += " ".join((f"{v[c][0]:7.3f} ±{v[c][1]:.3f}" if c == "random" else
                          f"{v[c][0]:14.3f}") if c in v else f"{'':>14}" for c in conds)
        if "selective" in v and "random" in v:
            line += f" {v['selective'][0] - v['random'][0]:+8.3f}"
        lines.append(line)
    return lines


def _started(run: str, req: AblationRequest, p: Progress) -> str:
    return (f"{run}: {p.checkpoints} checkpoint(s), {p.conditions} conditions; ranking on "
            f"{p.rank_images} train images (stratified {req.rank_fraction:g}), evaluating on "
            f"{p.val_images} val images; mode {req.mode}; BN {req.bn_mode}")


def _checkpoint_done(ckpt, new: list, acc_log: float | None, seconds: float) -> str:
    acc0 = new[0]["acc1_unablated"]
    check = ""
    if acc_log is not None:  # the trainer's evaluation of the same weights, same BN mode
        same = abs(acc_log - acc0) < 1.5 / new[0]["images"]
        check = f" (logged {acc_log:.4f}{'' if same else ' MISMATCH'})"
    return (f"  epoch {ckpt.epoch:.4g} step {ckpt.step}: unablated acc1 {acc0:.4f}{check}; "
            f"{seconds:.1f} s")


def report(run: str, req: AblationRequest, *, out: str | None = None, device: str = "auto",
           threads: int | None = None, figures: bool = True, plot_only: bool = False,
           echo: Callable[[str], None] = print) -> list[dict]:
    """Ablate ``run`` (module doc) into ``out`` (default: the run's folder), or with
    ``plot_only`` redraw the figures and the summary from its ``ablation.jsonl``; returns the
    rows."""
    from selectivity.analyses.ablation.figures import write_figures

    cfg = run_config(run)
    out = out or run
    out_path = os.path.join(out, "ablation.jsonl")
    fig_dir = os.path.join(out, "figures")
    if plot_only:
        rows = read_rows(out_path)
        written = write_figures(rows, fig_dir)
        for line in summary_lines(rows):
            echo(line)
        echo(f"wrote {', '.join(written)}")
        return rows
    device = choose_device(device)
    set_threads(threads, cfg)
    t_all = time.perf_counter()
    rows = ablation_rows(run, req, device, out_path,
                         on_start=lambda p: echo(_started(run, req, p)),
                         on_checkpoint=lambda *a: echo(_checkpoint_done(*a)), note=echo)
    written = [out_path] + (write_figures(rows, fig_dir) if figures else [])
    for line in summary_lines(rows):
        echo(line)
    echo(f"done in {time.perf_counter() - t_all:.1f} s; wrote {', '.join(written)}")
    return rows
