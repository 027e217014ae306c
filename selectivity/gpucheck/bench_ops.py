"""Stage `ops` of the GPU check: the fused ``selectivity.ops.accumulate`` against a plain read
(``act.sum()``) of the same tensor, on ResNet-50's block-output shapes (docs/gpu.md).

Both are memory-bound reductions over the same bytes, so ``act.sum()`` is the floor a one-pass
kernel can reach; the target is accumulate ÷ sum <= 1.2 in time. Each figure is the median of
single calls, each after an L2 flush (the tensors are read from HBM, as in training). The GB/s
column counts the bytes of ``act`` read; the copy bandwidth counts bytes read plus written, which
is how a device-to-device copy is usually quoted (KINDS.md: about 4.3 TB/s on an H200).

Each case also checks accumulate against ``ops.accumulate_reference`` (float64) on the same
device: on the GPU this is the CUDA kernel's correctness at full size.
"""
from __future__ import annotations

import torch

from selectivity.gpucheck.common import Bench, write_json
from selectivity import ops

BLOCK_SHAPES = [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]  # (U, H, W) per stage
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LAYOUTS = ("nchw", "channels_last")
TARGET = 1.2
K = 1000
# The CPU kernel's bound is 7 * 2**-24 * sum|x| per entry (selectivity/ops.py); the CUDA kernel
# sums in float64. Block outputs are non-negative, so relative to max|ref| this is loose for both.
REL_TOL = 1e-6


def _copy_bandwidth(bench: Bench, nbytes: int, reps: int) -> dict:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=bench.device)
    dst = torch.empty_like(src)
    ms = bench.median_ms(lambda: dst.copy_(src), reps)
    return {"bytes": nbytes, "ms": ms, "gb_per_s_read_plus_written": 2 * nbytes / (ms * 1e-3) / 1e9}


def _check(act, labels) -> dict:
    sums, counts = ops.new_state(K, act.shape[1], act.device)
    ops.accumulate(act, labels, sums, counts)
    ref_sums, ref_counts = ops.new_state(K, act.shape[1], act.device)
    ops.accumulate_reference(act, labels, ref_sums, ref_counts)
    scale = float(ref_sums.abs().max()) or 1.0
    rel = float((sums - ref_sums).abs().max()) / scale
    return {"max_rel_err": rel, "counts_equal": bool(torch.equal(counts, ref_counts)),
            "pass": rel <= REL_TOL and bool(torch.equal(counts, ref_counts))}


def run(bench: Bench, json_path: str) -> int:
    batch, reps = (2, 3) if bench.dry_run else (256, 30)
    record = {"status": "running", "batch": batch, "classes": K, "reps": reps, "target": TARGET,
              "has_extension": ops.has_extension(), "cases": []}
    save = lambda: write_json(json_path, record)  # noqa: E731
    # 1 GiB each way on the GPU: well past launch overhead and 17x L2.
    record["copy"] = _copy_bandwidth(bench, (16 if bench.dry_run else 1024) * 2**20, reps=10)
    save()
    copy_bw = record["copy"]["gb_per_s_read_plus_written"]
    gen = torch.Generator(device=bench.device).manual_seed(0)
    for U, H, W in BLOCK_SHAPES:
        for dname, dtype in DTYPES.items():
            for layout in LAYOUTS:
                act = torch.randn(batch, U, H, W, device=bench.device, generator=gen).relu_().to(dtype)
                if layout == "channels_last":
                    act = act.contiguous(memory_format=torch.channels_last)
                labels = torch.randint(0, K, (batch,), device=bench.device, generator=gen)
                sums, counts = ops.new_state(K, U, bench.device)
                t_acc = bench.median_ms(lambda: ops.accumulate(act, labels, sums, counts), reps)
                t_sum = bench.median_ms(lambda: act.sum(), reps)
                nbytes = act.numel() * act.element_size()
                ratio = t_acc / t_sum
                record["cases"].append({
                    "shape": [batch, U, H, W], "dtype": dname, "layout": layout, "bytes": nbytes,
                    "accumulate_ms": t_acc, "sum_ms": t_sum, "ratio": ratio, "pass": ratio <= TARGET,
                    "accumulate_gb_per_s": nbytes / (t_acc * 1e-3) / 1e9,
                    "sum_gb_per_s": nbytes / (t_sum * 1e-3) / 1e9,
                    "accumulate_of_copy_bw": nbytes / (t_acc * 1e-3) / 1e9 / copy_bw,
                    "correct": _check(act, labels),
                })
                act = None  # free it before the next case allocates
                save()
    worst = max(record["cases"], key=lambda c: c["ratio"])
    record["worst"] = {k: worst[k] for k in ("shape", "dtype", "layout", "ratio")}
    record["all_correct"] = all(c["correct"]["pass"] for c in record["cases"])
    record["status"] = "ok"
    save()
    return 0
