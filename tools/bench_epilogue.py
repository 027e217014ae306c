#!/usr/bin/env python
"""The fused residual epilogue vs stock add + ReLU, forward + backward, on the CPU, measured side by
side in one run (interleaved rounds; each ratio a median over rounds, with its min and max).

    python tools/bench_epilogue.py [--rounds 7] [--threads N]

For every ResNet-50 block-output shape at 64 px, B = 64, float32, channels_last and NCHW: stock
(`out += identity; relu_(out)` + its backward) and fused (`add_relu_means_` + its backward, the
means unused by the loss, as the tracker reads them; target fused ÷ stock <= 1.00), each followed by
the same stand-in for the next layer (`y * w`), whose backward makes the epilogue's incoming
gradient as in a training step; informational: the fused op with the means in the loss (as the
regularizer uses them), and the pair with a gradient the caller holds. Exits 0 whatever the ratios.
The measurement: selectivity/benchmarks/epilogue.py.
"""
from __future__ import annotations

import argparse

import torch

from selectivity import epilogue
from selectivity.benchmarks.epilogue import measure_all
from selectivity.cli import run_cli


def print_row(r):
    shape = "[" + ", ".join(map(str, r["shape"])) + "]"
    print(f"  {r['layout']:<14}{shape:<20}{r['stock_ms']:9.2f}{r['fused_ms']:9.2f}  {r['ratio']:5.2f} "
          f"[{r['ratio_min']:4.2f}-{r['ratio_max']:4.2f}]{r['ratio_means_loss']:17.2f}"
          f"{r['ratio_held_gradient']:16.2f}      {'PASS' if r['ok'] else 'FAIL'}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds (>= 5)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.rounds < 5:
        p.error(f"--rounds must be >= 5 for a median with its spread, got {args.rounds}")
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = "compiled op" if epilogue._HAS_OP else "reference (extension not built: make build)"
    print(f"fused epilogue bench: torch {torch.__version__}, {torch.get_num_threads()} threads, B = 64, "
          f"float32, {args.rounds} interleaved rounds, {backend}")
    print(f"  {'layout':<14}{'shape':<20}{'stock ms':>9}{'fused ms':>9}  fused/stock [min-max]   "
          f"means in loss/stock  held gradient  verdict")
    rows = measure_all(args.rounds, on_row=print_row)
    print(f"  target fused/stock <= 1.00: {'PASS' if all(r['ok'] for r in rows) else 'FAIL'} "
          f"({sum(r['ok'] for r in rows)}/{len(rows)} shapes)")


if __name__ == "__main__":
    run_cli(main)
