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
- a list of any of these (the union, in the model's module order; ``order="given"``: in the
  order listed, as the analyses take their layers);
- a predicate ``fn(name, module) -> bool``;
- a ``{name: module}`` mapping, taken as it is.

Resolving to nothing, or naming a module that does not exist, is a ``UnitsError`` whose one line
says what was asked and what the model has.

Two ways to see a layer: ``UnitHooks(fn=...)`` hands ``fn`` each layer's output (it may replace it);
``UnitHooks(means_fn=...)`` hands ``means_fn`` only the per-image unit means ``[B, U]``. In the means
mode, the residual blocks whose forward is known here (torchvision ``BasicBlock`` / ``Bottleneck``,
this package's CIFAR ``BasicBlock``) compute them inside their own epilogue (``epilogue.add_relu_means``:
the add of the shortcut, the final ReLU and the means in one pass) instead of a hook reading the
output again; every other layer, and a block whose stock forward is needed (see ``_FusedBlock``), is
seen by a forward hook taking ``unit_means`` of its output. The numbers are the same either way.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import re
import sys
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


def _match_one(root: nn.Module, spec: str, modules: "OrderedDict[str, nn.Module]",
               names_first: bool = False) -> list:
    """The names ``spec`` selects, in module order."""
    if names_first and spec in modules:
        return [spec]
    if spec in _PRESET_TESTS:
        return [n for n, m in modules.items() if _PRESET_TESTS[spec](m)]
    if any(c in spec for c in "*?"):
        rx = _glob_regex(spec)
        return [n for n in modules if rx.match(n)]
    if spec not in modules:
        near = difflib.get_close_matches(spec, list(modules), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise UnitsError(f"units: no module named {spec!r}{hint}; "
                         f"{_describe(root, list(modules))}")
    return [spec]


def _in_given_order(specs, matches: list) -> list:
    """The names of every spec in turn; a layer two specs select is an error (it would be two
    rows of a CKA matrix)."""
    out: list = []
    for found in matches:
        for name in found:
            if name in out:
                raise UnitsError(f"layer {name!r} is named twice in {list(specs)}")
            out.append(name)
    return out


def resolve_units(model: nn.Module, units="blocks", *, order: str = "module",
                  names_first: bool = False) -> "OrderedDict[str, nn.Module]":
    """``{name: module}`` of the layers ``units`` names (see the module doc).

    ``order="module"``: the model's module order (a list is a set: its union).
    ``order="given"``: a list's specs in the order given, each glob or preset expanding in
    module order; a layer selected twice is an error (the analyses' layer lists, whose order
    is their figures' and matrices'). ``names_first``: a spec that is a module's own name is that
    module, before a preset of the same name (a ResNet's stem ``relu`` rather than every ReLU).
    """
    if order not in ("module", "given"):
        raise ValueError(f"order must be 'module' or 'given', got {order!r}")
    root = unwrap(model)
    if isinstance(units, Mapping):
        if not units:
            raise UnitsError("units: the {name: module} mapping is empty")
        return OrderedDict(units)
    modules = OrderedDict((n, m) for n, m in root.named_modules() if n)
    if callable(units):
        chosen = [n for n, m in modules.items() if units(n, m)]
    elif isinstance(units, str):
        chosen = _match_one(root, units, modules, names_first)
    elif isinstance(units, (list, tuple)) and units and all(isinstance(u, str) for u in units):
        matches = [_match_one(root, u, modules, names_first) for u in units]
        if order == "given":
            chosen = _in_given_order(units, matches)
        else:
            union = set().union(*matches)
            chosen = [n for n in modules if n in union]
    else:
        raise UnitsError(f"units must be a preset ({', '.join(PRESETS)}), a module name or glob, "
                         f"a list of them, a predicate or a {{name: module}} mapping; got "
                         f"{units!r}")
    if not chosen:
        raise UnitsError(f"units {units!r} matched no module; {_describe(root, list(modules))}")
    return OrderedDict((n, modules[n]) for n in chosen)


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
    """The resolved layers, seen while enabled: ``fn(layer, output)`` or ``means_fn(layer, means)``.

    ``fn`` may return a tensor to replace the layer's output (ablation masks do), or None.
    ``means_fn`` (instead of ``fn``) receives the per-image unit means ``[B, U]`` (``unit_means`` of
    the output: float32, float64 for float64 outputs, taken from the output as rounded under AMP),
    carrying the autograd graph when grad is on (a consumer that keeps no graph detaches them); its
    return value is ignored. Residual blocks are then run fused (see the module doc) unless
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
                 fused: bool | None = None):
        if fn is not None and means_fn is not None:
            raise UnitsError("UnitHooks: give fn (the layer outputs) or means_fn (the per-image unit "
                             "means), not both; use two UnitHooks for both")
        self.layers = resolve_units(model, units)
        self.fn, self.means_fn, self.on_forward, self.enabled = fn, means_fn, on_forward, enabled
        if fused is None:
            fused = os.environ.get("SELECTIVITY_NO_FUSED") != "1"
        self.fused = means_fn is not None and fused
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
            if self.means_fn is not None:
                if name in self._delivered:
                    self._delivered.discard(name)
                    return None
                with torch.autocast(output.device.type, enabled=False):
                    means = unit_means(output)
                self.means_fn(self._layer_name(name), means)
                return None
            if self.fn is None:
                return None
            return self.fn(self._layer_name(name), output)
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


# ----- fused residual blocks ----------------------------------------------------------------------


def _torchvision_basic(b, x):
    out = b.relu(b.bn1(b.conv1(x)))
    out = b.bn2(b.conv2(out))
    return out, (x if b.downsample is None else b.downsample(x))


def _torchvision_bottleneck(b, x):
    out = b.relu(b.bn1(b.conv1(x)))
    out = b.relu(b.bn2(b.conv2(out)))
    out = b.bn3(b.conv3(out))
    return out, (x if b.downsample is None else b.downsample(x))


def _cifar_basic(b, x):
    out = b.relu1(b.bn1(b.conv1(x)))
    out = b.bn2(b.conv2(out))
    return out, b.shortcut(x)


def _known_blocks() -> dict:
    """{block class: (its forward up to the last BN and the shortcut → (out, identity), the name of
    the ReLU module its stock forward calls last)} for the block classes whose forward is known."""
    # Looked up among the loaded modules, not imported: the core imports nothing above it, and a
    # block's class is loaded whenever one of its instances exists.
    known = {}
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        known[tv.BasicBlock] = (_torchvision_basic, "relu")
        known[tv.Bottleneck] = (_torchvision_bottleneck, "relu")
    cifar = sys.modules.get("selectivity.train.models")
    if cifar is not None:
        known[cifar.BasicBlock] = (_cifar_basic, "relu2")
    return known


class _FusedBlock:
    """A residual block whose forward is replaced (on the instance, while any means-mode UnitHooks
    captures it) by: its own computation up to the last BN and the shortcut, then
    ``epilogue.add_relu_means_`` instead of ``out + identity → ReLU``; the means go to every enabled
    consumer. Each call falls back to the stock forward (the consumers' hooks then take the means
    from the output) when

    - no consumer is enabled (an untracked step runs exactly the stock forward);
    - the ReLU module the stock forward calls last has hooks (the fused forward would not call it;
      torchvision's Bottleneck calls its one ``relu`` three times, so a ``relu``-preset UnitHooks
      sees all three calls only through the stock forward);
    - the block has a forward hook of anyone other than a means consumer (e.g. an ablation mask
      that replaces the output: the means must describe the output it leaves).
    """

    @staticmethod
    def of(block: nn.Module) -> "_FusedBlock | None":
        """The fused forward installed on ``block``, if any (it is the instance's ``forward``)."""
        owner = getattr(vars(block).get("forward"), "__self__", None)
        return owner if isinstance(owner, _FusedBlock) else None

    @staticmethod
    def supports(block: nn.Module) -> bool:
        # Not a block whose forward someone else replaced on the instance.
        installed = "forward" in vars(block)
        return _FusedBlock.of(block) is not None or (not installed and type(block) in _known_blocks())

    @classmethod
    def attach(cls, block: nn.Module, hooks: UnitHooks, name: str):
        fused = cls.of(block) or cls(block)
        fused.consumers.append((hooks, name))
        return _Detach(fused, (hooks, name))

    def __init__(self, block: nn.Module):
        self.body, relu_name = _known_blocks()[type(block)]
        self.final_relu = getattr(block, relu_name)
        self.block = block
        self.consumers: list[tuple[UnitHooks, str]] = []
        block.forward = self.forward  # an instance attribute shadows the class's forward

    def _stock_needed(self, block: nn.Module) -> bool:
        relu = self.final_relu
        if relu._forward_hooks or relu._forward_pre_hooks:
            return True
        return not all(getattr(h, "_selectivity_means", False) for h in block._forward_hooks.values())

    def forward(self, x):
        block = self.block
        live = [(h, n) for h, n in self.consumers if h.enabled]
        if not live or self._stock_needed(block):
            return type(block).forward(block, x)
        from selectivity.epilogue import add_relu_means_  # here: epilogue imports this module
        # In place into the last BN's output, which nothing reads afterwards (torchvision's own
        # forward overwrites it too).
        y, means = add_relu_means_(*self.body(block, x))
        for hooks, name in live:
            hooks._deliver(name, means)
        return y

    def detach(self, consumer) -> None:
        self.consumers.remove(consumer)
        if not self.consumers:
            del self.block.forward  # the class's forward again


class _Detach:
    """A handle like a hook's: ``remove()`` takes one consumer off a fused block."""

    def __init__(self, fused: _FusedBlock, consumer):
        self.fused, self.consumer = fused, consumer

    def remove(self) -> None:
        if self.fused is not None:
            self.fused.detach(self.consumer)
            self.fused = None


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
