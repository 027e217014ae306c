"""Unit ablation: mask chosen units and measure accuracy, for many conditions per forward pass.

Paper 1's protocol (Ranadive et al. 2023), with its ranking/evaluation overlap fixed:

1. **Rank** the units of every tracked layer by class selectivity (selectivity/unit_ranking.py) on
   a *ranking split* (selectivity/train/splits.py) — never on the data the accuracy is then
   measured on (paper 1's code ranked and evaluated on the same ImageNet val set).
2. **Ablate** k units per layer — ``selective`` (the k highest SI), ``least`` (the k lowest) or
   ``random`` (k drawn uniformly; re-drawn for every batch as paper 1's code does, or fixed per
   draw) — in every layer of a *scope* at once (a stage: the same k in all its blocks, as paper 1;
   or the whole network). Ablating sets the unit's whole feature map to 0 (``mode="zero"``) or to
   the unit's mean activation over the ranking split (``mode="mean"``).
3. **Evaluate** top-1 accuracy and loss on the validation split for every (scope, condition, k).

This module does steps 2 and 3 (and the AUC summaries), given the rankings of step 1. Which
layers hold the units, and how a model names its own, is described in selectivity/unit_ranking.py
(a units spec of selectivity/units/, ``resolve_units``).

Many conditions per pass. ``AblationHooks`` masks a layer's output with a per-group mask
``[G, U]``: the batch is repeated G times and ``out.view(G, B, U, H, W) * keep[:, None, :, None,
None]`` gives every group its own condition (BatchNorm is in eval mode, so groups cannot
interact). The batch is not repeated at the model's input but at the *output* of the first masked
layer, just before its mask (``share_prefix``): that layer and everything before it are the same
for all conditions and run once. On a CPU this shared prefix, not per-call overhead, is what
makes batching pay (docs/ablation.md has the measurements). Identical conditions (k = 0
everywhere; k = U in every layer) are evaluated once.

Random draws are a pure function of ``(seed, draw, layer name, batch index)`` — not of the order
of evaluation, nor of the other layers or conditions evaluated alongside — so they are
reproducible, and the batched and one-pass-per-condition evaluations
(``evaluate_ablations(batched=False)``) see exactly the same masks (``units_to_ablate``). For one
(draw, layer, batch) the units are a random permutation's first k, so the random sets are nested in k, as the selective
and least-selective sets are.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections import OrderedDict
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from selectivity.analyses.common import bn_uses_batch_statistics, eval_no_grad
from selectivity.analyses.features import base_name
from selectivity.errors import AblationError
from selectivity.train.models import stage_of
from selectivity.unit_ranking import UnitRanking
from selectivity.units import UnitHooks, resolve_units

CONDITIONS = ("selective", "random", "least")
MODES = ("zero", "mean")
WHOLE = "whole"
# Fine steps up to half the units, coarser above (paper 1: steps of 15 to C/2, then 40), as
# fractions of a layer's units so one grid serves 16-channel and 2048-channel blocks alike.
DEFAULT_FRACTIONS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


# ---------------------------------------------------------------------------- grids

def scopes_by_stage(layer_names: Iterable[str]) -> "OrderedDict[str, list[str]]":
    """``{stage: [its layers]}`` (``layer2.1`` → ``layer2``), in order."""
    out = OrderedDict()
    for name in layer_names:
        out.setdefault(stage_of(name), []).append(name)
    return out


def k_from_fractions(fractions: Sequence[float], units: int) -> list[int]:
    """``round(f · units)`` for each fraction, de-duplicated, in increasing order."""
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise AblationError(f"fraction {f} outside [0, 1]")
    return sorted({int(round(f * units)) for f in fractions})


def paper_k_grid(units: int) -> list[int]:
    """Paper 1's grid: 0 to C/2 in steps of 15, then C/2 to C in steps of 40 (never reaching C).

    Meant for 256–2048-channel blocks; for a 16-channel block it is just [0, 8]."""
    return list(range(0, units // 2, 15)) + list(range(units // 2, units, 40))


# ---------------------------------------------------------------------------- conditions

@dataclasses.dataclass(frozen=True)
class Condition:
    """One ablation condition: ``kind`` units, ``k[layer]`` of them, in each layer of a scope.

    ``kind``: selective | random | least (k = 0 everywhere is the unablated model, whatever the
    kind). ``draw``: which independent random draw; ``redraw``: random units re-drawn for every
    batch (paper 1) or fixed for the whole evaluation. ``scope`` and ``grid`` are labels (the
    scope's name; the grid value — a fraction or a k — this condition was made from).
    """
    kind: str
    k: tuple  # ((layer, units to ablate), ...)
    draw: int = 0
    redraw: bool = True
    scope: str = ""
    grid: float | None = None

    def k_of(self, layer: str) -> int:
        return dict(self.k).get(layer, 0)

    @property
    def units_ablated(self) -> int:
        return sum(k for _, k in self.k)


def make_conditions(units: Mapping[str, int], kinds: Sequence[str] = CONDITIONS, *,
                    fractions: Sequence[float] | None = None, k_grid: Sequence[int] | None = None,
                    random_draws: int = 1, redraw: bool = True, scope: str = "") -> list[Condition]:
    """Conditions for one scope (``units``: {layer: unit count} of its layers).

    The grid is either ``fractions`` of each layer's units (k = round(f · U), so layers of different
    widths are ablated in proportion) or an absolute ``k_grid`` (the same k in every layer; k larger
    than a layer is an error). Default: ``DEFAULT_FRACTIONS``. One condition per (kind, grid value)
    and, for ``random``, per draw.
    """
    for kind in kinds:
        if kind not in CONDITIONS:
            raise AblationError(f"unknown condition {kind!r}; choose from {', '.join(CONDITIONS)}")
    if random_draws < 1:
        raise AblationError(f"random_draws must be >= 1, got {random_draws}")
    if fractions is not None and k_grid is not None:
        raise AblationError("give fractions or k_grid, not both")
    if k_grid is None:
        grid = list(DEFAULT_FRACTIONS if fractions is None else fractions)
        for f in grid:
            if not 0.0 <= f <= 1.0:
                raise AblationError(f"fraction {f} outside [0, 1]")
        per = [tuple((n, int(round(f * u))) for n, u in units.items()) for f in grid]
    else:
        grid = list(k_grid)
        for k in grid:
            if k < 0:
                raise AblationError(f"k must be >= 0, got {k}")
            too_big = [n for n, u in units.items() if k > u]
            if too_big:
                raise AblationError(f"k = {k} exceeds the {units[too_big[0]]} units of "
                                    f"{too_big[0]}")
        per = [tuple((n, int(k)) for n in units) for k in grid]
    out = []
    for kind in kinds:
        for g, k in zip(grid, per):
            for draw in range(random_draws if kind == "random" else 1):
                out.append(Condition(kind, k, draw, redraw, scope, g))
    return out


def _random_perm(seed: int, draw: int, layer: str, units: int, batch: int | None):
    """A permutation of a layer's units from (seed, draw, layer name[, batch]) alone."""
    name = zlib.crc32(layer.encode())
    key = [seed, 1, draw, name] if batch is None else [seed, 2, draw, name, batch]
    return torch.from_numpy(np.random.default_rng(key).permutation(units))


