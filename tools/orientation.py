#!/usr/bin/env python
"""Orientation selectivity of a run's units to sinusoidal gratings, per checkpoint (Ukita 2020):
gOSI against a permuted control, the effect of ablating the most vs the least orientation-selective
half of a layer on val loss and accuracy, and the shift invariance of higher layers with and
without that ablation.

    python tools/orientation.py RUN [--epochs 0 1 8] [--steps] [--layers relu layer1.0 ...]
                                [--ablate-epochs 8 | --no-ablation] [--shift 4]
                                [--shift-layers layer1 layer2 layer3] [--max-images 10000]
                                [--seed S] [--out DIR] [--device auto|cpu|cuda] [--threads N]
                                [--bn-mode recalibrate|running|batch]

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
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import matplotlib

matplotlib.use("Agg")
import numpy as np

from selectivity.analyses.common import set_threads
from selectivity.train.distributed import choose_device
from selectivity.errors import run_cli
from selectivity.analyses.orientation.run import CENTRED, Plan, orientation_records
from selectivity.toolargs import Parser, add_common, positive


def parse_args(argv=None):
    p = Parser(description=__doc__)
    add_common(p, out_help="output folder: orientation.jsonl, and figures/ (default: RUN)")
    p.add_argument("--epochs", type=float, nargs="+", help="checkpoint epochs (default: all)")
    p.add_argument("--steps", action="store_true",
                   help="also the step_* checkpoints taken inside an epoch")
    p.add_argument("--layers", nargs="+",
                   help="module names or globs (default: the stem relu and every residual "
                        "block; without blocks, the run's track_units)")
    ablation = p.add_mutually_exclusive_group()
    ablation.add_argument("--ablate-epochs", type=float, nargs="+",
                          help="epochs at which to run the ablations (default: every measured "
                               "epoch)")
    ablation.add_argument("--no-ablation", action="store_true", help="skip the ablations")
    p.add_argument("--shift", type=int, help="circular shift in px, down and right "
                                             "(default: image size / 8)")
    p.add_argument("--shift-layers", nargs="+",
                   help="layers whose shift invariance is measured (default: the stage outputs)")
    p.add_argument("--max-images", type=int, default=10000,
                   help="val images for loss, accuracy and shift invariance (default 10000)")
    p.add_argument("--batch-size", type=int, help="val batch size (default: the run's "
                                                  "eval_batch_size)")
    p.add_argument("--plot-epochs", type=float, nargs="+",
                   help="epochs drawn as violins (default: first, middle and last)")
    p.add_argument("--seed", type=int, default=0,
                   help="the permuted control and the val order's shuffle (default 0)")
    args = p.parse_args(argv)
    positive(p, args, "max_images", "batch_size")
    return args


def main(argv=None):
    from selectivity.analyses.orientation.figures import write_figures

    args = parse_args(argv)
    device = choose_device(args.device)
    plan = Plan(args.run, epochs=args.epochs, steps=args.steps, layers=args.layers,
                shift_layers=args.shift_layers, ablate_epochs=args.ablate_epochs,
                no_ablation=args.no_ablation, shift=args.shift, max_images=args.max_images,
                batch_size=args.batch_size, plot_epochs=args.plot_epochs, device=device,
                bn_mode=args.bn_mode, seed=args.seed)
    set_threads(args.threads, plan.cfg)
    out = args.out or args.run
    out_jsonl = os.path.join(out, "orientation.jsonl")
    n_sf, n_orient, n_phase = plan.gratings.images.shape[:3]
    print(f"orientation: {plan.name}: {len(plan.ckpts)} checkpoint(s), {len(plan.layers)} "
          f"layer(s), {n_sf}×{n_orient}×{n_phase} gratings at {plan.cfg.image_size} px, "
          f"at most {plan.max_images} val images, shift {plan.shift} px; ablation at "
          f"{len(plan.ablate_at)} checkpoint(s); BN {plan.bn_mode}", flush=True)
    records = orientation_records(
        plan, out_jsonl, on_record=lambda r: print_epoch(r, plan.layers, plan.shift_layers))
    written = write_figures(records, plan.layers, plan.shift_layers, plan.shift,
                            f"orientation selectivity: {plan.name}", os.path.join(out, "figures"),
                            args.plot_epochs)
    print_summary(records, plan.layers, plan.shift_layers)
    print(f"wrote {out_jsonl}, " + ", ".join(written))


def _f(v, fmt=".3f"):
    return "nan" if v is None or not np.isfinite(v) else format(v, fmt)


def print_epoch(rec, layers, shift_layers):
    b = rec["baseline"]
    print(f"epoch {rec['epoch']:.3g} (step {rec['step']}): val loss {_f(b['loss'])} "
          f"acc {_f(b['acc1'])}; mean gOSI (control) "
          + ", ".join(f"{n} {_f(rec['layers'][n]['gosi_mean'])} "
                      f"({_f(rec['layers'][n]['control_gosi_mean'])})" for n in layers)
          + "; shift invariance (centred / raw) "
          + ", ".join(f"{n} {_f(b[CENTRED][n])} / {_f(b['shift_invariance'][n])}"
                      for n in shift_layers), flush=True)


def print_summary(records, layers, shift_layers):
    w = max(8, *(len(n) for n in layers))
    shown = records if len(records) <= 6 else \
        [records[i] for i in np.unique(np.linspace(0, len(records) - 1, 6).round().astype(int))]
    print("\nsummary: mean gOSI of live units (permuted control) [tuned fraction, dead units]"
          + ("" if shown is records else f"; {len(shown)} of {len(records)} epochs shown"))
    print(f"{'layer':<{w}} " + " ".join(f"{'ep ' + format(r['epoch'], '.3g'):>22}"
                                        for r in shown))
    for n in layers:
        cells = []
        for r in shown:
            d = r["layers"][n]
            cells.append(f"{_f(d['gosi_mean'], '.2f')} ({_f(d['control_gosi_mean'], '.2f')}) "
                         f"[{_f(d['tuned_frac'], '.2f')},{d['dead']:>3}]")
        print(f"{n:<{w}} " + " ".join(f"{c:>22}" for c in cells))
    ablated = [r for r in records if r["ablation"]]
    if not ablated:
        return
    last = ablated[-1]
    top_layer = shift_layers[-1]
    b = last["baseline"]
    print(f"\nablation at epoch {last['epoch']:.3g} (val loss {_f(b['loss'])}, acc "
          f"{_f(b['acc1'])}, centred shift invariance of {top_layer} {_f(b[CENTRED][top_layer])})"
          f": zero the top / bottom half of live units by gOSI")
    print(f"{'layer':<{w}} {'half':>6} {'units':>9} {'gOSI':>6} {'Δloss ± SEM':>16} "
          f"{'Δacc':>7} {'shift inv ' + top_layer:>18}")
    for a in last["ablation"]:
        print(f"{a['layer']:<{w}} {a['group']:>6} {a['units']:>4}/{a['of_live']:<4} "
              f"{_f(a['gosi_mean'], '.2f'):>6} "
              f"{'+' if a['loss_increase'] >= 0 else ''}{_f(a['loss_increase'], '.4f')} ± "
              f"{_f(a['loss_increase_sem'], '.4f'):<6} {-a['acc_drop']:>+7.3f} "
              f"{_f(a[CENTRED][top_layer]):>18}")


if __name__ == "__main__":
    run_cli(main)
