"""Stage `trainer` of the GPU check: the project's trainer itself on ImageNet-shaped synthetic
batches made on the GPU, beside a bare training loop (docs/gpu.md).

Each variant is a ``Trainer`` built as tools/train.py builds it (``load_config`` with flags,
``check_machine``, ``distributed.setup``, ``default_callbacks``) with ``--dataset synthetic
--data-backend device`` (batches generated on the device: the loader never sets the pace), ResNet-50,
channels_last, AMP in ``--amp-dtype`` fp16 (GradScaler) and bf16:

- **bare**: a loop of our own over one resident batch: model, SGD, autocast, GradScaler, nothing else;
- **off**: the trainer, ``--track false``;
- **on**: the trainer with its tracking callback (every block output, every step);
- **si**: the same, SI computed every step (``--log-every-steps 1``: the trainer computes the
  running SI for every train record, and writes the record).

An epoch is one round of ``steps`` steps (``--synthetic-size`` = batch × steps), so a round is one
``train_epoch()``; the four run interleaved round by round in a rotating order, each round timed
from a synchronized start to the end of the GPU's work (the tracker's side stream included).
After the rounds, per precision: one evaluation with recalibrated BatchNorm (``evaluate``), one
checkpoint (``save``), the peak memory of each variant's round, and a profile of one bare step
(kernels by GPU time). The dry run: the same code on the CPU at tiny sizes.
"""
from __future__ import annotations

import os
import time
import traceback

import torch

from selectivity.gpucheck.bench_train import amp_step
from selectivity.gpucheck.common import Bench, write_json

# Warm-up: one round per variant. Dry run: 32 px and batch 8, as bench_train (docs/gpu.md, "The dry run").
REAL = dict(batch=256, size=224, classes=1000, rounds=4, steps=5)
DRY = dict(batch=8, size=32, classes=10, rounds=2, steps=1)
AMPS = ("fp16", "bf16")
VARIANTS = ("bare", "off", "on", "si")
# images/s of the numerator ÷ the denominator (issue 26's targets).
RATIOS = {"trainer ÷ bare loop": ("off", "bare", 0.97), "tracking on ÷ off": ("on", "off", 0.995),
          "SI every step ÷ off": ("si", "off", None)}
PROFILE_TOP = 15


def build_trainer(flags: dict):
    """A Trainer as tools/train.py builds one from these flags (its config keys)."""
    from selectivity.train import distributed
    from selectivity.train.callbacks import default_callbacks
    from selectivity.train.config import check_machine, load_config
    from selectivity.train.trainer import Trainer
    config = load_config(None, flags)
    check_machine(config)
    return Trainer(config, distributed.setup(config.device), callbacks=default_callbacks(config))


def _trainer(variant: str, amp: str, cfg: dict, bench: Bench, work: str):
    return build_trainer(dict(
        name=f"{amp}-{variant}", out_dir=os.path.join(work, "trainer_runs"), seed=0,
        device=bench.device.type, dataset="synthetic", data_backend="device",
        synthetic_classes=cfg["classes"], synthetic_size=cfg["batch"] * cfg["steps"],
        image_size=cfg["size"], batch_size=cfg["batch"], eval_batch_size=cfg["batch"],
        model="resnet50", channels_last=True, amp=True, amp_dtype=amp,
        epochs=1000, schedule="constant", lr=0.01, weight_decay=5e-5, bn_images=cfg["batch"],
        track=variant != "off", log_every_steps=1 if variant == "si" else cfg["steps"],
        progress=False))