class _MaskMaker:
    """Ablated-unit masks per condition and batch (random ones cached per (draw, layer, batch))."""

    def __init__(self, rankings: Mapping[str, UnitRanking], seed: int):
        self.rankings, self.seed = rankings, seed
        self._perms: dict = {}

    def units(self, cond: Condition, layer: str, batch: int) -> torch.Tensor:
        k, r = cond.k_of(layer), self.rankings[layer]
        if k == 0:
            return torch.empty(0, dtype=torch.int64)
        if k == r.units or cond.kind != "random":
            return r.order[:k] if cond.kind != "least" else r.least(k)
        b = batch if cond.redraw else None
        key = (cond.draw, layer, b)
        if key not in self._perms:
            if len(self._perms) > 4096:
                self._perms.clear()
            self._perms[key] = _random_perm(self.seed, cond.draw, layer, r.units, b)
        return self._perms[key][:k]

    def deterministic(self, cond: Condition) -> bool:
        """True when the masks do not depend on the batch."""
        return cond.kind != "random" or not cond.redraw or all(
            k in (0, self.rankings[n].units) for n, k in cond.k)

    def signature(self, cond: Condition):
        """Equal signatures ⇔ identical masks in every batch."""
        if not self.deterministic(cond):
            return ("random", cond.draw, cond.k)
        return tuple((n, tuple(sorted(self.units(cond, n, 0).tolist())))
                     for n, k in cond.k if k > 0)

    def ablated(self, conds: Sequence[Condition], layer: str, batch: int) -> torch.Tensor:
        """[G, U] bool: True where a unit is ablated."""
        m = torch.zeros(len(conds), self.rankings[layer].units, dtype=torch.bool)
        for g, c in enumerate(conds):
            m[g, self.units(c, layer, batch)] = True
        return m


