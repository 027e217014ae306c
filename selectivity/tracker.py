"""``SelectivityTracker``: the class selectivity of every unit, over any data, in any loop.

Life cycle as in torchmetrics::

    tracker = SelectivityTracker(model, num_classes=10, units="blocks")
    for images, labels in loader:
        with tracker.track(labels):          # the forward's unit means, accumulated at the exit
            model(images)
    result = tracker.compute()              # {layer: LayerSelectivity}
    tracker.reset()

or ``model(images); tracker.update(labels)`` for the forward that just ran. The labels (and the
null's dataset indices) go with the one forward they belong to and are not kept after it.

The feed: during a forward every tracked layer's per-image unit means ``[B, U]`` land in their slice
of one flat ``[B, ΣU]`` float32 buffer (``_MeansFeed``); at the end of ``track`` (or in ``update``) one
``ops.accumulate_means`` call adds the whole step into one tiled state for all layers, with a
``[1 + P, B]`` label matrix (row 0 the labels, rows 1.. the null's). ``compute()`` gives per-unit SI
from class **means**, the preferred class, μ_max, μ_-max and the counts.

Per-step SI: ``incremental=True`` keeps row 0's per-unit μ_max, preferred class and sum of class means
up to date in O(B·ΣU) a step (a unit is rescanned only when its preferred class's mean fell);
``step_si()`` then gives every layer's mean SI as device tensors, without a host sync. ``decay=λ``
makes the state exponentially weighted (class means = decayed sums / decayed counts), so that the
per-step SI describes the recent network.

Under DDP every step's means and labels are all-gathered (selectivity/reduce.py) and every rank adds
the whole global batch into its state: the ranks' states are alike, and SI describes all ranks at
every step without a reduction.

The null. SI is not 0 for a unit with no class preference (about 0.04 at CIFAR-test size, 0.27 at
ImageNet-val size), so a finding needs its null beside it. Given ``dataset_labels`` (the labels
of the whole split, by dataset index) and ``null_permutations = P``, the tracker fixes P seeded
permutations π_p of the split and gives image i the null label ``dataset_labels[π_p(i)]``; the
caller passes each batch's dataset ``indices``. Class counts are then exactly the real ones, every
DDP rank and every evaluation uses the same null, and the null is accumulated in the same pass.
``compute()`` adds per unit the P null SIs; ``LayerSelectivity`` summarizes them (mean, 95 %
quantile, and the fraction of units whose SI exceeds their own null 95 % quantile).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from selectivity import ops
from selectivity.reduce import all_gather_batch
from selectivity.units import HooksOwner, UnitHooks, check_negative, check_responses, unwrap

EPS = 1e-7  # Leavitt & Morcos' ε; the regularizer uses the same
NULL_QUANTILE = 0.95


class _OnFirstRead:
    """A dataclass field that may be given as a zero-argument function, called on the first read.

    Why: a layer's ``[K, U]`` sums are a copy out of the tiled state (its units are spread over
    tiles); most callers of ``compute()`` read only SI, and the copy of all layers at K = 1000 costs
    more than the reduction itself."""

    def __set_name__(self, owner, name):
        self.key = "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            raise AttributeError(self.key)  # no class-level default: the field stays required
        value = obj.__dict__[self.key]
        if callable(value):
            value = obj.__dict__[self.key] = value()
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.key] = value


@dataclasses.dataclass
class LayerSelectivity:
    """One layer's units over the data seen (float64 / int64 tensors on the tracker's device)."""
    si: torch.Tensor            # [U]
    pref_class: torch.Tensor    # [U], -1 where no class was seen
    mu_max: torch.Tensor        # [U]
    mu_rest: torch.Tensor       # [U] mean of the other present classes' means
    sums: torch.Tensor = _OnFirstRead()  # [K, U] per-class sums of the per-image unit means (a copy,
                                # made on first read: see _OnFirstRead)
    counts: torch.Tensor        # [K] images per class (int64; float64 decayed counts with decay)
    null_si: torch.Tensor | None = None  # [P, U]: SI under each label permutation
    negative: str = "error"     # what was measured: "error" (responses as they are, all >= 0),
                                # "relu" (their positive part) or "shift" (si, mu_max, mu_rest of
                                # the class means less each unit's lowest); see units.NEGATIVE
    tokens: str = "mean"        # [B, T, U] layers: the token mean or the class token ("cls")
    shifted_by: torch.Tensor | None = None  # [U], "shift" only: the lowest class mean subtracted
                                # (sums and counts stay as accumulated; null rows have their own)

    @property
    def mean(self) -> float:
        return float(self.si.mean()) if self.si.numel() else float("nan")

    @property
    def null_means(self) -> torch.Tensor | None:
        """[P]: the layer's mean SI under each permutation."""
        return None if self.null_si is None else self.null_si.mean(1)

    @property
    def null_mean(self) -> float | None:
        return None if self.null_si is None else float(self.null_means.mean())

    @property
    def null_q95(self) -> float | None:
        """The 95 % quantile of the layer's mean SI over the permutations."""
        return None if self.null_si is None else float(
            torch.quantile(self.null_means, NULL_QUANTILE))

    @property
    def unit_null_q95(self) -> torch.Tensor | None:
        """[U]: each unit's 95 % quantile of SI over the permutations."""
        return None if self.null_si is None else torch.quantile(self.null_si, NULL_QUANTILE, 0)

    @property
    def frac_above_null(self) -> float | None:
        """Fraction of units whose SI exceeds their own null 95 % quantile."""
        q = self.unit_null_q95
        return None if q is None else float((self.si > q).double().mean())

    def cpu(self) -> "LayerSelectivity":
        """A copy on the CPU (what the trainer saves)."""
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return LayerSelectivity(*(t.cpu() if isinstance(t, torch.Tensor) else t for t in values))


