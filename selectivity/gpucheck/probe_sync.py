"""Does a host sync in every step expose the tracker's cost? A probe beside the GPU check.

The GPU check's train stage found tracking cheaper in its bf16 loop than in its fp16 loop, and
the fp16 loop differs in one way that matters to a side stream: its ``GradScaler.step`` reads
``found_inf`` on the host, so every fp16 step waits for the GPU and the next one starts from an
empty queue. This probe times the same ResNet-50 step (batch 256, 224 px, K = 1000,
channels_last, SGD, device-resident synthetic data) with tracking off and on in four loops:

- ``bf16``: no host sync in the step;
- ``bf16+sync``: the same plus ``torch.cuda.synchronize()`` at the end of every step;
- ``fp16+scaler``: fp16 with a GradScaler (a host sync in ``step``);
- ``fp16``: fp16 without a GradScaler (no sync; lr small enough to stay finite for these steps).

If the sync is what exposes the cost, ``bf16+sync`` loses what ``fp16+scaler`` loses and ``fp16``
keeps what ``bf16`` keeps. It also reports the host time spent inside the tracker's forward hooks
per step. Windows close after the tracker's side stream (``tracker.synchronize()``).

    python3 -m selectivity.gpucheck.probe_sync --out DIR   # on the GPU, after the extension is built
    python3 -m selectivity.gpucheck.probe_sync --dry-run --out DIR  # the same on the CPU, tiny sizes
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch

from selectivity.gpucheck.bench_train import amp_step
from selectivity.gpucheck.common import Bench
from selectivity import SelectivityTracker
from selectivity.train.models import build_model

REAL = dict(batch=256, size=224, classes=1000, warmup=5, rounds=4, steps=5)
DRY = dict(batch=8, size=32, classes=10, warmup=1, rounds=2, steps=1)
LOOPS = {"bf16": (torch.bfloat16, False, False), "bf16+sync": (torch.bfloat16, False, True),
         "fp16+scaler": (torch.float16, True, False), "fp16": (torch.float16, False, False)}


def probe_loop(bench: Bench, cfg: dict, loop: str) -> dict:
    dtype, scaled, sync = LOOPS[loop]
    dev, B, S, K = bench.device, cfg["batch"], cfg["size"], cfg["classes"]
    torch.manual_seed(0)
    off = build_model("resnet50", K).to(dev, memory_format=torch.channels_last)
    on = copy.deepcopy(off)
    tracker = SelectivityTracker(on, num_classes=K, units="blocks")
    hook_s = [0.0]
    inner = tracker.hooks.means_fn

    def timed_hook(name, means):  # host seconds inside the tracker's means_fn (its feed)
        t0 = time.perf_counter()
        inner(name, means)
        hook_s[0] += time.perf_counter() - t0
    tracker.hooks.means_fn = timed_hook

    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(B, 3, S, S, device=dev, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, K, (B,), device=dev, generator=gen)
    setups = {}
    for variant, model in (("off", off), ("on", on)):
        opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
        scaler = torch.amp.GradScaler(dev.type, init_scale=2.0**10, enabled=scaled)
        setups[variant] = (model, opt, scaler, tracker if variant == "on" else None)

    def step(variant):
        amp_step(*setups[variant], x, y, dtype)
        if sync:
            bench.sync()

    for v in setups:
        bench.time_ms(lambda: step(v), cfg["warmup"], finish=tracker.synchronize)
    ms = {v: [] for v in setups}
    hook_s[0] = 0.0
    for r in range(cfg["rounds"]):
        for v in (("off", "on") if r % 2 == 0 else ("on", "off")):
            ms[v].append(bench.time_ms(lambda: step(v), cfg["steps"],
                                       finish=tracker.synchronize) / cfg["steps"])
    tracker.remove()
    steps_on = cfg["rounds"] * cfg["steps"]
    per_round = [o / t for o, t in zip(ms["off"], ms["on"])]
    return {"ms_off": sum(ms["off"]) / len(ms["off"]), "ms_on": sum(ms["on"]) / len(ms["on"]),
            "ratio_on": sum(ms["off"]) / sum(ms["on"]),
            "per_round_min": min(per_round), "per_round_max": max(per_round),
            "hook_host_ms_per_step": hook_s[0] / steps_on * 1e3}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu_probe_sync.json and .md")
    p.add_argument("--dry-run", action="store_true", help="the CPU at tiny sizes")
    args = p.parse_args()
    bench = Bench(args.dry_run)
    cfg = DRY if args.dry_run else REAL
    if not args.dry_run:
        torch.backends.cudnn.benchmark = True
    results = {}
    for loop in LOOPS:
        results[loop] = probe_loop(bench, cfg, loop)
        print(loop, json.dumps(results[loop]), flush=True)
        if not args.dry_run:
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_probe_sync.json"), "w") as f:
        json.dump({"config": cfg, "dry_run": args.dry_run, "loops": results}, f, indent=1)
    lines = [f"# Host sync probe ({'dry run, CPU' if args.dry_run else torch.cuda.get_device_name()})",
             "", f"ResNet-50, batch {cfg['batch']}, {cfg['size']} px, K = {cfg['classes']}, "
             f"{cfg['rounds']} rounds x {cfg['steps']} steps per variant after {cfg['warmup']} warm-up "
             "steps; `python3 -m selectivity.gpucheck.probe_sync`.", "",
             "| loop | ms/step off | ms/step on | on ÷ off (images/s) | rounds | host ms in hooks per step |",
             "|---|---|---|---|---|---|"]
    for loop, r in results.items():
        lines.append(f"| {loop} | {r['ms_off']:.2f} | {r['ms_on']:.2f} | {r['ratio_on']:.3f} | "
                     f"{r['per_round_min']:.3f}–{r['per_round_max']:.3f} | {r['hook_host_ms_per_step']:.2f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "gpu_probe_sync.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
