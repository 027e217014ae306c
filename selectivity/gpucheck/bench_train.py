"""Stage `train` of the GPU check: the ResNet-50 training step with selectivity tracking off, on,
and on with SI read every step (docs/gpu.md).

Real mode: 224 px, batch 256, K = 1000, channels_last, AMP bf16 and fp16 + GradScaler, SGD, one
GPU-resident synthetic batch (so no loader is measured), torch.cuda.Event timing. The three
variants are interleaved round by round, in a rotating order, so drift in clocks or temperature
falls on all of them alike. Dry run: the same code on the CPU at tiny sizes.

"off" is a second, identical model that never had a tracker attached: the honest baseline, since
the tracker's forward hooks are part of what tracking costs.
"""
from __future__ import annotations

import contextlib
import copy
import time
import traceback

import torch
import torch.nn.functional as F

from selectivity.gpucheck.common import Bench, write_json
from selectivity import SelectivityTracker, UnitHooks
from selectivity.train.models import build_model

REAL = dict(batch=256, size=224, classes=1000, warmup=5, rounds=4, steps=5)
# Dry run: at 16 px the last two stages' BatchNorms see 1x1 maps, and bf16 training goes NaN within a
# few steps on some CPUs (docs/gpu.md, "The dry run"); 32 px and batch 8 keep it finite.
DRY = dict(batch=8, size=32, classes=10, warmup=0, rounds=2, steps=1)
AMPS = {"bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("off", "on", "si")
TARGETS = {"on": 0.99, "si": 0.98}  # images/s ÷ off; "without slowing throughput"


REL_TOL = 1e-6  # as in bench_ops: the CPU kernel's float32 runs; the CUDA kernel sums in float64


def tracker_matches_reference(model, num_classes, images, labels, dtype) -> dict:
    """One tracked forward (under autocast, so the block outputs are what training gives the
    tracker) against ``ops.accumulate_reference`` of the same outputs, captured by hooks of our
    own: the tracker on this device, end to end, at full size."""
    from selectivity import ops
    tracker = SelectivityTracker(model, num_classes=num_classes, units="blocks")
    outputs = {}
    capture = UnitHooks(model, tracker.layers, lambda n, out: outputs.__setitem__(n, out.detach()))
    try:
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype), tracker.track(labels):
            model(images)
        result = {n: r.cpu() for n, r in tracker.compute().items()}
    finally:
        tracker.remove()
        capture.remove()
    worst = 0.0
    for name, r in result.items():
        sums, counts = ops.new_state(num_classes, outputs[name].shape[1], outputs[name].device)
        ops.accumulate_reference(outputs[name], labels, sums, counts)
        sums, counts = sums.cpu(), counts.cpu()
        if not torch.equal(r.counts, counts):
            worst = float("inf")
        worst = max(worst, float((r.sums - sums).abs().max()) / (float(sums.abs().max()) or 1.0))
    same_layers = list(result) == list(outputs) and len(result) > 0
    return {"layers": len(result), "max_rel_err": worst, "pass": same_layers and worst <= REL_TOL}


def amp_step(model, opt, scaler, tracker, images, labels, dtype) -> torch.Tensor:
    """One training step under autocast, the forward inside ``tracker.track`` when there is one."""
    with torch.autocast(images.device.type, dtype=dtype):
        with tracker.track(labels) if tracker is not None else contextlib.nullcontext():
            logits = model(images)
        loss = F.cross_entropy(logits, labels)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss


