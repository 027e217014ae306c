#!/usr/bin/env python
"""Benchmark: G ablation conditions per forward pass vs one pass per condition.

    python tools/bench_ablation.py [--model resnet20] [--image-size 32] [--images 360]
        [--batch-size 360] [--conditions 8] [--stages layer1 layer2 layer3 whole]
        [--max-images 256] [--repeats 3] [--threads 1] [--checkpoint PATH]

For each scope (a stage, or the whole network) and each number of conditions N (distinct
selective / least / random conditions at k spread over 1 … U−1, random re-drawn per batch), the
same N conditions are evaluated on the same cached images three ways, side by side:

  one-by-one   for each condition, one pass over the images in batches of --batch-size, a [1, U]
               mask per block (paper 1's way, minus its data loading per condition)
  batched      G conditions per forward, the batch repeated at the model's input
               (``share_prefix=False``): what batching alone buys
  batched+pre  the batch repeated at the output of the first ablated block (before its mask),
               so that block and all before it run once for all conditions
               (``share_prefix=True``, what tools/ablate.py does)

Timings are the minimum over --repeats interleaved repeats; the results of the three are checked
to be identical (per-class correct counts; loss to float tolerance). Weights are random unless
--checkpoint is given (speed does not depend on them). ``ratio`` = one-by-one / batched+pre.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


import numpy as np
import torch

from selectivity.analyses.ablation import ablation as A
from selectivity.train.models import MODELS, build_model, unit_registry
from selectivity.unit_ranking import rank_units


def spread_conditions(units: dict, n: int, scope: str) -> list:
    """n distinct conditions: kinds in turn, k spread over 1 … U−1 (fractions of each block)."""
    conds = []
    for i in range(n):
        kind = A.CONDITIONS[i % 3]
        f = (i // 3 + 1) / (n // 3 + 2)
        k = tuple((name, max(1, min(u - 1, int(round(f * u))))) for name, u in units.items())
        conds.append(A.Condition(kind, k, draw=0, redraw=True, scope=scope, grid=f))
    return conds


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet20", choices=MODELS)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--images", type=int, default=360, help="evaluation images (the demo's val)")
    p.add_argument("--batch-size", type=int, default=360,
                   help="images per pass of the one-by-one way (the demo's eval batch)")
    p.add_argument("--conditions", type=int, nargs="+", default=[8])
    p.add_argument("--stages", nargs="*", default=None,
                   help="scopes: stage names and/or 'whole' (default: every stage, then whole; "
                        "none: only --tool-workload)")
    p.add_argument("--max-images", type=int, default=256, help="images per batched forward pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-plain-batched", action="store_true",
                   help="skip the 'batched' (repeat at the input) column")
    p.add_argument("--checkpoint", help="a checkpoint whose weights to use")
    p.add_argument("--tool-workload", action="store_true",
                   help="also time tools/ablate.py's default workload for one checkpoint (every "
                        "stage, the default fraction grid, 3 random draws; 105 conditions for "
                        "ResNet-20): one pass per condition vs batched + de-duplicated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_model(args.model, 10)
    if args.checkpoint:
        from selectivity.train.checkpoint import load_state
        model.load_state_dict(load_state(args.checkpoint)["model"])
    model = model.eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.images, 3, args.image_size, args.image_size, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.images,), generator=g)
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size])
               for i in range(0, args.images, args.batch_size)]
    registry = unit_registry(model)
    rankings = rank_units(model, batches, num_classes=10)
    stages = A.scopes_by_stage(registry)
    scopes = [*stages, A.WHOLE] if args.stages is None else args.stages
    print(f"{args.model}, {args.image_size}px, {args.images} images, one-by-one batch "
          f"{args.batch_size}, batched <= {args.max_images} images/forward, "
          f"{torch.get_num_threads()} thread(s), min of {args.repeats}; times in s")
    cols = ["one-by-one"] + ([] if args.no_plain_batched else ["batched"]) + ["batched+pre"]
    print(f"{'scope':>7} {'N':>4} " + " ".join(f"{c:>12}" for c in cols)
          + f" {'ratio':>6} {'ms/cond/img':>11}  identical")
    totals = {c: 0.0 for c in cols}
    for scope in scopes:
        if scope == A.WHOLE:
            units = dict(registry)
        elif scope in stages:
            units = {n: registry[n] for n in stages[scope]}
        else:
            raise SystemExit(f"error: unknown scope {scope!r}; choose from "
                             f"{', '.join(stages)}, whole")
        for n in args.conditions:
            conds = spread_conditions(units, n, scope)
            runs = {
                "one-by-one": lambda data: A.evaluate_ablations(
                    model, data, conds, rankings, batched=False, dedupe=False),
                "batched": lambda data: A.evaluate_ablations(
                    model, data, conds, rankings, share_prefix=False, dedupe=False,
                    max_images=args.max_images),
                "batched+pre": lambda data: A.evaluate_ablations(
                    model, data, conds, rankings, share_prefix=True, dedupe=False,
                    max_images=args.max_images),
            }
            best, results = {c: float("inf") for c in cols}, {}
            for c in cols:  # untimed warm-up on one batch: one-time set-up costs of new shapes
                runs[c](batches[:1])
            for _ in range(args.repeats):
                for c in cols:  # interleaved, so load changes hit all three alike
                    t, results[c] = timed(lambda: runs[c](batches))
                    best[c] = min(best[c], t)
            ref = results["one-by-one"]
            same = all(all((a.correct == b.correct).all() for a, b in zip(ref, results[c]))
                       for c in cols[1:])
            dloss = max(abs(a.loss - b.loss) for c in cols[1:] for a, b in zip(ref, results[c]))
            for c in cols:
                totals[c] += best[c]
            ratio = best["one-by-one"] / best["batched+pre"]
            per = best["batched+pre"] / (n * args.images) * 1e3
            print(f"{scope:>7} {n:>4} " + " ".join(f"{best[c]:12.2f}" for c in cols)
                  + f" {ratio:5.2f}x {per:11.2f}  {'yes' if same else 'NO'} "
                  f"(max |dloss| {dloss:.1e})", flush=True)
    if scopes:
        ratio = totals["one-by-one"] / totals["batched+pre"]
        print(f"{'all':>7} {'':>4} " + " ".join(f"{totals[c]:12.2f}" for c in cols)
              + f" {ratio:5.2f}x")
    if args.tool_workload:
        conds = []
        for stage, names in stages.items():
            conds += A.make_conditions({n: registry[n] for n in names}, random_draws=3,
                                       scope=stage)
        one = bat = float("inf")
        for _ in range(args.repeats):
            t, ref = timed(lambda: A.evaluate_ablations(model, batches, conds, rankings,
                                                        batched=False, dedupe=False))
            one = min(one, t)
            t, got = timed(lambda: A.evaluate_ablations(model, batches, conds, rankings,
                                                        max_images=args.max_images))
            bat = min(bat, t)
        same = all((a.correct == b.correct).all() for a, b in zip(ref, got))
        print(f"tools/ablate.py default workload ({len(conds)} conditions, every stage): "
              f"one-by-one {one:.1f} s, batched + prefix + de-duplicated {bat:.1f} s: "
              f"{one / bat:.2f}x; identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