def _bare(amp: str, cfg: dict, bench: Bench):
    """The step with nothing around it, on one resident batch: the floor the trainer is held to."""
    from selectivity.train.models import build_model
    dev, dtype = bench.device, {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    torch.manual_seed(0)
    model = build_model("resnet50", cfg["classes"]).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")  # as the trainer's
    gen = torch.Generator(device=dev).manual_seed(0)
    images = torch.randn(cfg["batch"], 3, cfg["size"], cfg["size"], device=dev,
                         generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, cfg["classes"], (cfg["batch"],), device=dev, generator=gen)

    def steps(n):
        for _ in range(n):
            amp_step(model, opt, scaler, None, images, labels, dtype)
    return steps


def _side_streams(trainer):
    """Make the current stream wait for the tracking callbacks' side work (tracker.py)."""
    for cb in trainer.callbacks:
        if hasattr(cb, "train"):
            cb.train.synchronize()


def profile_step(bench: Bench, step) -> dict:
    """One step under torch.profiler: the top kernels by GPU time (CPU ops in the dry run)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([] if bench.dry_run else [ProfilerActivity.CUDA])
    bench.sync()
    with profile(activities=acts) as prof:
        step()
        bench.sync()

    def self_time(e):  # µs
        if bench.dry_run:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    events = [e for e in prof.key_averages() if self_time(e) > 0]
    total = sum(self_time(e) for e in events)
    top = sorted(events, key=self_time, reverse=True)[:PROFILE_TOP]
    return {"clock": "CPU" if bench.dry_run else "GPU", "total_ms": total / 1e3,
            "top": [{"name": e.key[:120], "calls": e.count, "ms": self_time(e) / 1e3,
                     "share": self_time(e) / total if total else 0.0} for e in top]}


def _bench_amp(bench: Bench, cfg: dict, amp: str, res: dict, save, work: str) -> None:
    runners = {"bare": _bare(amp, cfg, bench)}
    trainers = {v: _trainer(v, amp, cfg, bench, work) for v in VARIANTS[1:]}
    for v, t in trainers.items():
        runners[v] = lambda _n, t=t: t.train_epoch()  # one epoch = one round
    finish = {v: (lambda t=t: _side_streams(t)) for v, t in trainers.items()}
    res.update(status="running", variants={v: {"round_ms": []} for v in VARIANTS})
    t0 = time.perf_counter()
    for v in VARIANTS:  # cuDNN's autotuning, the allocator, the trackers' first states
        runners[v](cfg["steps"])
    bench.sync()
    res["warmup_s"] = round(time.perf_counter() - t0, 2)
    for r in range(cfg["rounds"]):
        order = VARIANTS[r % 4:] + VARIANTS[:r % 4]
        for v in order:
            if not bench.dry_run and r == cfg["rounds"] - 1:
                torch.cuda.reset_peak_memory_stats()
            ms = bench.time_ms(lambda: runners[v](cfg["steps"]), 1, finish=finish.get(v))
            res["variants"][v]["round_ms"].append(ms)
            if not bench.dry_run and r == cfg["rounds"] - 1:
                res["variants"][v]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        save()
    n = cfg["batch"] * cfg["steps"]
    for v, d in res["variants"].items():
        d["images_per_s"] = n * len(d["round_ms"]) / (sum(d["round_ms"]) / 1e3)
    res["ratios"] = {}
    for label, (num, den, target) in RATIOS.items():
        per_round = [b / a for a, b in zip(res["variants"][num]["round_ms"], res["variants"][den]["round_ms"])]
        value = res["variants"][num]["images_per_s"] / res["variants"][den]["images_per_s"]
        res["ratios"][label] = {"value": value, "target": target,
                                "pass": None if target is None else value >= target,
                                "per_round_min": min(per_round), "per_round_max": max(per_round)}
    on = trainers["on"]
    t0 = time.perf_counter()
    ev = on.evaluate(None)
    bench.sync()
    res["evaluation"] = {k: ev.get(k) for k in ("acc1", "acc5", "loss", "acc1_running", "bn_mode", "precision",
                                                "images", "si_mean")}
    res["evaluation"]["seconds"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    on.save("gpu_check.pt")
    path = os.path.join(on.paths["checkpoints"], "gpu_check.pt")
    res["checkpoint"] = {"seconds": round(time.perf_counter() - t0, 2), "mib": os.path.getsize(path) / 2**20}
    res["precision"] = {v: t.precision for v, t in trainers.items()}
    res["skipped_steps"] = {v: t.skipped_steps for v, t in trainers.items()}
    try:  # the profiler needs CUPTI there: without it, the figures above still stand
        res["profile"] = profile_step(bench, lambda: runners["bare"](1))
    except Exception as e:
        traceback.print_exc()
        res["profile_error"] = f"{type(e).__name__}: {e}"
    for t in trainers.values():
        t.log.close()  # TensorBoard's events flushed, as at the end of fit()
    res["status"] = "ok"


def run(bench: Bench, json_path: str) -> int:
    cfg = DRY if bench.dry_run else REAL
    work = os.path.dirname(os.path.abspath(json_path))
    record = {"status": "running", "config": dict(cfg, model="resnet50", channels_last=True,
                                                  data="synthetic, made on the device (--data-backend device)"),
              "amps": {}}
    save = lambda: write_json(json_path, record)  # noqa: E731
    failed = False
    for amp in AMPS:
        res = record["amps"][amp] = {}
        try:
            _bench_amp(bench, cfg, amp, res, save, work)
        except Exception as e:  # one precision failing (OOM, say) leaves the other's figures
            traceback.print_exc()
            res["status"] = f"error: {type(e).__name__}: {e}"
            failed = True
        save()
        if not bench.dry_run:
            torch.cuda.empty_cache()
    record["status"] = "error" if failed else "ok"
    save()
    return 1 if failed else 0
