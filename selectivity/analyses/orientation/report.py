"""Orientation selectivity across training as ``tools/orientation.py`` reports it: ``report``
plans the measurement (``Plan``), measures, draws the figures and hands every line it has to say
to ``echo``: the plan, one line per checkpoint (``record_line``), then the summary tables
(``summary_lines``)."""
from __future__ import annotations

import os
from typing import Callable

import numpy as np

from selectivity.analyses.common import set_threads
from selectivity.analyses.orientation.run import CENTRED, Plan, orientation_records
from selectivity.train.distributed import choose_device

# The tool's --help after its synopsis: what is measured and what is written.
HELP = """
Per checkpoint (default: every epoch_* one; --steps adds step_*):
  - gratings at the model's input size (12 orientations, 4 phases, Ukita's SF ladder), normalised
    like the dataset; R[unit, SF, orientation] per layer (--layers, default: the stem ReLU and
    every residual block output; for a model without residual blocks, the run's track_units);
    OSI, gOSI, and the permuted control (per-unit shuffle);
  - on the val images (the first --max-images of a fixed shuffled order, --seed): val loss,
    accuracy, and shift invariance (mean over images of the Pearson correlation across units
    between responses to an image and to the image circularly shifted by --shift px) at
    --shift-layers (default: the stage outputs, else the last three layers), both raw and
    "centred" (each unit's mean response over the val images removed first; the raw value is
    dominated by the unit-mean profile all images share and sits near 1 even at init, so
    figures and summary use the centred one);
  - at --ablate-epochs (default: every measured epoch), for each layer: zero the top half of its
    live units by gOSI, then the bottom half (dead units excluded), and measure the same again.
    Ukita's metric is the mean per-image increase in cross-entropy (± SEM).
BatchNorm statistics: --bn-mode (default: recomputed on the run's fixed training images).
Writes OUT/orientation.jsonl (OUT defaults to RUN; one line per checkpoint; NaN as null) and
into OUT/figures/:
  orientation_gosi.png           per layer: violins of gOSI vs the control at --plot-epochs
  orientation_gosi_by_epoch.png  mean gOSI of live units per layer vs epoch, control dashed
  orientation_ablation.png       loss increase and accuracy drop, top vs bottom half, per layer
  orientation_shift.png          shift invariance vs epoch, and after each ablation
The measurement is selectivity.analyses.orientation.run.orientation_records.
"""


def _f(v, fmt=".3f"):
    return "nan" if v is None or not np.isfinite(v) else format(v, fmt)


def plan_line(plan: Plan) -> str:
    n_sf, n_orient, n_phase = plan.gratings.images.shape[:3]
    return (f"orientation: {plan.name}: {len(plan.ckpts)} checkpoint(s), {len(plan.layers)} "
            f"layer(s), {n_sf}×{n_orient}×{n_phase} gratings at {plan.cfg.image_size} px, "
            f"at most {plan.max_images} val images, shift {plan.shift} px; ablation at "
            f"{len(plan.ablate_at)} checkpoint(s); BN {plan.bn_mode}")


def record_line(rec: dict, layers, shift_layers) -> str:
    """One checkpoint: val loss and accuracy, mean gOSI per layer, shift invariance."""
    b = rec["baseline"]
    return (f"epoch {rec['epoch']:.3g} (step {rec['step']}): val loss {_f(b['loss'])} "
            f"acc {_f(b['acc1'])}; mean gOSI (control) "
            + ", ".join(f"{n} {_f(rec['layers'][n]['gosi_mean'])} "
                        f"({_f(rec['layers'][n]['control_gosi_mean'])})" for n in layers)
            + "; shift invariance (centred / raw) "
            + ", ".join(f"{n} {_f(b[CENTRED][n])} / {_f(b['shift_invariance'][n])}"
                        for n in shift_layers))


def summary_lines(records: list[dict], layers, shift_layers) -> list[str]:
    """gOSI per layer at up to six epochs, then the last checkpoint's ablations."""
    w = max(8, *(len(n) for n in layers))
    shown = records if len(records) <= 6 else \
        [records[i] for i in np.unique(np.linspace(0, len(records) - 1, 6).round().astype(int))]
    lines = ["\nsummary: mean gOSI of live units (permuted control) [tuned fraction, dead units]"
             + ("" if shown is records else f"; {len(shown)} of {len(records)} epochs shown"),
             f"{'layer':<{w}} " + " ".join(f"{'ep ' + format(r['epoch'], '.3g'):>22}"
                                           for r in shown)]
    for n in layers:
        cells = []
        for r in shown:
            d = r["layers"][n]
            cells.append(f"{_f(d['gosi_mean'], '.2f')} ({_f(d['control_gosi_mean'], '.2f')}) "
                         f"[{_f(d['tuned_frac'], '.2f')},{d['dead']:>3}]")
        lines.append(f"{n:<{w}} " + " ".join(f"{c:>22}" for c in cells))
    ablated = [r for r in records if r["ablation"]]
    if not ablated:
        return lines
    last = ablated[-1]
    top_layer = shift_layers[-1]
    b = last["baseline"]
    lines += [f"\nablation at epoch {last['epoch']:.3g} (val loss {_f(b['loss'])}, acc "
              f"{_f(b['acc1'])}, centred shift invariance of {top_layer} "
              f"{_f(b[CENTRED][top_layer])}): zero the top / bottom half of live units by gOSI",
              f"{'layer':<{w}} {'half':>6} {'units':>9} {'gOSI':>6} {'Δloss ± SEM':>16} "
              f"{'Δacc':>7} {'shift inv ' + top_layer:>18}"]
    for a in last["ablation"]:
        lines.append(f"{a['layer']:<{w}} {a['group']:>6} {a['units']:>4}/{a['of_live']:<4} "
                     f"{_f(a['gosi_mean'], '.2f'):>6} "
                     f"{'+' if a['loss_increase'] >= 0 else ''}{_f(a['loss_increase'], '.4f')} ± "
                     f"{_f(a['loss_increase_sem'], '.4f'):<6} {-a['acc_drop']:>+7.3f} "
                     f"{_f(a[CENTRED][top_layer]):>18}")
    return lines


def report(run: str, *, out: str | None = None, threads: int | None = None,
           device: str = "auto", plot_epochs=None, echo: Callable[[str], None] = print,
           **plan) -> list[dict]:
    """Orientation selectivity of ``run`` into ``out`` (default: the run's folder): the records
    (``orientation_records`` of ``Plan(run, **plan)``), the figures and the printed lines;
    returns the records."""
    from selectivity.analyses.orientation.figures import write_figures

    plan = Plan(run, device=choose_device(device), plot_epochs=plot_epochs, **plan)
    set_threads(threads, plan.cfg)
    out = out or run
    out_jsonl = os.path.join(out, "orientation.jsonl")
    echo(plan_line(plan))
    records = orientation_records(
        plan, out_jsonl, on_record=lambda r: echo(record_line(r, plan.layers, plan.shift_layers)))
    written = write_figures(records, plan.layers, plan.shift_layers, plan.shift,
                            f"orientation selectivity: {plan.name}", os.path.join(out, "figures"),
                            plot_epochs)
    for line in summary_lines(records, plan.layers, plan.shift_layers):
        echo(line)
    echo(f"wrote {out_jsonl}, " + ", ".join(written))
    return records
