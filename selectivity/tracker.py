"""``SelectivityTracker``: the class selectivity of every unit, over any data, in any loop.

Life cycle as in torchmetrics::

    tracker = SelectivityTracker(model, num_classes=10, units="blocks")
    for images, labels in loader:
        with tracker.track(labels):          # the fused per-class accumulation of every layer
            model(images)
    result = tracker.compute()              # {layer: LayerSelectivity}
    tracker.reset()

or ``model(images); tracker.update(labels)`` for the forward that just ran (the hooks keep each
layer's per-image unit means of the last forward until then).

Per layer the state is the fused per-class sums and counts of selectivity/ops.py; ``compute()``
gives per-unit SI from class **means**, the preferred class, μ_max, μ_-max and the counts. Under
DDP each rank accumulates its own images and ``compute()`` sums the states over ranks (one
all_reduce; the local states are left as they are).

On a GPU the accumulation is queued on a CUDA stream of the tracker's own, so that it runs under
the rest of the forward and the backward; ``compute()``, ``state_dict()`` and every read of the
states make the current stream wait for it first (``_SideStream``). Nothing for the caller to do.

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
from collections import OrderedDict
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from selectivity import ops
from selectivity.reduce import all_reduce_states, is_distributed
from selectivity.units import UnitHooks, unit_means, unwrap

EPS = 1e-7  # Leavitt & Morcos' ε; the regularizer uses the same
NULL_QUANTILE = 0.95


@dataclasses.dataclass
class LayerSelectivity:
    """One layer's units over the data seen (float64 / int64 tensors on the tracker's device)."""
    si: torch.Tensor            # [U]
    pref_class: torch.Tensor    # [U], -1 where no class was seen
    mu_max: torch.Tensor        # [U]
    mu_rest: torch.Tensor       # [U] mean of the other present classes' means
    sums: torch.Tensor          # [K, U] per-class sums of the per-image unit means
    counts: torch.Tensor        # [K] images per class
    null_si: torch.Tensor | None = None  # [P, U]: SI under each label permutation

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
        return LayerSelectivity(*(None if t is None else t.cpu() for t in values))


class _SideStream:
    """Runs the accumulation of CUDA activations on a CUDA stream of its own.

    Why: the fused accumulation reads each tracked output once more after the forward wrote it.
    That read is memory-bound while the convolutions around it are compute-bound, so on a side
    stream it runs under the rest of the forward and the backward instead of adding to the step.
    The side stream waits for the current one before each batch (the activation must exist), and
    the current stream waits for the side one only where the states are read (``join``). Every
    tensor the side stream touches is recorded with it, so the caching allocator does not hand
    its memory to another stream before the side work is done. CPU tensors, and a stream being
    captured into a CUDA graph (which cannot fork and join lazily), run on the current stream.
    """

    def __init__(self):
        self.streams: dict = {}
        self.pending: set = set()

    def run(self, work, tensors) -> None:
        device = tensors[0].device
        if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            work()
            return
        side = self.streams.get(device)
        if side is None:
            side = self.streams[device] = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            work()
        for t in tensors:
            t.record_stream(side)
        self.pending.add(device)

    def join(self) -> None:
        for device in self.pending:
            torch.cuda.current_stream(device).wait_stream(self.streams[device])
        self.pending.clear()


class _LayerStates:
    """Per-layer (sums, counts), created on a layer's first batch (its unit count known then).

    Reading ``states`` first makes the current CUDA stream wait for the side stream's pending
    accumulation, so whoever reads them sees every batch.
    """

    def __init__(self, num_classes: int, side: _SideStream):
        self.num_classes, self.side = num_classes, side
        self._states: "OrderedDict[str, tuple]" = OrderedDict()

    @property
    def states(self) -> "OrderedDict[str, tuple]":
        self.side.join()
        return self._states

    @states.setter
    def states(self, value) -> None:
        self.side.join()
        self._states = value

    def get(self, name: str, act: torch.Tensor) -> tuple:
        """The layer's (sums, counts), made on the current stream if this is its first batch."""
        if name not in self._states:
            self._states[name] = ops.new_state(self.num_classes, act.shape[1], act.device)
        return self._states[name]

    def reset(self) -> None:
        self.states.clear()

    def reduced(self) -> "OrderedDict[str, tuple]":
        """The states summed over DDP ranks, for reading only: under DDP a copy, so that every
        rank goes on accumulating its own share; in one process the states themselves (a copy
        would cost another full read and write of them before the SI read)."""
        if not is_distributed():
            return self.states
        copy = OrderedDict((n, (s.clone(), c.clone())) for n, (s, c) in self.states.items())
        all_reduce_states(list(copy.values()))
        return copy


def null_label_table(dataset_labels, permutations: int, seed: int) -> torch.Tensor:
    """[P, N] int64: row p is the labels permuted by the p-th fixed permutation of (seed, p)."""
    labels = np.asarray(dataset_labels, dtype=np.int64)
    rows = [labels[np.random.default_rng((seed, 7919, p)).permutation(len(labels))]
            for p in range(permutations)]
    return torch.as_tensor(np.stack(rows) if rows else np.zeros((0, len(labels)), np.int64))


