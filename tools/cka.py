#!/usr/bin/env python
"""Linear CKA among a ResNet's stage outputs and its logits, per checkpoint (paper 1's
"linearity" analysis), the fraction of active ReLUs per stage, and a random-init baseline.

    python tools/cka.py RUN [RUN2] [--epochs 0 1 2] [--steps] [--layers layer1 layer2 ...]
                        [--max-batches N] [--batch-size N] [--heatmap-epochs 0 5 10] [--seed S]
                        [--out DIR] [--device auto|cpu|cuda] [--threads N]
                        [--bn-mode recalibrate|running|batch]

For every epoch_* checkpoint of RUN (with --steps, the step_* ones inside an epoch too; or the
epochs named by --epochs), on the run's val split in a fixed shuffled order (--seed):
  - within one network: the square CKA matrix among --layers (default: the stage outputs
    layer1..layerN, or the run's track_units for a model without stages; names or globs such
    as 'layer3.*') and the logits;
  - with RUN2: RUN's layers (rows) against RUN2's (columns) at every epoch both runs have;
  - the fraction of ReLU outputs > 0 inside each layer (every nn.ReLU, every call);
  - the same for the architecture freshly initialised from a seed derived from --seed (never
    the run's own initialisation; with RUN2: two fresh networks), on the same batches: the
    baseline, dashed in every figure.
BatchNorm statistics: --bn-mode (default: recomputed on the run's fixed training images).
Writes OUT/cka.jsonl (with RUN2: OUT/cka_vs_<RUN2 name>.jsonl; OUT defaults to RUN), one line
per checkpoint:
  {"epoch", "step", "checkpoint", "run", "run_b", "bn_mode", "val_order_seed", "rows", "cols",
   "matrix", "relu_active", "relu_active_b", "images", "batches",
   "random_init": {"seed", "seed_b", "matrix", "relu_active", "relu_active_b"}}  (NaN as null)
and into OUT/figures/: <prefix>_heatmaps.png, <prefix>_curves.png, <prefix>_relu_active.png.
Prints a summary table. The measurement is selectivity.analyses.cka.run.cka_records.
"""
from __future__ import annotations

import os
import sys


import matplotlib

matplotlib.use("Agg")
import numpy as np

from selectivity.analyses.common import run_label, set_threads
from selectivity.analyses.cka.cka import LOGITS, MIN_BATCH
from selectivity.analyses.cka.run import cka_records, default_outputs, entry
from selectivity.train.distributed import choose_device
from selectivity.errors import run_cli
from selectivity.train.runs import nearest_epoch, open_run  # noqa: F401  (nearest_epoch: tests)
from selectivity.toolargs import Parser, add_common, positive


def parse_args(argv=None):
    p = Parser(description=__doc__)
    add_common(p, out_help="output folder: the jsonl, and figures/ (default: RUN)")
    p.add_argument("run2", nargs="?", help="a second run: CKA between the two at matching epochs")
    p.add_argument("--epochs", type=float, nargs="+", help="checkpoint epochs (default: all)")
    p.add_argument("--steps", action="store_true",
                   help="also the step_* checkpoints taken inside an epoch")
    p.add_argument("--layers", nargs="+",
                   help="module names or globs (default: the stages, 'layer*')")
    p.add_argument("--max-batches", type=int, help="val batches per checkpoint (default: all)")
    p.add_argument("--batch-size", type=int,
                   help=f"val batch size (default: the run's eval_batch_size; ≥ {MIN_BATCH})")
    p.add_argument("--heatmap-epochs", type=float, nargs="+",
                   help="epochs to draw in the heatmap grid (default: all, or 12 spread out)")
    p.add_argument("--seed", type=int, default=0,
                   help="the val order's shuffle and the random-init baseline (default 0)")
    args = p.parse_args(argv)
    positive(p, args, "max_batches")
    if args.batch_size is not None and args.batch_size < MIN_BATCH:
        p.error(f"--batch-size must be >= {MIN_BATCH} (the unbiased HSIC needs 4 images)")
    return args


def print_record(rec, layers, between):
    if between:
        cells = "  ".join(f"{n} {entry(rec, n, n):.3f}" for n in layers + [LOGITS])
        print(f"epoch {rec['epoch']:.3g}: CKA(A, B) same layer: {cells}", flush=True)
    else:
        cells = "  ".join(f"{n} {entry(rec, n, LOGITS):.3f}" for n in layers)
        print(f"epoch {rec['epoch']:.3g}: CKA(·, logits): {cells}", flush=True)


def print_summary(records, layers, between, out_jsonl, written):
    r0 = records[0]
    what = (f"{r0['run']} (rows) vs {r0['run_b']} (cols), same layer" if between
            else f"{r0['run']}, CKA(layer, logits)")
    print(f"\nsummary: {what}; {r0['images']} val images in {r0['batches']} batch(es) per "
          f"checkpoint; BN {r0['bn_mode']}")
    w = max(8, *(len(n) for n in layers))
    cols = layers + ([LOGITS] if between else [])
    head = "epoch    step  " + " ".join(f"{n:>{w}}" for n in cols)
    head += "   | active ReLUs: " + " ".join(f"{n:>{w}}" for n in layers)
    print(head)

    def line(label, rec, key):
        cka = [entry(rec, n, n if between else LOGITS, key) for n in cols]
        relu_src = rec[key]["relu_active"] if key == "random_init" else rec["relu_active"]
        relu = [np.nan if relu_src[n] is None else relu_src[n] for n in layers]
        print(f"{label}  " + " ".join(f"{v:>{w}.3f}" for v in cka)
              + "   |               " + " ".join(f"{v:>{w}.3f}" for v in relu))

    for r in records:
        line(f"{r['epoch']:<7.3g} {r['step']:>5}", r, "matrix")
    line(f"{'init':<13}", r0, "random_init")
    print(f"wrote {out_jsonl}, " + ", ".join(written))


def main(argv=None):
    from selectivity.analyses.cka.figures import write_figures

    args = parse_args(argv)
    device = choose_device(args.device)
    set_threads(args.threads, open_run(args.run))
    between = args.run2 is not None
    out_jsonl, fig_dir, prefix = default_outputs(args.run, args.run2, args.out)
    shown = {}

    def report(rec):
        shown.setdefault("layers", rec["rows"][:-1])
        print_record(rec, shown["layers"], between)

    records = cka_records(args.run, args.run2, epochs=args.epochs, steps=args.steps,
                          layers=args.layers, max_batches=args.max_batches,
                          batch_size=args.batch_size, device=device, bn_mode=args.bn_mode,
                          seed=args.seed, out_jsonl=out_jsonl, on_record=report)
    layers = records[0]["rows"][:-1]
    name_a = run_label(args.run)
    title = (f"linear CKA: {name_a} (rows) vs {run_label(args.run2)} (cols)" if between
             else f"linear CKA within {name_a}")
    written = write_figures(records, layers, between, title, fig_dir, prefix, args.heatmap_epochs)
    print_summary(records, layers, between, out_jsonl, written)


if __name__ == "__main__":
    run_cli(main)
