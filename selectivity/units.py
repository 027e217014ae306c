"""Which units, and the one way to see them: resolve layers on any ``nn.Module`` and hook them.

A *layer* is a module whose forward output holds U units; a unit's activation for an image is the
mean of its channel over the other dims (``unit_means``). Where the units are is decided by the
module, never by the shape (``[B, T, U]`` and ``[B, U, L]``, ``[B, H, W, C]`` and ``[B, C, H, W]``
look alike): ``layout_of`` gives ``units_first`` (units on dim 1: ``[B, U]``, ``[B, U, L]``,
``[B, U, H, W]`` in any memory format — convolutions, BatchNorm, pooling, CNN blocks) or
``units_last`` (units on the last dim: ``[B, U]``, ``[B, T, U]`` tokens, ``[B, H, W, U]`` —
Linear, LayerNorm, transformer and Swin blocks); an activation, dropout or identity takes the
layout of the layers beside it (in a Sequential: the layer before it). A module it cannot decide
keeps this package's original contract (``[B, U]`` or ``[B, U, H, W]``); any other shape from it is
a ``UnitsError`` until ``Units(..., layout=)`` says where its units are. Tokens are averaged, or
only the class token is taken (``Units(..., tokens="cls")``); the choice is ``UnitHooks.tokens``.
Everything in this package that looks at units — the tracker, the regularizer,
unit ranking, ablation masks, CKA, orientation — resolves them with ``resolve_units`` and sees them
through ``UnitHooks``; nothing else registers forward hooks.

``units`` may be

- a preset: ``"blocks"`` (every residual block's output, after its final ReLU: the blocks of
  torchvision and timm ResNets and of this package's CIFAR ResNets, recognised by their class
  names ``BasicBlock`` / ``Bottleneck``), ``"relu"`` (every ``nn.ReLU``), ``"bn"`` (every
  BatchNorm; not non-negative, so its SI leaves [0, 1]), ``"act"`` (every activation module:
  ReLU, GELU, SiLU, Hardswish, ... — MobileNet, EfficientNet), ``"mlp"`` (the hidden activation
  of every transformer MLP, after its nonlinearity: timm ``blocks.*.mlp.act``, torchvision ViT
  ``encoder.layers.*.mlp.1``), ``"tokens"`` (every transformer block's output: timm and
  torchvision ViT and Swin blocks);
- a module name (``"layer3.1"``) or a glob over the dotted names, where ``*`` stays inside one
  name segment and ``**`` crosses segments (``"layer3.*"``: the blocks of layer3;
  ``"layer*.*.relu"``; ``"**.bn2"``);
- a list of any of these (the union, in the model's module order; ``order="given"``: in the
  order listed, as the analyses take their layers);
- a predicate ``fn(name, module) -> bool``;
- a ``{name: module}`` mapping, taken as it is;
- ``Units(any of these, layout=..., tokens="mean"|"cls")``: the same layers, with the layout of
  modules ``layout_of`` cannot decide (one value, or ``{name or glob: layout}``) and the token choice.

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
import dataclasses
import difflib
import os
import re
import sys
from collections import OrderedDict
from typing import Callable, Mapping

import torch
import torch.nn as nn

from selectivity.errors import UnitsError

PRESETS = ("blocks", "relu", "bn", "act", "mlp", "tokens")
BLOCK_CLASSES = ("BasicBlock", "Bottleneck")
LAYOUTS = ("units_first", "units_last")
TOKENS = ("mean", "cls")
# Activation modules by class name (timm has its own GELU, Swish, HardSwish, ... classes).
ACTIVATION_CLASSES = {
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "CELU", "SELU", "GELU", "GELUTanh", "QuickGELU",
    "SiLU", "Swish", "Mish", "Hardswish", "HardSwish", "Hardsigmoid", "HardSigmoid", "Sigmoid",
    "Tanh", "Softplus", "HardMish", "StarReLU"}
# Modules that keep their input's layout; an activation is one of them.
PASS_THROUGH_CLASSES = ACTIVATION_CLASSES | {
    "Dropout", "Dropout1d", "Dropout2d", "Identity", "DropPath", "StochasticDepth", "LayerScale"}
MLP_CLASSES = ("Mlp", "GluMlp", "SwiGLU", "MLP", "MLPBlock")  # timm; torchvision ops.MLP, ViT
# Transformer blocks (the ``tokens`` preset): timm ViT ``Block`` (qualified: the name is common),
# torchvision ViT ``EncoderBlock``, Swin blocks of both (their outputs are [B, H, W, C]).
TRANSFORMER_BLOCKS = ("timm.models.vision_transformer.Block", "EncoderBlock",
                      "SwinTransformerBlock", "SwinTransformerBlockV2")
# Blocks whose layout their class decides (containers otherwise are undecided, but a Sequential).
BLOCK_LAYOUTS = {
    **{name: "units_first" for name in (
        *BLOCK_CLASSES, "InvertedResidual", "MBConv", "FusedMBConv", "ConvNeXtBlock", "CNBlock",
        "ConvNeXtStage", "SqueezeExcitation", "SqueezeExcite", "LayerNorm2d")},
    **{name: "units_last" for name in (
        *TRANSFORMER_BLOCKS, "SwinTransformerStage", "PatchMerging", "PatchMergingV2")},
}


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``)."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _is_block(module: nn.Module) -> bool:
    return type(module).__name__ in BLOCK_CLASSES


def _class_names(module: nn.Module) -> tuple[str, str]:
    cls = type(module)
    return cls.__name__, f"{cls.__module__}.{cls.__name__}"


def _is_activation(module: nn.Module) -> bool:
    return type(module).__name__ in ACTIVATION_CLASSES


_PRESET_TESTS = {
    "blocks": _is_block,
    "relu": lambda m: isinstance(m, nn.ReLU),
    "bn": lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm),
    "act": _is_activation,
    "tokens": lambda m: any(n in TRANSFORMER_BLOCKS for n in _class_names(m)),
}
# Presets that look at a module's parent too: ``test(parent, module)``.
_PRESET_PARENT_TESTS = {
    "mlp": lambda parent, m: _is_activation(m) and type(parent).__name__ in MLP_CLASSES,
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
    if spec in _PRESET_PARENT_TESTS:
        test = _PRESET_PARENT_TESTS[spec]
        return [n for n, m in modules.items() if test(modules.get(n.rpartition(".")[0], root), m)]
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
    if isinstance(units, Units):
        units = units.what
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


@dataclasses.dataclass(frozen=True)
class Units:
    """Layers (any ``units`` spec) with where their units are: ``layout`` for modules ``layout_of``
    cannot decide — one of ``LAYOUTS`` for all of them, or ``{name or glob: layout}`` — and, for
    token outputs ``[B, T, U]``, ``tokens``: ``"mean"`` over the tokens or ``"cls"`` (token 0)."""
    what: object = "blocks"
    layout: object = None
    tokens: str = "mean"

    def __post_init__(self):
        if self.tokens not in TOKENS:
            raise UnitsError(f"tokens must be one of {', '.join(TOKENS)}, got {self.tokens!r}")
        values = self.layout.values() if isinstance(self.layout, Mapping) else [self.layout]
        for v in values:
            if v is not None and v not in LAYOUTS:
                raise UnitsError(f"layout must be one of {', '.join(LAYOUTS)}, got {v!r}")


def _own_layout(module: nn.Module) -> tuple[str | None, int | None]:
    """(layout, units) that the module's own type decides; (None, None) if it does not."""
    for name in _class_names(module):
        if name in BLOCK_LAYOUTS:
            return BLOCK_LAYOUTS[name], None
    if isinstance(module, nn.modules.conv._ConvNd):
        return "units_first", module.out_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "units_first", module.num_features
    if isinstance(module, nn.GroupNorm):
        return "units_first", module.num_channels
    if isinstance(module, (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
                           nn.modules.pooling._AdaptiveAvgPoolNd,
                           nn.modules.pooling._AdaptiveMaxPoolNd)):
        return "units_first", None
    if isinstance(module, nn.Linear):
        return "units_last", module.out_features
    if isinstance(module, nn.LayerNorm):
        return "units_last", module.normalized_shape[-1]
    if isinstance(module, nn.Sequential):
        return _sequence_layout(list(module), len(module)), None
    return None, None