def units_to_ablate(cond: Condition, layer: str, rankings: Mapping[str, UnitRanking],
                    seed: int = 0, batch: int = 0) -> torch.Tensor:
    """The unit indices ``cond`` ablates in ``layer`` for batch number ``batch`` (what
    ``evaluate_ablations(..., seed=seed)`` uses)."""
    return _MaskMaker(rankings, seed).units(cond, layer, batch)


# ---------------------------------------------------------------------------- hooks

class AblationHooks:
    """Forward hooks masking units of ``layers``; G conditions per forward pass.

    ``set(ablated, fill)``: ``ablated[layer]`` is a ``[G, U]`` bool mask (True = ablate) and
    ``fill[layer]`` a ``[U]`` value to clamp ablated units to (``None``: 0). Layers absent from
    ``ablated`` are left alone. With ``expand=True`` the output of the first masked layer the
    forward pass reaches is repeated G times before masking (it and everything before it run once
    for all groups; from there on the forward pass must be a chain, as a ResNet's blocks are);
    otherwise the caller repeats the batch itself. Outputs are viewed as ``[G, B, U, ...]``, so a
    model's batch of ``G·B`` holds group g in rows ``g·B … (g+1)·B − 1``. A module called several
    times in one forward is masked at every call. Use as a context manager, or ``remove()``.
    """

    def __init__(self, model: nn.Module, layers: Mapping[str, nn.Module]):
        self.layers = OrderedDict(layers)
        self.groups, self.expand, self.expanded = 1, False, False
        self._masks: dict = {}
        self.hooks = UnitHooks(model, self.layers, self._mask, on_forward=self._reset)

    def set(self, ablated: Mapping[str, torch.Tensor],
            fill: Mapping[str, torch.Tensor] | None = None, expand: bool = False) -> None:
        masks, groups = {}, None
        for name, a in ablated.items():
            if name not in self.layers:
                raise AblationError(f"no hook on layer {name!r}; hooked: {', '.join(self.layers)}")
            if a.dim() != 2 or (groups is not None and a.shape[0] != groups):
                raise AblationError(f"masks must be [G, U] with one G, got {list(a.shape)} "
                                    f"for {name}")
            groups = a.shape[0]
            a = a.bool()
            keep = (~a).float()
            f = None
            if fill is not None and name in fill:
                f = a.float() * fill[name].reshape(1, -1).float().to(a.device)
            masks[name] = (keep, f)
        self._masks, self.groups, self.expand = masks, groups or 1, expand

    def clear(self) -> None:
        self._masks, self.groups, self.expand = {}, 1, False

    def _reset(self):
        self.expanded = False

    def _mask(self, layer, out):
        name = base_name(layer)  # a module called several times is masked at every call
        m = self._masks.get(name)
        if m is None:
            return None
        keep, fill = m
        G, U = keep.shape
        if self.expand and not self.expanded:
            # The first masked layer's output is still the same for every group: repeat it
            # here, so this layer and all before it run once (cat keeps channels_last).
            self.expanded = True
            out = torch.cat([out] * G)
        if out.dim() < 2 or out.shape[1] != U or out.shape[0] % G:
            raise AblationError(f"layer {name}: output {list(out.shape)} does not fit a "
                                f"[{G}, {U}] mask (batch must be G·B, dim 1 the units)")
        if keep.device != out.device or keep.dtype != out.dtype:
            keep = keep.to(out.device, out.dtype)
            fill = None if fill is None else fill.to(out.device, out.dtype)
            self._masks[name] = (keep, fill)
        B, tail = out.shape[0] // G, (1,) * (out.dim() - 2)
        o = out.view(G, B, *out.shape[1:])
        res = o * keep.view(G, 1, U, *tail)
        if fill is not None:
            res = res + fill.view(G, 1, U, *tail)
        return res.reshape(out.shape)

    def remove(self) -> None:
        self.hooks.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


# ---------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class AblationResult:
    condition: Condition
    loss: float             # mean cross-entropy
    acc1: float
    correct: np.ndarray     # [K] correct top-1 per class
    count: np.ndarray       # [K] images per class
    images: int

    @property
    def class_acc(self) -> np.ndarray:
        return self.correct / np.maximum(self.count, 1)