class _MeansFeed:
    """The flat ``[B, ΣU]`` float32 buffer that one forward's unit means land in, layer by layer.

    The layout (each layer's slice, in the order the layers first ran) is fixed by the first forward
    (or by a loaded state); later forwards write each layer's means into its slice. ``take()`` gives
    the buffer of the last forward once, after checking that every layer wrote its slice."""

    def __init__(self):
        self.layout: "OrderedDict[str, tuple[int, int]]" = OrderedDict()  # name -> (start, stop)
        self.buffer: torch.Tensor | None = None
        self.views: dict[str, torch.Tensor] = {}  # each layer's slice of the buffer
        self.first: "OrderedDict[str, torch.Tensor]" = OrderedDict()  # the first forward's means
        self.written: set = set()
        self.forwards = 0  # forwards started; take() remembers the one it consumed
        self.taken = 0

    @property
    def width(self) -> int:
        return next(reversed(self.layout.values()))[1] if self.layout else 0

    def start(self) -> None:
        self.forwards += 1
        self.written.clear()
        self.first.clear()

    def write(self, name: str, means: torch.Tensor) -> None:
        if not self.layout:
            self.first[name] = means
            self.written.add(name)
            return
        B = means.shape[0]
        if self.buffer is None or self.buffer.shape[0] != B or self.buffer.device != means.device:
            self._set_buffer(torch.empty(B, self.width, dtype=torch.float32, device=means.device))
        view = self.views.get(name)
        if view is None:
            raise RuntimeError(f"tracked layer {name!r} ran but was not in the tracker's layout "
                               f"({', '.join(self.layout)}); reset() the tracker after changing the model")
        view.copy_(means)
        self.written.add(name)

    def _set_buffer(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        # Each layer's slice, made once: inside the forward a slice op costs tens of microseconds.
        self.views = {n: buffer[:, a:b] for n, (a, b) in self.layout.items()}

    def fix_layout(self, sizes: "OrderedDict[str, int]") -> None:
        self.buffer = None  # the views are of the old layout
        self.layout.clear()
        start = 0
        for name, units in sizes.items():
            self.layout[name] = (start, start + units)
            start += units

    def take(self, since: int) -> torch.Tensor:
        """The last forward's ``[B, ΣU]`` means; ``since``: the forward count before it was run."""
        if self.forwards == since or self.taken == self.forwards:
            raise RuntimeError("no tracked layer ran since the last accumulation: run the model's forward "
                               "(with the tracker enabled) inside track(), or before update()")
        if self.forwards > since + 1:
            raise RuntimeError("track()/update() accumulate one forward pass; this batch ran "
                               f"{self.forwards - since}: call track()/update() once per forward")
        if not self.layout and self.first:
            self.fix_layout(OrderedDict((n, m.shape[1]) for n, m in self.first.items()))
            self._set_buffer(torch.cat([m.float() for m in self.first.values()], 1))
        missing = [n for n in self.layout if n not in self.written]
        if missing:
            raise RuntimeError(f"tracked layers did not run in this forward pass: {', '.join(missing)}")
        self.taken = self.forwards
        return self.buffer


def null_label_table(dataset_labels, permutations: int, seed: int) -> torch.Tensor:
    """[P, N] int64: row p is the labels permuted by the p-th fixed permutation of (seed, p)."""
    labels = np.asarray(dataset_labels, dtype=np.int64)
    rows = [labels[np.random.default_rng((seed, 7919, p)).permutation(len(labels))]
            for p in range(permutations)]
    return torch.as_tensor(np.stack(rows) if rows else np.zeros((0, len(labels)), np.int64))


# The decayed state's image weight grows by 1/λ a step; past this it is folded into the state.
RENORMALIZE_ABOVE = 1e100


class SelectivityTracker(HooksOwner):
    """Per-unit class selectivity of ``units`` of ``model`` over the batches it is shown.

    ``num_classes``: K. ``units``: see selectivity/units/ (default ``"blocks"``).
    ``dataset_labels`` + ``null_permutations``: the label-shuffled null (module doc); then every
    ``track``/``update`` needs the batch's dataset ``indices``. ``seed`` fixes the permutations.
    ``incremental``: keep the per-step SI (``step_si()``). ``decay``: None, or λ in (0, 1) for an
    exponentially weighted state. ``tile``: units per tile of the state (ops.TILE).
    """

    def __init__(self, model: nn.Module, num_classes: int, units="blocks", *,
                 dataset_labels: Sequence[int] | None = None, null_permutations: int = 0,
                 seed: int = 0, eps: float = EPS, incremental: bool = False,
                 decay: float | None = None, tile: int = ops.TILE, negative: str = "error"):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if null_permutations < 0:
            raise ValueError(f"null_permutations must be >= 0, got {null_permutations}")
        if null_permutations and dataset_labels is None:
            raise ValueError("a null needs dataset_labels (the split's labels by dataset index)")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be None or in (0, 1), got {decay}")
        self.num_classes, self.eps = num_classes, eps
        self.negative = check_negative(negative)
        self._responses_checked = False  # the sign check of the first tracked batch
        self.incremental, self.decay, self.tile = incremental, decay, tile
        self.model = unwrap(model)
        self.rows = 1 + null_permutations
        self._null_table = null_label_table(dataset_labels, null_permutations, seed) \
            if null_permutations else None
        self._feed = _MeansFeed()
        self._batch, self._batch_start = None, None  # begin()'s (labels, indices), feed's forward count
        self.sums = self.counts = self.cache = None  # the state, made at the first step
        self.rescans = torch.zeros(2, dtype=torch.int64)  # [units, tiles] rescanned (ops.accumulate_means)
        self.steps = 0
        self._weight = 1.0
        self.hooks = UnitHooks(model, units, means_fn=self._on_means, on_forward=self._feed.start,
                               rectify=self.negative == "relu")

    # -- the feed --------------------------------------------------------------------------------
    def _on_means(self, name: str, means: torch.Tensor) -> None:
        """A layer's per-image unit means ``[B, U]`` of the running forward (UnitHooks' means_fn:
        from a fused block's epilogue, or a hook's ``unit_means``), into its slice of the feed."""
        if not self._responses_checked:
            check_responses(name, means, self.negative)
        self._feed.write(name, means.detach())

    def _label_matrix(self, labels: torch.Tensor, indices, device) -> torch.Tensor:
        labels = torch.as_tensor(labels).to(device=device, dtype=torch.int64)
        if self._null_table is None:
            return labels.unsqueeze(0)
        if indices is None:
            raise ValueError("this tracker has a null: pass the batch's dataset indices "
                             "(indices=...) with its labels")
        idx = torch.as_tensor(indices, dtype=torch.int64).cpu()
        if idx.shape != labels.shape:
            raise ValueError(f"indices must match labels, got {list(idx.shape)} and {list(labels.shape)}")
        null = self._null_table[:, idx].to(device, non_blocking=True)
        return torch.cat([labels.unsqueeze(0), null])

    def _accumulate(self, labels: torch.Tensor, indices, since: int) -> None:
        means = self._feed.take(since)
        if means.shape[0] != len(labels):
            raise ValueError(f"labels must have one entry per image: the forward had {means.shape[0]} "
                             f"images, got {len(labels)} labels")
        matrix = self._label_matrix(labels, indices, means.device)
        means, matrix = all_gather_batch(means, matrix)
        if self.sums is None:
            self._new_state(means.shape[1], means.device)
        ops.accumulate_means(means, matrix, self.sums, self.counts, self._weight, self.cache, self.rescans)
        self._responses_checked = True
        self.steps += 1
        if self.decay is not None:
            self._weight /= self.decay
            if self._weight > RENORMALIZE_ABOVE:
                self._renormalize()

    def _new_state(self, units: int, device) -> None:
        self.sums, self.counts = ops.new_tiled_state(self.rows, self.num_classes, units, self.tile, device)
        self.cache = ops.new_index_cache(self.sums) if self.incremental else None
        self.rescans = self.rescans.to(device)

    def _renormalize(self) -> None:
        """Fold the image weight into the state (class means unchanged up to rounding; the cache is
        rebuilt so that it is again exact for the rescaled state)."""
        self.sums /= self._weight
        self.counts /= self._weight
        self._weight = 1.0
        if self.cache is not None:
            self.cache = ops.index_cache(self.sums[0], self.counts[0])

    # -- the public feed -------------------------------------------------------------------------
    def begin(self, labels: torch.Tensor, indices=None) -> None:
        """Start a batch: the next forward pass is accumulated with these labels at ``end()``
        (``track`` is this pair as a context manager)."""
        self._batch = (labels, indices)
        self._batch_start = self._feed.forwards

    def end(self) -> None:
        """Accumulate the forward run since ``begin()``; nothing when no batch was begun."""
        if self._batch_start is None:
            return
        (labels, indices), since = self._batch, self._batch_start
        self._batch, self._batch_start = None, None
        self._accumulate(labels, indices, since)

    @contextlib.contextmanager
    def track(self, labels: torch.Tensor, indices=None):
        """Accumulate the forward pass run inside the block with ``labels`` (``[B]`` int64)."""
        self.begin(labels, indices)
        try:
            yield self
        except BaseException:
            self._batch, self._batch_start = None, None
            raise
        self.end()

    def update(self, labels: torch.Tensor, indices=None) -> None:
        """Accumulate the forward pass that just ran (outside ``track``) with ``labels``."""
        self._accumulate(labels, indices, self._feed.forwards - 1)

    # -- results ---------------------------------------------------------------------------------
    def _units(self) -> "OrderedDict[str, tuple[int, int]]":
        return self._feed.layout

    def compute(self) -> "OrderedDict[str, LayerSelectivity]":
        """Every layer's selectivity over all batches since the last ``reset`` (a full reduction of
        the state; under DDP the state already holds every rank's images). Tensors stay on the
        state's device; ``sums`` is copied out of the tiled state on first read."""
        out = OrderedDict()
        if self.sums is None:
            return out
        counts = self.counts[0] if self.decay is not None else self.counts[0].long()
        lowest = self._lowest(0)
        r = ops.si_from_cache(ops.index_cache(self.sums[0], self.counts[0], bounds=False), self.counts[0],
                              self.eps, lowest)
        null = torch.stack([ops.si_from_cache(ops.index_cache(self.sums[p], self.counts[p], bounds=False),
                                              self.counts[p], self.eps, self._lowest(p)).si
                            for p in range(1, self.rows)]) if self.rows > 1 else None
        sums = self.sums[0]
        # The sign again, over the class means (one host sync): a negative μ_max or μ_-max.
        if self.negative == "error" and bool(((r.mu_max < 0) | (r.mu_rest < 0)).any()):
            for name, (a, b) in self._units().items():
                check_responses(name, torch.stack([r.mu_max[a:b], r.mu_rest[a:b]]), "error",
                                "class-mean")
        for name, (a, b) in self._units().items():
            out[name] = LayerSelectivity(r.si[a:b], r.pref_class[a:b], r.mu_max[a:b], r.mu_rest[a:b],
                                         functools.partial(ops.tiled_to_dense, sums, a, b), counts,
                                         None if null is None else null[:, a:b],
                                         negative=self.negative, tokens=self.hooks.tokens,
                                         shifted_by=None if lowest is None else lowest[a:b])
        return out

    def _lowest(self, row: int) -> torch.Tensor | None:
        """negative="shift": every unit's lowest class mean in label row ``row`` (else None)."""
        if self.negative != "shift":
            return None
        return ops.lowest_class_means(self.sums[row], self.counts[row])

    def step_si(self) -> "OrderedDict[str, torch.Tensor]":
        """Every layer's mean SI over the state as it is now (0-d tensors on the state's device, no
        host sync), from the incrementally kept cache; needs ``incremental=True``."""
        if not self.incremental:
            raise RuntimeError("step_si() needs SelectivityTracker(..., incremental=True)")
        if self.sums is None:
            return OrderedDict()
        # negative="shift": the lowest class means are not in the cache; they take a pass over
        # the state (O(K·ΣU) a call instead of O(B·ΣU) a step).
        layers = self._units()
        means = ops.layer_si_means(self.cache, self.counts[0], [b - a for a, b in layers.values()], self.eps,
                                   self._lowest(0))
        return OrderedDict(zip(layers, means.unbind()))

    def layer_states(self) -> "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]":
        """``{layer: (sums [K, U], counts [K])}`` of the real labels: copies out of the tiled state."""
        if self.sums is None:
            return OrderedDict()
        counts = self.counts[0] if self.decay is not None else self.counts[0].long()
        return OrderedDict((n, (ops.tiled_to_dense(self.sums[0], a, b), counts))
                           for n, (a, b) in self._units().items())

    @property
    def states(self) -> "_StatesView":
        """Kept for callers of the per-layer tracker: ``tracker.states.states`` is
        ``layer_states()``."""
        return _StatesView(self)

    def synchronize(self) -> None:
        """Nothing to wait for: every op of the tracker runs on the current stream. Kept so that
        loops written for the side-stream tracker keep working."""

    def reset(self) -> None:
        """Forget every batch (the state is dropped; the layers' layout is kept)."""
        self.sums = self.counts = self.cache = None
        self.rescans.zero_()
        self.steps, self._weight = 0, 1.0

    def state_dict(self) -> dict:
        if self.sums is None:
            return {"format": "tiled", "layers": {}}
        return {"format": "tiled", "layers": {n: b - a for n, (a, b) in self._units().items()},
                "sums": self.sums.cpu(), "counts": self.counts.cpu(), "weight": self._weight,
                "steps": self.steps, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        if state.get("format") != "tiled":
            state = _from_per_layer_states(state, self.rows, self.tile)
        if not state["layers"]:
            self.sums = self.counts = self.cache = None
            return
        if state["sums"].shape[0] != self.rows or state["sums"].shape[2] != self.num_classes:
            raise ValueError(f"the saved state has {state['sums'].shape[0]} label rows and "
                             f"{state['sums'].shape[2]} classes; this tracker has {self.rows} and "
                             f"{self.num_classes}: make the tracker as the saved one was made")
        self._feed.fix_layout(OrderedDict(state["layers"]))
        self.sums, self.counts = state["sums"].to(device), state["counts"].to(device)
        self.tile = self.sums.shape[3]
        self._weight, self.steps = state.get("weight", 1.0), state.get("steps", 0)
        self.rescans = self.rescans.to(device)
        self.cache = ops.index_cache(self.sums[0], self.counts[0]) if self.incremental else None


class _StatesView:
    def __init__(self, tracker: SelectivityTracker):
        self.tracker = tracker

    @property
    def states(self) -> "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]":
        return self.tracker.layer_states()

    def reduced(self) -> "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]":
        return self.tracker.layer_states()


def _from_per_layer_states(state: dict, rows: int, tile: int) -> dict:
    """A state_dict of the per-layer tracker (``{"states": {layer: (sums [K, U], counts [K])},
    "null_states": [...]}``) as a tiled one."""
    tables = [state.get("states", {}), *state.get("null_states", [])]
    if len(tables) != rows:
        raise ValueError(f"the saved tracker state has {len(tables) - 1} null permutations, this tracker "
                         f"{rows - 1}: make the tracker with the saved null_permutations")
    layers = OrderedDict((n, s.shape[1]) for n, (s, _) in tables[0].items())
    if not layers:
        return {"format": "tiled", "layers": {}}
    K, N = next(iter(tables[0].values()))[0].shape[0], sum(layers.values())
    sums, counts = ops.new_tiled_state(rows, K, N, tile)
    flat = torch.zeros(rows, K, sums.shape[1] * tile, dtype=torch.float64)
    for r, table in enumerate(tables):
        first = next(iter(table.values()))[1]
        if any(not torch.equal(c, first) for _, c in table.values()):
            raise ValueError("the saved per-layer states counted different images per layer; they cannot "
                             "form one state (start the tracker afresh)")
        counts[r] = first.double()
        flat[r, :, :N] = torch.cat([table[n][0].double() for n in layers], 1)
    sums.copy_(flat.view(rows, K, sums.shape[1], tile).permute(0, 2, 1, 3))
    return {"format": "tiled", "layers": layers, "sums": sums, "counts": counts}

def summarize(results: "OrderedDict[str, LayerSelectivity]") -> dict:
    """Scalars for logs: per-layer mean SI and, with a null, its mean, 95 % quantile and the
    fraction of units above it; ``*_mean`` averages the layers, each weighted equally."""
    def avg(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    out = {"si": {n: r.mean for n, r in results.items()}}
    out["si_mean"] = avg(out["si"].values())
    if results and next(iter(results.values())).null_si is not None:
        out["si_null_layers"] = {n: r.null_mean for n, r in results.items()}
        out["si_null_q95_layers"] = {n: r.null_q95 for n, r in results.items()}
        out["si_above_null"] = {n: r.frac_above_null for n, r in results.items()}
        out["si_null"] = avg(out["si_null_layers"].values())
        out["si_null_q95"] = avg(out["si_null_q95_layers"].values())
        out["si_above_null_mean"] = avg(out["si_above_null"].values())
    return out
