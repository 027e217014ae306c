"""The tracker's cost inside ResNet-50 training steps on this CPU (tools/bench_selectivity.py).

ResNet-50 at 64 px, B = 64, K = 1000, the 16 residual blocks tracked (15,104 units), channels_last
fp32. Three kinds of training step are interleaved round by round, so that load on a shared machine
hits them alike: untracked (the denominator), tracked with SI every step (``incremental=True``: the
one ``accumulate_means`` call at the forward's end, then ``step_si()``) and tracked with SI every
``si_every`` steps (plain accumulation, ``compute()`` every ``si_every`` steps, amortized). Costs are
timed inside the steps, around the tracker's own calls, because whole steps vary by more than the
tracker takes. The blocks run fused (units.UnitHooks(means_fn=...): the means come out of each
block's epilogue); the tracker's ``means_fn`` (each layer's copy into the flat feed) is timed and
reported apart.

Both trackers start from a state in which every class was seen ``warm_images_per_class`` times (with
the real block outputs), as after the first steps of an epoch; the rescan rate is the fraction of
units per step whose preferred class fell below the bound of the others (ops.accumulate_means).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from selectivity.tracker import SelectivityTracker

K, B, SIZE = 1000, 64, 64


@dataclass
class Costs:
    """Seconds per round (each round's median over its steps)."""
    step: list = field(default_factory=list)           # untracked training step (stock blocks)
    tracked_step: list = field(default_factory=list)   # whole step, tracked (fused blocks), SI every step
    hooks: list = field(default_factory=list)          # means_fn: each layer's means into the feed
    every_step: list = field(default_factory=list)     # accumulate_means with the cache + step_si()
    accumulate: list = field(default_factory=list)     # accumulate_means without a cache
    compute: list = field(default_factory=list)        # one full compute() (amortized over si_every)


def _timed(fn, spent: list):
    def wrapper(*args):
        t0 = time.perf_counter()
        out = fn(*args)
        spent[0] += time.perf_counter() - t0
        return out
    return wrapper


def measure(rounds: int = 5, steps_per_round: int = 2, si_every: int = 20, warm_images_per_class: int = 2,
            on_round=None) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None, num_classes=K).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(B, 3, SIZE, SIZE).to(memory_format=torch.channels_last)
    incremental = SelectivityTracker(model, K, "blocks", incremental=True)
    plain = SelectivityTracker(model, K, "blocks")
    hook_time = [0.0]
    for t in (incremental, plain):
        t.hooks.means_fn = _timed(t.hooks.means_fn, hook_time)
    with torch.no_grad():  # every class seen: the state and the rescans of the first steps of an epoch
        for first in range(0, K * warm_images_per_class, B):
            labels = torch.arange(first, first + B) % K
            model(x)
            incremental.update(labels)
            plain.update(labels)
    for t in (incremental, plain):
        t.enabled = False
    incremental.rescans.zero_()
    rescan_steps = 0

    def step(tracker=None, si=False):
        y = torch.randint(0, K, (B,))
        opt.zero_grad(set_to_none=True)
        spent = 0.0
        t0 = time.perf_counter()
        if tracker is not None:
            tracker.enabled = True
        out = model(x)
        if tracker is not None:
            tracker.enabled = False
            a = time.perf_counter()
            tracker.update(y)
            if si:
                tracker.step_si()
            spent = time.perf_counter() - a
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
        return time.perf_counter() - t0, spent

    costs = Costs()
    for r in range(rounds + 1):  # round 0 warms up
        plain_steps, tracked, every, acc, hooks_every = [], [], [], [], []
        for _ in range(steps_per_round):
            plain_steps.append(step()[0])
            hook_time[0] = 0.0
            whole, spent = step(incremental, si=True)
            tracked.append(whole)
            every.append(spent)
            hooks_every.append(hook_time[0])
            acc.append(step(plain)[1])
            if r:
                rescan_steps += 1
        t0 = time.perf_counter()
        plain.compute()
        t_compute = time.perf_counter() - t0
        if not r:
            incremental.rescans.zero_()
            continue
        costs.step.append(statistics.median(plain_steps))
        costs.tracked_step.append(statistics.median(tracked))
        costs.every_step.append(statistics.median(every))
        costs.hooks.append(statistics.median(hooks_every))
        costs.accumulate.append(statistics.median(acc))
        costs.compute.append(t_compute)
        if on_round:
            on_round(r, costs)
    return {"costs": costs, "si_every": si_every, "units": sum(b - a for a, b in incremental._feed.layout.values()),
            "stale_per_step": float(incremental.rescans[0]) / max(1, rescan_steps),
            "threads": torch.get_num_threads()}


def percent_rows(result: dict) -> list[tuple[str, float, float, float, float | None]]:
    """(name, median %, min %, max %, target %) of a step, per cost; each round's cost ÷ the same
    round's untracked step, so that the spread is the rounds' spread."""
    c, n = result["costs"], result["si_every"]

    def pct(values):
        ratios = [100 * v / s for v, s in zip(values, c.step)]
        return statistics.median(ratios), min(ratios), max(ratios)

    amortized = [a + comp / n for a, comp in zip(c.accumulate, c.compute)]
    return [
        ("SI every step: accumulate_means with the cache + step_si()", *pct(c.every_step), 0.25),
        (f"SI every {n} steps: accumulate_means + compute() / {n}", *pct(amortized), 0.15),
        ("  accumulate_means alone (no cache)", *pct(c.accumulate), None),
        ("  compute() (full reduction), once", *pct(c.compute), None),
        ("the feed: each layer's means copied into the flat buffer", *pct(c.hooks), None),
    ]


def whole_step_ratio(result: dict) -> tuple[float, float, float]:
    """(median, min, max) over rounds of a whole tracked step (fused blocks, SI every step) ÷ the
    same round's stock untracked step. Informational: whole steps vary by more than the tracker
    takes, which is why the costs above are timed inside the steps."""
    c = result["costs"]
    ratios = [t / s for t, s in zip(c.tracked_step, c.step)]
    return statistics.median(ratios), min(ratios), max(ratios)
