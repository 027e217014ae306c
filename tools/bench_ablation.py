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
The benchmark is selectivity.benchmarks.ablation.bench.
"""
from __future__ import annotations

import argparse

from selectivity.benchmarks.ablation import bench
from selectivity.cli import run_cli
from selectivity.toolargs import echo
from selectivity.train.models import MODELS


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
    a = p.parse_args(argv)
    bench(a.model, a.image_size, a.images, a.batch_size, a.conditions, a.stages, a.max_images,
          a.repeats, a.threads, not a.no_plain_batched, a.checkpoint, a.tool_workload, echo=echo)


if __name__ == "__main__":
    run_cli(main)