def _sequence_layout(siblings: list, i: int) -> str | None:
    """The layout of the last layer before ``siblings[i]`` that decides one."""
    for m in reversed(siblings[:i]):
        if type(m).__name__ not in PASS_THROUGH_CLASSES:
            return _own_layout(m)[0]
    return None


def layout_of(model: nn.Module, name: str) -> str | None:
    """``units_first``, ``units_last`` or None (undecided) for the module ``name`` of ``model``
    (module doc): by its type; an activation, dropout or identity by its parent — the layer
    before it in a Sequential, else the layout all its parent's other layers agree on."""
    root = unwrap(model)
    module = root.get_submodule(name)
    if type(module).__name__ not in PASS_THROUGH_CLASSES:
        return _own_layout(module)[0]
    parent = root.get_submodule(name.rpartition(".")[0])
    siblings = list(parent.children())
    i = next(k for k, m in enumerate(siblings) if m is module)
    if isinstance(parent, nn.Sequential):
        return _sequence_layout(siblings, i)
    found = {_own_layout(m)[0] for m in siblings if type(m).__name__ not in PASS_THROUGH_CLASSES}
    found.discard(None)
    return found.pop() if len(found) == 1 else None


def _layouts(model: nn.Module, layers: Mapping, units) -> dict:
    """{layer: (layout or None, expected unit count or None)}; ``Units.layout`` overrides."""
    override = units.layout if isinstance(units, Units) else None
    root = unwrap(model)
    names = {id(m): n for n, m in root.named_modules()}
    out = {}
    for name, module in layers.items():
        own, count = _own_layout(module)
        path = names.get(id(module))
        layout = layout_of(root, path) if path else own
        if isinstance(override, Mapping):
            for pattern, value in override.items():
                if _glob_regex(pattern).match(name):
                    layout, count = value, None
        elif override is not None:
            layout, count = override, None
        out[name] = (layout, count if layout == own else None)
    return out


