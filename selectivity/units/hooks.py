"""The one way to see units: ``UnitHooks`` on the resolved layers (outputs, or per-image unit means),
``count_units`` over one forward pass, and ``HooksOwner`` for the consumers that hold hooks.

On top of ``resolve`` (which layers), ``layouts`` (how an output is read) and ``fused_blocks`` (the
residual blocks that compute their own means in the means mode).
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn

from selectivity.errors import UnitsError
from selectivity.units.fused_blocks import _FusedBlock
from selectivity.units.layouts import _layouts, as_units, from_units, unit_means
from selectivity.units.resolve import Units, resolve_units, unwrap


class UnitHooks:
    """The resolved layers, seen while enabled: ``fn(layer, output)`` or ``means_fn(layer, means)``.

    ``output`` is ``[B, U]`` or ``[B, U, H, W]`` (``as_units``: a view of a token or channels-last
    output; ``layouts`` and ``tokens`` say how each layer was read).
    ``fn`` may return a tensor to replace the layer's output (ablation masks do), or None.
    ``means_fn`` (instead of ``fn``) receives the per-image unit means ``[B, U]`` (``unit_means`` of
    the output: float32, float64 for float64 outputs, taken from the output as rounded under AMP),
    carrying the autograd graph when grad is on (a consumer that keeps no graph detaches them); its
    return value is ignored. Residual blocks are then run fused (see the package doc) unless
    ``fused=False`` or the environment has ``SELECTIVITY_NO_FUSED=1``.

    A module called k times in one forward pass reports layers ``name``, ``name#1``, … ``name#k-1``
    (the call counter restarts with each forward of the model; ``on_forward()``, when given, is
    called then too). Disabled hooks cost one attribute test. Use ``with UnitHooks(...) as h:`` or
    ``remove()``; ``enabled`` switches them, ``active()`` is a context manager that does.
    """

    def __init__(self, model: nn.Module, units="blocks",
                 fn: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
                 on_forward: Callable[[], None] | None = None, enabled: bool = True, *,
                 means_fn: Callable[[str, torch.Tensor], None] | None = None,
                 fused: bool | None = None, rectify: bool = False):
        if fn is not None and means_fn is not None:
            raise UnitsError("UnitHooks: give fn (the layer outputs) or means_fn (the per-image unit "
                             "means), not both; use two UnitHooks for both")
        self.layers = resolve_units(model, units)
        self._read = {n: (*read, f"layer {n} ({type(self.layers[n]).__name__})")
                      for n, read in _layouts(model, self.layers, units).items()}
        self.layouts = {n: read[0] for n, read in self._read.items()}
        self.tokens = units.tokens if isinstance(units, Units) else "mean"
        self.fn, self.means_fn, self.on_forward, self.enabled = fn, means_fn, on_forward, enabled
        if fused is None:
            fused = os.environ.get("SELECTIVITY_NO_FUSED") != "1"
        self.fused = means_fn is not None and fused
        # negative="relu" of the consumers: the means of the activation's positive part (a fused
        # block's output is after its ReLU already).
        self.rectify = rectify
        self._calls: dict[str, int] = {}
        self._delivered: set[str] = set()  # layers whose fused forward already called means_fn
        root = unwrap(model)
        self.handles = [root.register_forward_pre_hook(self._start)]
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
            if self.fused and _FusedBlock.supports(module):
                self.handles.append(_FusedBlock.attach(module, self, name))

    def _start(self, module, args):
        self._calls.clear()
        self._delivered.clear()
        if self.enabled and self.on_forward is not None:
            self.on_forward()

    def _layer_name(self, name: str) -> str:
        k = self._calls.get(name, 0)
        self._calls[name] = k + 1
        return name if k == 0 else f"{name}#{k}"

    def _deliver(self, name: str, means: torch.Tensor) -> None:
        """From a fused block's forward: the means of this call, which its hook then skips."""
        self._delivered.add(name)
        self.means_fn(self._layer_name(name), means)

    def _hook(self, name):
        def hook(module, args, output):
            if not self.enabled:
                return None
            layout, count, where = self._read[name]
            if self.means_fn is not None:
                if name in self._delivered:
                    self._delivered.discard(name)
                    return None
                with torch.autocast(output.device.type, enabled=False):
                    view = as_units(output, layout, self.tokens, where, count)
                    means = unit_means(view.clamp_min(0) if self.rectify else view)
                self.means_fn(self._layer_name(name), means)
                return None
            if self.fn is None:
                return None
            units = as_units(output, layout, self.tokens, where, count) \
                if isinstance(output, torch.Tensor) else output  # fn judges anything else
            new = self.fn(self._layer_name(name), units)
            return new if new is None or units is output else \
                from_units(new, output, layout, self.tokens, where)
        # The fused forward may run with this hook on the block: it does not need the output.
        hook._selectivity_means = self.means_fn is not None
        return hook

    @contextlib.contextmanager
    def active(self):
        was, self.enabled = self.enabled, True
        try:
            yield self
        finally:
            self.enabled = was

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()



@torch.no_grad()
def count_units(model: nn.Module, example: torch.Tensor, units="blocks") -> "OrderedDict[str, int]":
    """``{layer: number of units}`` from one forward pass of ``example`` (eval mode, no grad)."""
    seen: "OrderedDict[str, int]" = OrderedDict()

    def fn(name, out):
        seen[name] = int(out.shape[1])

    was = model.training
    model.eval()
    try:
        with UnitHooks(model, units, fn):
            model(example)
    finally:
        model.train(was)
    return seen


class HooksOwner:
    """``layers``, ``enabled`` and ``remove()`` of a consumer that sees its units through
    ``self.hooks`` (a ``UnitHooks``): the tracker and the regularizer. ``_switched(enabled)`` is
    called after ``enabled`` is set."""
    hooks: UnitHooks

    @property
    def layers(self) -> "OrderedDict[str, nn.Module]":
        return self.hooks.layers

    @property
    def enabled(self) -> bool:
        return self.hooks.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.hooks.enabled = value
        self._switched(value)

    def _switched(self, enabled: bool) -> None:
        pass

    def remove(self) -> None:
        """Detach the hooks from the model."""
        self.hooks.remove()