def default_max_images(device) -> int:
    # CPU: per-image cost is flat or rising above a few hundred 32-px images (caches), so a
    # forward pass holds at most 256; a GPU wants big batches.
    return 256 if torch.device(device).type == "cpu" else 4096


@torch.no_grad()
def evaluate_ablations(model: nn.Module, loader: Iterable, conditions: Sequence[Condition],
                       rankings: Mapping[str, UnitRanking], *, layers=None, mode: str = "zero",
                       seed: int = 0, batched: bool = True, share_prefix: bool = True,
                       max_images: int | None = None, dedupe: bool = True) -> list[AblationResult]:
    """Accuracy and loss of ``model`` on ``loader`` under every condition (one result each, in
    order). No grad; a model in training mode is put in eval mode (and back afterwards); a model
    already in eval mode is measured as configured (e.g. inside ``evaluation.bn_statistics``).

    ``batched``: all conditions in one pass over ``loader``, G per forward (at most
    ``max_images`` images per forward pass, default ``default_max_images``), the batch repeated at
    the output of the first masked layer (``share_prefix``; else at the input).
    ``batched=False`` is the plain way: for each condition, one full pass over ``loader`` with a
    [1, U] mask — the reference. ``dedupe``: evaluate identical conditions once.
    ``mode``: zero | mean (clamp to ``rankings[layer].mean``). ``seed``: the random draws'.
    ``layers``: the hooked layers (default: all layers of ``rankings``, resolved by name).
    Results are per condition: mean loss, top-1 accuracy, and correct/count per class.
    """
    if mode not in MODES:
        raise AblationError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if layers is None:
        layers = list(rankings)
    layers = resolve_units(model, layers)
    names = list(layers)
    for c in conditions:
        for n, k in c.k:
            if n not in rankings or n not in layers:
                raise AblationError(f"condition names layer {n!r}, which is not ranked/hooked")
            if not 0 <= k <= rankings[n].units:
                raise AblationError(f"k = {k} outside [0, {rankings[n].units}] for layer {n}")
    maker = _MaskMaker(rankings, seed)
    # Identical conditions are evaluated once.
    unique, slot = [], []
    seen: dict = {}
    for c in conditions:
        sig = maker.signature(c) if dedupe else len(unique)
        if sig not in seen:
            seen[sig] = len(unique)
            unique.append(c)
        slot.append(seen[sig])
    fill = ({n: rankings[n].mean for n in names} if mode == "mean" else None)
    max_images = max_images or default_max_images(next(model.parameters()).device)

    stats = [[0.0, None] for _ in unique]  # per unique condition: loss sum, correct per class
    with eval_no_grad(model):
        if batched and bn_uses_batch_statistics(model):
            # BatchNorm normalising by batch statistics (bn_mode batch): the G conditions of a
            # batched pass would share those statistics, so each condition gets its own passes.
            batched = False
        count = _evaluate(model, loader, unique, layers, names, maker, fill, batched,
                          share_prefix, max_images, stats)
    if count is None:
        raise AblationError("the evaluation loader yielded no batches")
    n = int(count.sum())
    K = max([len(count)] + [len(s[1]) for s in stats if s[1] is not None])
    count = np.pad(count, (0, K - len(count)))
    out = []
    for c, s in zip(conditions, slot):
        loss_sum, correct = stats[s]
        correct = np.zeros(K, dtype=np.int64) if correct is None else _add(np.zeros(K, np.int64),
                                                                           correct)
        out.append(AblationResult(c, loss_sum / n, float(correct.sum()) / n, correct,
                                  count.copy(), n))
    return out


def _evaluate(model, loader, unique, layers, names, maker, fill, batched, share_prefix,
              max_images, stats):
    """The passes of ``evaluate_ablations``; returns the images per class."""
    count = None
    hooks = AblationHooks(model, layers)
    try:
        if batched:
            groups = _prefix_groups(unique, names, share_prefix)
            for b, (images, labels) in enumerate(loader):
                for idx, expand in groups:
                    _run_groups(model, hooks, maker, unique, idx, names, fill, images, labels, b,
                                expand, max_images, stats)
                count = _add(count, np.bincount(labels.cpu().numpy()))
        else:
            for i in range(len(unique)):
                for b, (images, labels) in enumerate(loader):
                    _run_groups(model, hooks, maker, unique, [i], names, fill, images, labels, b,
                                False, None, stats)
                    if i == 0:
                        count = _add(count, np.bincount(labels.cpu().numpy()))
    finally:
        hooks.remove()
    return count