def _shape_error(where: str, act: torch.Tensor, layout: str | None, why: str) -> UnitsError:
    return UnitsError(
        f"{where}: output shape {list(act.shape)} {why} (layout {layout or 'undecided'}); "
        f"choices: Units(..., layout='units_first') for [B, U], [B, U, L], [B, U, H, W] or "
        f"layout='units_last' for [B, U], [B, T, U], [B, H, W, U]")


def as_units(act: torch.Tensor, layout: str | None = None, tokens: str = "mean",
             where: str = "a layer", count: int | None = None) -> torch.Tensor:
    """``act`` as ``[B, U]`` or a ``[B, U, H, W]`` view (no copy: a permuted ``[B, T, U]`` or
    ``[B, H, W, U]`` is a channels-last view), whose spatial mean is the unit means; ``layout``
    None: ``act`` must already be one of these (the original contract). ``count``: the number of
    units the module must have (checked)."""
    d = act.dim()
    if layout is None and d in (2, 4):
        out = act
    elif layout == "units_first" and d in (2, 3, 4):
        out = act.unsqueeze(-1) if d == 3 else act
    elif layout == "units_last" and d in (2, 3, 4):
        if d == 3:
            out = act[:, 0] if tokens == "cls" else act.transpose(1, 2).unsqueeze(-1)
        else:
            out = act.permute(0, 3, 1, 2) if d == 4 else act
    else:
        raise _shape_error(where, act, layout, "has no unit dim this package can decide"
                           if layout is None else "is not supported")
    if count is not None and out.shape[1] != count:
        raise _shape_error(where, act, layout, f"does not hold the module's {count} units")
    return out


