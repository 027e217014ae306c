"""G ablation conditions per forward pass vs one pass per condition (what tools/bench_ablation.py
prints; its docstring says what the three columns are).

For each scope (a stage, or the whole network) and each number of conditions N, the same N
conditions are evaluated on the same cached images one by one, batched (the batch repeated at
the model's input) and batched with the shared prefix (repeated at the first ablated block),
interleaved over the repeats; the minimum time of each is kept and the three results are checked
to be identical (per-class correct counts; loss to float tolerance).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from selectivity.analyses.ablation import ablation as A
from selectivity.errors import AblationError
from selectivity.train.models import build_model, unit_registry
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


def _setup(model_name, image_size, images, batch_size, checkpoint):
    """The model (random weights, or the checkpoint's), cached random images in batches, and
    the units ranked on them."""
    model = build_model(model_name, 10)
    if checkpoint:
        from selectivity.train.checkpoint import load_state
        model.load_state_dict(load_state(checkpoint)["model"])
    model = model.eval().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, image_size, image_size, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (images,), generator=g)
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, images, batch_size)]
    return model, batches, rank_units(model, batches, num_classes=10)


def _scope_units(scope, registry, stages) -> dict:
    if scope == A.WHOLE:
        return dict(registry)
    if scope in stages:
        return {n: registry[n] for n in stages[scope]}
    raise AblationError(f"unknown scope {scope!r}; choose from {', '.join(stages)}, whole")


def _compare(model, batches, rankings, conds, cols, max_images, repeats):
    """({column: best seconds}, identical?, max |Δloss|) of the ways in ``cols``."""
    ways = {
        "one-by-one": dict(batched=False),
        "batched": dict(share_prefix=False, max_images=max_images),
        "batched+pre": dict(share_prefix=True, max_images=max_images),
    }

    def run(c, data):
        return A.evaluate_ablations(model, data, conds, rankings, dedupe=False, **ways[c])

    best, results = {c: float("inf") for c in cols}, {}
    for c in cols:  # untimed warm-up on one batch: one-time set-up costs of new shapes
        run(c, batches[:1])
    for _ in range(repeats):
        for c in cols:  # interleaved, so load changes hit all three alike
            t, results[c] = timed(lambda: run(c, batches))
            best[c] = min(best[c], t)
    ref = results["one-by-one"]
    same = all(all((a.correct == b.correct).all() for a, b in zip(ref, results[c]))
               for c in cols[1:])
    dloss = max(abs(a.loss - b.loss) for c in cols[1:] for a, b in zip(ref, results[c]))
    return best, same, dloss


def _tool_workload(model, batches, rankings, registry, stages, max_images, repeats) -> str:
    """tools/ablate.py's default workload for one checkpoint: one pass per condition vs batched
    and de-duplicated."""
    conds = []
    for stage, names in stages.items():
        conds += A.make_conditions({n: registry[n] for n in names}, random_draws=3, scope=stage)
    one = bat = float("inf")
    for _ in range(repeats):
        t, ref = timed(lambda: A.evaluate_ablations(model, batches, conds, rankings,
                                                    batched=False, dedupe=False))
        one = min(one, t)
        t, got = timed(lambda: A.evaluate_ablations(model, batches, conds, rankings,
                                                    max_images=max_images))
        bat = min(bat, t)
    same = all((a.correct == b.correct).all() for a, b in zip(ref, got))
    return (f"tools/ablate.py default workload ({len(conds)} conditions, every stage): "
            f"one-by-one {one:.1f} s, batched + prefix + de-duplicated {bat:.1f} s: "
            f"{one / bat:.2f}x; identical: {'yes' if same else 'NO'}")


def bench(model_name: str = "resnet20", image_size: int = 32, images: int = 360,
          batch_size: int = 360, conditions: Sequence[int] = (8,),
          stages: Sequence[str] | None = None, max_images: int = 256, repeats: int = 3,
          threads: int = 1, plain_batched: bool = True, checkpoint: str | None = None,
          tool_workload: bool = False, echo: Callable[[str], None] = print) -> list[dict]:
    """Time the ways side by side (module doc), hand the table to ``echo`` a row as it is
    measured, and return the rows ({scope, conditions, seconds: {way: s}, ratio, identical,
    max_dloss}). ``stages``: scopes, stage names and/or 'whole' (None: every stage, then
    whole)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model, batches, rankings = _setup(model_name, image_size, images, batch_size, checkpoint)
    registry = unit_registry(model)
    by_stage = A.scopes_by_stage(registry)
    scopes = [*by_stage, A.WHOLE] if stages is None else list(stages)
    echo(f"{model_name}, {image_size}px, {images} images, one-by-one batch {batch_size}, "
         f"batched <= {max_images} images/forward, {torch.get_num_threads()} thread(s), "
         f"min of {repeats}; times in s")
    cols = ["one-by-one"] + (["batched"] if plain_batched else []) + ["batched+pre"]
    echo(f"{'scope':>7} {'N':>4} " + " ".join(f"{c:>12}" for c in cols)
         + f" {'ratio':>6} {'ms/cond/img':>11}  identical")
    totals, rows = {c: 0.0 for c in cols}, []
    for scope in scopes:
        units = _scope_units(scope, registry, by_stage)
        for n in conditions:
            conds = spread_conditions(units, n, scope)
            best, same, dloss = _compare(model, batches, rankings, conds, cols, max_images,
                                         repeats)
            for c in cols:
                totals[c] += best[c]
            ratio = best["one-by-one"] / best["batched+pre"]
            per = best["batched+pre"] / (n * images) * 1e3
            rows.append({"scope": scope, "conditions": n, "seconds": best, "ratio": ratio,
                         "identical": same, "max_dloss": dloss})
            echo(f"{scope:>7} {n:>4} " + " ".join(f"{best[c]:12.2f}" for c in cols)
                 + f" {ratio:5.2f}x {per:11.2f}  {'yes' if same else 'NO'} "
                 f"(max |dloss| {dloss:.1e})")
    if scopes:
        ratio = totals["one-by-one"] / totals["batched+pre"]
        echo(f"{'all':>7} {'':>4} " + " ".join(f"{totals[c]:12.2f}" for c in cols)
             + f" {ratio:5.2f}x")
    if tool_workload:
        echo(_tool_workload(model, batches, rankings, registry, by_stage, max_images, repeats))
    return rows
