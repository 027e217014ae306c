"""The tracker's cost inside ResNet-50 training steps on this CPU (selectivity/benchmarks/selectivity.py).

    python tools/bench_selectivity.py [--rounds 5]      # ~3-6 min on 2 cores

Prints each cost as % of an untracked training step (median [min-max] over interleaved rounds),
PASS/FAIL against the targets (SI every step <= 0.25 %, SI every 20 steps <= 0.15 %) and the rescan
rate. Informational: always exits 0.
"""
from __future__ import annotations

import argparse
import os

import torch

from selectivity import ops
from selectivity.cli import run_cli
from selectivity.benchmarks.selectivity import measure, percent_rows, whole_step_ratio


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (>= 5 for the record)")
    p.add_argument("--steps", type=int, default=2, help="training steps of each kind per round")
    p.add_argument("--si-every", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"selectivity bench: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f}), ops: {'compiled' if ops.has_extension() else 'reference'}")
    result = measure(args.rounds, args.steps, args.si_every, on_round=lambda r, c: print(
        f"round {r}/{args.rounds}: untracked step {c.step[-1] * 1e3:.0f} ms", flush=True))
    c = result["costs"]
    print(f"ResNet-50, 64 px, B = 64, K = 1000, {result['units']:,} units; untracked step "
          f"{sorted(c.step)[len(c.step) // 2] * 1e3:.0f} ms; % of a step: median [min-max] over {args.rounds} rounds")
    for name, med, low, high, target in percent_rows(result):
        verdict = "" if target is None else f"   target <= {target}%: {'PASS' if med <= target else 'FAIL'}"
        print(f"  {name:<64}{med:6.3f}% [{low:.3f}-{high:.3f}]{verdict}")
    print(f"  rescan rate: {result['stale_per_step']:.0f} units rescanned a step "
          f"({100 * result['stale_per_step'] / result['units']:.2f} % of units)")
    med, low, high = whole_step_ratio(result)
    print(f"  whole step, tracked with fused blocks and SI every step / stock untracked: {med:.3f} "
          f"[{low:.3f}-{high:.3f}] (informational: whole steps vary by more than the tracker takes)")


if __name__ == "__main__":
    run_cli(main)