def from_units(new: torch.Tensor, act: torch.Tensor, layout: str | None, tokens: str = "mean",
               where: str = "a layer") -> torch.Tensor:
    """The inverse of ``as_units`` (where it made a view) for a replacement output (ablation
    masks): back in ``act``'s layout. A class token alone cannot be replaced."""
    if layout == "units_first" and act.dim() == 3:
        return new.squeeze(-1)
    if layout == "units_last" and act.dim() == 4:
        return new.permute(0, 2, 3, 1)
    if layout == "units_last" and act.dim() == 3 and tokens == "mean":
        return new.squeeze(-1).transpose(1, 2)
    raise UnitsError(f"{where}: a replacement output for layout {layout} with tokens={tokens!r} "
                     f"is not supported; use tokens='mean'")


def unit_means(act: torch.Tensor, layout: str | None = None, tokens: str = "mean") -> torch.Tensor:
    """Per-image unit activations [B, U], at least float32, of an output in ``layout`` (see
    ``as_units``; None: [B, U, H, W] in any memory format or [B, U]).

    The spatial (token) mean is taken in the accumulation dtype, with no full-size float32 copy
    of a bf16/fp16 map. Differentiable.
    """
    act = as_units(act, layout, tokens, "a unit activation")
    dtype = torch.promote_types(act.dtype, torch.float32)
    return act.mean((2, 3), dtype=dtype) if act.dim() == 4 else act.to(dtype)


# What SI means for responses that go negative: SI = (μ_max − μ_-max)/(μ_max + μ_-max) assumes
# non-negative ones (the papers measure after a ReLU); with negative class means it leaves [0, 1]
# and means nothing. "error" refuses them, "relu" measures the positive part of the activation,
# "shift" subtracts each unit's lowest class mean from all its class means before the formula (SI
# in [0, 1], but not the papers' SI: it measures the spread above the least-driven class).
NEGATIVE = ("error", "relu", "shift")


def check_negative(negative: str) -> str:
    if negative not in NEGATIVE:
        raise UnitsError(f"negative must be one of {', '.join(NEGATIVE)}, got {negative!r}")
    return negative


def check_responses(layer: str, values: torch.Tensor, negative: str, what: str = "per-image") -> None:
    """With ``negative="error"``: a one-line ``UnitsError`` when any of ``values`` ([..., U]: the
    layer's per-image unit means, or its class means) is negative, naming the layer, the fraction
    of its units affected and the choices. One host sync: called on a first batch and at compute()."""
    if negative != "error":
        return
    values = values.detach()
    bad = (values < 0).reshape(-1, values.shape[-1]).any(0)
    if bool(bad.any()):
        raise UnitsError(
            f"layer {layer}: {float(bad.double().mean()):.1%} of its {bad.numel()} units have "
            f"negative {what} responses (lowest {float(values.min()):.3g}); SI assumes non-negative "
            f"ones (the papers measure after a ReLU): choose negative='relu' (the positive part, as "
            f"if a ReLU followed the module), negative='shift' (each unit's lowest class mean "
            f"subtracted at compute(): SI in [0, 1], not the papers' SI) - the trainer's "
            f"track_negative: relu | shift - or units after a non-negative activation")


class UnitHooks:
    """The resolved layers, seen while enabled: ``fn(layer, output)`` or ``means_fn(layer, means)``.

    ``output`` is ``[B, U]`` or ``[B, U, H, W]`` (``as_units``: a view of a token or channels-last
    output; ``layouts`` and ``tokens`` say how each layer was read).
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