class SelectivityTracker:
    """Per-unit class selectivity of ``units`` of ``model`` over the batches it is shown.

    ``num_classes``: K. ``units``: see selectivity/units.py (default ``"blocks"``).
    ``dataset_labels`` + ``null_permutations``: the label-shuffled null (module doc); then every
    ``track``/``update`` needs the batch's dataset ``indices``. ``seed`` fixes the permutations.
    """

    def __init__(self, model: nn.Module, num_classes: int, units="blocks", *,
                 dataset_labels: Sequence[int] | None = None, null_permutations: int = 0,
                 seed: int = 0, eps: float = EPS):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if null_permutations < 0:
            raise ValueError(f"null_permutations must be >= 0, got {null_permutations}")
        if null_permutations and dataset_labels is None:
            raise ValueError("a null needs dataset_labels (the split's labels by dataset index)")
        self.num_classes, self.eps = num_classes, eps
        self.model = unwrap(model)
        self._side = _SideStream()
        self.states = _LayerStates(num_classes, self._side)
        self.null_states = [_LayerStates(num_classes, self._side)
                            for _ in range(null_permutations)]
        self._null_table = null_label_table(dataset_labels, null_permutations, seed) \
            if null_permutations else None
        self._labels, self._null_labels = None, None
        self._pending: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        self.hooks = UnitHooks(model, units, self._on_output, on_forward=self._pending.clear)

    @property
    def layers(self) -> "OrderedDict[str, nn.Module]":
        return self.hooks.layers

    @property
    def enabled(self) -> bool:
        return self.hooks.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.hooks.enabled = value

    # -- accumulation ----------------------------------------------------------------------------
    def _on_output(self, name: str, output: torch.Tensor):
        if self._labels is not None:  # inside track(): fused accumulation of the raw output
            self._accumulate(name, output)
        else:  # update() follows: keep only the [B, U] unit means (float32, no graph)
            self._pending[name] = unit_means(output.detach())
        return None

    def _accumulate(self, name: str, act: torch.Tensor) -> None:
        pairs = [(self.states, self._labels), *zip(self.null_states, self._null_labels or ())]
        states = [table.get(name, act) for table, _ in pairs]

        def work():
            for (sums, counts), (_, labels) in zip(states, pairs):
                ops.accumulate(act, labels, sums, counts)
        self._side.run(work, [act, *(labels for _, labels in pairs), *sum(states, ())])

    def _set_batch(self, labels: torch.Tensor, indices) -> None:
        if self._null_table is not None:
            if indices is None:
                raise ValueError("this tracker has a null: pass the batch's dataset indices "
                                 "(indices=...) with its labels")
            idx = torch.as_tensor(indices, dtype=torch.int64).cpu()
            if idx.shape != labels.shape:
                raise ValueError(f"indices must match labels, got {list(idx.shape)} and "
                                 f"{list(labels.shape)}")
            null = self._null_table[:, idx].to(labels.device, non_blocking=True)
            self._null_labels = list(null.unbind(0))
        self._labels = labels

    def begin(self, labels: torch.Tensor, indices=None) -> None:
        """Accumulate the next forward pass with these labels (``end()`` stops)."""
        self._set_batch(labels, indices)
        self._pending.clear()

    def end(self) -> None:
        self._labels, self._null_labels = None, None

    @contextlib.contextmanager
    def track(self, labels: torch.Tensor, indices=None):
        """Accumulate the forward pass(es) run inside the block with ``labels`` (``[B]`` int64)."""
        self.begin(labels, indices)
        try:
            yield self
        finally:
            self.end()

    def update(self, labels: torch.Tensor, indices=None) -> None:
        """Accumulate the forward pass that just ran (outside ``track``) with ``labels``."""
        if not self._pending:
            raise RuntimeError("update(): no tracked layer ran since the last update; run the "
                               "model's forward first (with the tracker enabled)")
        self._set_batch(labels, indices)
        try:
            for name, means in self._pending.items():
                self._accumulate(name, means)
        finally:
            self._pending.clear()
            self.end()

    # -- results ---------------------------------------------------------------------------------
    def compute(self) -> "OrderedDict[str, LayerSelectivity]":
        """Every layer's selectivity over all batches since the last ``reset`` (summed over DDP
        ranks; every rank must call it). Tensors stay on the states' device (no copy to the host:
        SI can be computed at every step on a GPU); ``sums``/``counts`` are the states themselves
        in one process — clone them to keep them past the next update."""
        states = self.states.reduced()
        nulls = [n.reduced() for n in self.null_states]
        out = OrderedDict()
        for name, (s, c) in states.items():
            r = ops.selectivity_index(s, c, self.eps)
            null = torch.stack([ops.selectivity_index(*n[name], self.eps).si for n in nulls]) \
                if nulls else None
            out[name] = LayerSelectivity(r.si, r.pref_class, r.mu_max, r.mu_rest, s, c, null)
        return out

    def synchronize(self) -> None:
        """Make the current CUDA stream wait for the accumulation queued on the tracker's side
        stream. ``compute()``, ``state_dict()`` and reading the states do it themselves; call it
        to time a loop with CUDA events, or before reading the states from another stream."""
        self._side.join()

    def reset(self) -> None:
        self.states.reset()
        for n in self.null_states:
            n.reset()
        self._pending.clear()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        self.hooks.remove()

    def state_dict(self) -> dict:
        def cpu(states):
            return {n: (s.cpu(), c.cpu()) for n, (s, c) in states.states.items()}
        return {"states": cpu(self.states), "null_states": [cpu(n) for n in self.null_states]}

    def load_state_dict(self, state: dict) -> None:
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")

        def load(target, saved):
            target.states = OrderedDict((n, (s.to(device), c.to(device)))
                                        for n, (s, c) in saved.items())
        load(self.states, state.get("states", {}))
        for target, saved in zip(self.null_states, state.get("null_states", [])):
            load(target, saved)


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
