"""Which units, and the one way to see them: resolve layers on any ``nn.Module`` and hook them.

A *layer* is a module whose forward output ``[B, U, H, W]`` (any memory format) or ``[B, U]``
holds U units; a conv unit's activation for an image is the spatial mean of its channel
(``unit_means``). Everything in this package that looks at units — the tracker, the regularizer,
unit ranking, ablation masks, CKA, orientation — resolves them with ``resolve_units`` and sees them
through ``UnitHooks``; nothing else registers forward hooks.

``units`` may be

- a preset: ``"blocks"`` (every residual block's output, after its final ReLU: the blocks of
  torchvision and timm ResNets and of this package's CIFAR ResNets, recognised by their class
  names ``BasicBlock`` / ``Bottleneck``), ``"relu"`` (every ``nn.ReLU``), ``"bn"`` (every
  BatchNorm; not non-negative, so its SI leaves [0, 1]);
- a module name (``"layer3.1"``) or a glob over the dotted names, where ``*`` stays inside one
  name segment and ``**`` crosses segments (``"layer3.*"``: the blocks of layer3;
  ``"layer*.*.relu"``; ``"**.bn2"``);
- a list of any of these (the union, in the model's module order);
- a predicate ``fn(name, module) -> bool``;
- a ``{name: module}`` mapping, taken as it is.

Resolving to nothing, or naming a module that does not exist, is a ``UnitsError`` whose one line
says what was asked and what the model has.
"""
from __future__ import annotations

import contextlib
import difflib
import re
from collections import OrderedDict
from typing import Callable, Mapping

import torch
import torch.nn as nn

from selectivity.errors import UnitsError

PRESETS = ("blocks", "relu", "bn")
BLOCK_CLASSES = ("BasicBlock", "Bottleneck")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ in BLOCK_CLASSES


_PRESET_TESTS = {
    "blocks": _is_block,
    "relu": lambda m: isinstance(m, nn.ReLU),
    "bn": lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm),
}


def _glob_regex(pattern: str) -> re.Pattern:
    out = []
    for part in re.split(r"(\*\*|\*|\?)", pattern):
        out.append({"**": ".*", "*": r"[^.]*", "?": r"[^.]"}.get(part, re.escape(part)))
    return re.compile("".join(out) + r"\Z")


def _describe(root: nn.Module, names: list[str]) -> str:
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    blocks = sum(_is_block(m) for _, m in root.named_modules())
    return (f"{type(root).__name__} has modules {shown or 'none'}; presets: "
            f"{', '.join(PRESETS)} ({blocks} residual blocks)")


def _match_one(root: nn.Module, spec: str, modules: "OrderedDict[str, nn.Module]") -> set:
    if spec in _PRESET_TESTS:
        return {n for n, m in modules.items() if _PRESET_TESTS[spec](m)}
    if any(c in spec for c in "*?"):
        rx = _glob_regex(spec)
        return {n for n in modules if rx.match(n)}
    if spec not in modules:
        near = difflib.get_close_matches(spec, list(modules), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UnitsError(f"units: no module named {spec!r}{hint}; "
                         f"{_describe(root, list(modules))}")
    return {spec}


def resolve_units(model: nn.Module, units="blocks") -> "OrderedDict[str, nn.Module]":
    """``{name: module}`` of the layers ``units`` names (see the module doc), in module order."""
    root = unwrap(model)
    if isinstance(units, Mapping):
        if not units:
            raise UnitsError("units: the {name: module} mapping is empty")
        return OrderedDict(units)
    modules = OrderedDict((n, m) for n, m in root.named_modules() if n)
    if callable(units):
        chosen = {n for n, m in modules.items() if units(n, m)}
    elif isinstance(units, str):
        chosen = _match_one(root, units, modules)
    elif isinstance(units, (list, tuple)) and units and all(isinstance(u, str) for u in units):
        chosen = set().union(*(_match_one(root, u, modules) for u in units))
    else:
        raise UnitsError(f"units must be a preset ({', '.join(PRESETS)}), a module name or glob, "
                         f"a list of them, a predicate or a {{name: module}} mapping; got "
                         f"{units!r}")
    if not chosen:
        raise UnitsError(f"units {units!r} matched no module; {_describe(root, list(modules))}")
    return OrderedDict((n, m) for n, m in modules.items() if n in chosen)


def unit_means(act: torch.Tensor) -> torch.Tensor:
    """[B, U, H, W] (any layout) or [B, U] → per-image unit activations [B, U], at least float32.

    The spatial mean is taken in the accumulation dtype, with no full-size float32 copy of a
    bf16/fp16 map. Differentiable.
    """
    dtype = torch.promote_types(act.dtype, torch.float32)
    if act.dim() == 4:
        return act.mean((2, 3), dtype=dtype)
    if act.dim() == 2:
        return act.to(dtype)
    raise UnitsError(f"a unit activation must be [B, U, H, W] or [B, U], got shape "
                     f"{list(act.shape)}")


class UnitHooks:
    """Forward hooks on the resolved layers: ``fn(layer, output)`` while enabled.

    ``fn`` may return a tensor to replace the layer's output (ablation masks do), or None. A module
    called k times in one forward pass reports layers ``name``, ``name#1``, … ``name#k-1`` (the
    call counter restarts with each forward of the model; ``on_forward()``, when given, is called
    then too). Disabled hooks cost one attribute test. Use ``with UnitHooks(...) as h:`` or
    ``remove()``; ``enabled`` switches them, ``active()`` is a context manager that does.
    """

    def __init__(self, model: nn.Module, units="blocks",
                 fn: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
                 on_forward: Callable[[], None] | None = None, enabled: bool = True):
        self.layers = resolve_units(model, units)
        self.fn, self.on_forward, self.enabled = fn, on_forward, enabled
        self._calls: dict[str, int] = {}
        root = unwrap(model)
        self.handles = [root.register_forward_pre_hook(self._start)]
        for name, module in self.layers.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))

    def _start(self, module, args):
        self._calls.clear()
        if self.enabled and self.on_forward is not None:
            self.on_forward()

    def _hook(self, name):
        def hook(module, args, output):
            if not self.enabled or self.fn is None:
                return None
            k = self._calls.get(name, 0)
            self._calls[name] = k + 1
            return self.fn(name if k == 0 else f"{name}#{k}", output)
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
