"""Benchmark: selectivity.analyses.cka (ours) vs torch_cka on the same models, layers and images.

    python tools/bench_cka.py [--model resnet20] [--batch-size 64] [--batches 4] [--repeats 5]
                              [--within] [--threads 1]

Two freshly initialised networks (seeds 0 and 1) are compared layer by layer (network A's layers
× network B's, as the paper-1 code does; ``--within``: network A's layers with each other, which
torch_cka can only do as CKA(A, A)), on random 32×32 images. Two timings, each the minimum
over interleaved repeats: the CKA work alone (both run on cached features replayed through hooks,
so forward-pass noise cannot swamp it) and end to end with the real forward passes. torch_cka runs
under no_grad here (its compare() does not disable autograd itself), which only helps it.
If torch_cka is not installed, a faithful re-implementation of its algorithm stands in (a pair
loop that recomputes both Grams for every pair, keeps every hooked feature map, fp32 sums), and
the output says so. The benchmark is selectivity.benchmarks.cka.bench.
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # before anything imports tqdm: torch_cka draws bars

from selectivity.benchmarks.cka import bench
from selectivity.cli import run_cli
from selectivity.toolargs import echo
from selectivity.train.models import MODELS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=MODELS)
    p.add_argument("--layers", nargs="+", help="default: stem or stages, and fc, of the model")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--within", action="store_true",
                   help="compare network A's layers with each other (torch_cka: CKA(A, A))")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the steadiest timings on a shared machine)")
    a = p.parse_args(argv)
    bench(a.model, a.layers, a.batch_size, a.batches, a.repeats, a.within, a.threads, echo=echo)


if __name__ == "__main__":
    run_cli(main)