def _bench_amp(bench: Bench, cfg: dict, amp: str, record: dict, save) -> None:
    dev, K, B, S = bench.device, cfg["classes"], cfg["batch"], cfg["size"]
    dtype = AMPS[amp]
    torch.manual_seed(0)
    off = build_model("resnet50", K).to(dev, memory_format=torch.channels_last)
    tracked = copy.deepcopy(off)
    # The library's public API, as a user's training loop would call it.
    tracker = SelectivityTracker(tracked, num_classes=K, units="blocks")

    def parts(model):
        # lr small enough that 100-odd steps on random labels stay finite in fp16 and bf16.
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)
        # The default initial scale (2**16) overflows for the first steps, which then skip the
        # optimizer: with unequal warm-ups (off gets 5 steps, the tracked model 10) the two
        # models' timed steps could differ in that. At 2**10 no step overflows, and the scale
        # cannot grow within the run (growth_interval 2000): the final scale is recorded to show it.
        return opt, torch.amp.GradScaler(dev.type, init_scale=2.0**10, enabled=amp == "fp16")

    gen = torch.Generator(device=dev).manual_seed(0)
    images = torch.randn(B, 3, S, S, device=dev, generator=gen).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, K, (B,), device=dev, generator=gen)
    (opt_off, sc_off), (opt_tr, sc_tr) = parts(off), parts(tracked)
    setup = {"off": (off, opt_off, sc_off, None, False), "on": (tracked, opt_tr, sc_tr, tracker, False),
             "si": (tracked, opt_tr, sc_tr, tracker, True)}
    last = {}

    def step(variant):
        model, opt, scaler, trk, si = setup[variant]
        loss = amp_step(model, opt, scaler, trk, images, labels, dtype)
        if si:
            last["si"] = trk.compute()  # what a run reading SI every step pays
        last["loss"] = loss.detach()

    res = record["amps"][amp] = {"status": "running", "variants": {v: {"step_ms": []} for v in VARIANTS}}
    res["tracker_vs_reference"] = tracker_matches_reference(tracked, K, images, labels, dtype)
    save()
    t0 = time.perf_counter()
    for v in VARIANTS:  # warm-up: cuDNN's autotuning, the allocator, the tracker's first states
        bench.time_ms(lambda: step(v), cfg["warmup"])
    res["warmup_s"] = round(time.perf_counter() - t0, 2)
    for r in range(cfg["rounds"]):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
        for v in order:
            # The window closes when the tracker's side stream is done too (selectivity/tracker.py).
            ms = bench.time_ms(lambda: step(v), cfg["steps"], finish=tracker.synchronize)
            res["variants"][v]["step_ms"].append(ms / cfg["steps"])
        res["last_loss"] = float(last["loss"])  # a sync, outside the timed windows
        if amp == "fp16":
            res["grad_scale"] = {"off": sc_off.get_scale(), "tracked": sc_tr.get_scale()}
        save()
    for v, d in res["variants"].items():
        d["images_per_s"] = B * len(d["step_ms"]) / (sum(d["step_ms"]) / 1e3)
    off_ms = res["variants"]["off"]["step_ms"]
    for v, target in TARGETS.items():
        per_round = [o / t for o, t in zip(off_ms, res["variants"][v]["step_ms"])]
        ratio = res["variants"][v]["images_per_s"] / res["variants"]["off"]["images_per_s"]
        res[f"ratio_{v}"] = {"value": ratio, "target": target, "pass": ratio >= target,
                             "per_round_min": min(per_round), "per_round_max": max(per_round)}
    result = tracker.compute()
    si = torch.cat([r.si.flatten().double().cpu() for r in result.values()]) if result else torch.zeros(0)
    res["tracked_layers"] = len(result)
    res["tracked_units"] = int(si.numel())
    res["si_finite"] = bool(torch.isfinite(si).all())
    res["si_mean"] = float(si.mean()) if si.numel() else None
    tracker.remove()
    if not bench.dry_run:
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    res["status"] = "ok"


def run(bench: Bench, json_path: str) -> int:
    cfg = DRY if bench.dry_run else REAL
    if not bench.dry_run:
        torch.backends.cudnn.benchmark = True  # what a fast training run sets
    from selectivity import ops
    config = dict(cfg, model="resnet50", channels_last=True, optimizer="SGD", data="synthetic, device-resident")
    record = {"status": "running", "has_extension": ops.has_extension(), "config": config, "amps": {}}
    save = lambda: write_json(json_path, record)  # noqa: E731
    failed = False
    for amp in AMPS:
        try:
            _bench_amp(bench, cfg, amp, record, save)
        except Exception as e:  # one precision failing (OOM, say) leaves the other's figures
            traceback.print_exc()
            record["amps"].setdefault(amp, {})["status"] = f"error: {type(e).__name__}: {e}"
            failed = True
        save()
        if not bench.dry_run:
            torch.cuda.empty_cache()
    record["status"] = "error" if failed else "ok"
    save()
    return 1 if failed else 0