def _add(total: np.ndarray | None, x: np.ndarray) -> np.ndarray:
    """total + x for 1-D count arrays of possibly different lengths."""
    if total is None:
        return x.astype(np.int64)
    n = max(len(total), len(x))
    return np.pad(total, (0, n - len(total))) + np.pad(x, (0, n - len(x)))


def _first_masked(cond: Condition, names: Sequence[str]) -> int | None:
    ks = dict(cond.k)
    for i, n in enumerate(names):
        if ks.get(n, 0) > 0:
            return i
    return None


def _prefix_groups(conds: Sequence[Condition], names: Sequence[str], share_prefix: bool):
    """[(condition indices, expand at first masked layer?)]: one group per first masked layer, so
    each group's shared prefix is as long as possible; unablated conditions join the deepest."""
    if not share_prefix:
        return [(list(range(len(conds))), False)]
    by_cut: "OrderedDict[int, list[int]]" = OrderedDict()
    none = []
    for i, c in enumerate(conds):
        cut = _first_masked(c, names)
        (none if cut is None else by_cut.setdefault(cut, [])).append(i)
    if not by_cut:
        return [(none, False)]
    deepest = max(by_cut)
    by_cut[deepest] = none + by_cut[deepest]
    return [(by_cut[cut], True) for cut in sorted(by_cut)]


def _run_groups(model, hooks, maker, conds, idx, names, fill, images, labels, batch, expand,
                max_images, stats) -> None:
    """Evaluate conditions ``conds[i] for i in idx`` on one batch, adding into ``stats[i]``:
    chunks of at most Gc conditions × sub-batches of b images (Gc · b <= max_images)."""
    B, G = images.shape[0], len(idx)
    if max_images is None:
        b, Gc = B, G
    else:
        b = min(B, max(1, max_images // G))
        Gc = min(G, max(1, max_images // b))
    for g0 in range(0, G, Gc):
        chunk = idx[g0:g0 + Gc]
        cs = [conds[i] for i in chunk]
        masked = {n: maker.ablated(cs, n, batch).to(images.device) for n in names
                  if any(c.k_of(n) > 0 for c in cs)}
        if masked:
            hooks.set(masked, None if fill is None else {n: fill[n] for n in masked},
                      expand=expand)
        else:  # unablated only: one plain pass serves them all
            hooks.clear()
        g = len(cs) if masked else 1
        for s in range(0, B, b):
            x, y = images[s:s + b], labels[s:s + b]
            if masked and not expand and g > 1:
                x = torch.cat([x] * g)
            logits = model(x)
            if masked and expand and not hooks.expanded:
                raise AblationError("no masked layer ran in the forward pass")
            logits = logits.float().view(g, y.shape[0], -1)
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(g), reduction="none")
            loss = loss.view(g, -1).double().sum(1).cpu()
            right = (logits.argmax(-1) == y).cpu()
            yc = y.cpu()
            for j, i in enumerate(chunk):
                jj = j if masked else 0
                stats[i][0] += float(loss[jj])
                stats[i][1] = _add(stats[i][1], np.bincount(yc[right[jj]].numpy(),
                                                            minlength=logits.shape[-1]))
    hooks.clear()


# ---------------------------------------------------------------------------- summaries

def auc(norm_acc: Sequence[float]) -> float:
    """Area under a normalized-accuracy curve as the mean over its grid points (so curves on
    different grids stay comparable; paper 1 summed, which scales with the number of points)."""
    return float(np.mean(norm_acc)) if len(norm_acc) else float("nan")


def auc_table(rows: Sequence[Mapping]) -> "OrderedDict[tuple, dict]":
    """From ablation.jsonl rows: {(epoch, step, stage): {condition: (AUC, s.d. over random
    draws)}}."""
    curves: "OrderedDict[tuple, dict]" = OrderedDict()
    for r in rows:
        key = (r["epoch"], r["step"], r["stage"])
        curves.setdefault(key, OrderedDict()).setdefault(r["condition"], []).append(r)
    out = OrderedDict()
    for key, conds in curves.items():
        out[key] = OrderedDict()
        for cond, rs in conds.items():
            rs = sorted(rs, key=lambda r: r["grid"])
            per_draw = np.array([r.get("norm_acc1_draws") or [r["norm_acc1"]] for r in rs])
            aucs = per_draw.mean(0)
            out[key][cond] = (float(aucs.mean()), float(aucs.std()) if aucs.size > 1 else 0.0)
    return out
