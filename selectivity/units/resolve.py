"""Which layers: the ``units`` spec (presets, names, globs, lists, predicates, mappings, ``Units``)
resolved to ``{name: module}`` on any ``nn.Module``, and the class-name tables the presets test.

Kept apart from how a layer's output is read (``layouts``) and seen (``hooks``): resolving a spec needs
no tensor, and every other file of this package builds on it.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
from collections import OrderedDict
from typing import Mapping

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
MLP_CLASSES = ("Mlp", "GluMlp", "SwiGLU", "MLP", "MLPBlock")  # timm; torchvision ops.MLP, ViT
# Transformer blocks (the ``tokens`` preset): timm ViT ``Block`` (qualified: the name is common),
# torchvision ViT ``EncoderBlock``, Swin blocks of both (their outputs are [B, H, W, C]).
TRANSFORMER_BLOCKS = ("timm.models.vision_transformer.Block", "EncoderBlock",
                      "SwinTransformerBlock", "SwinTransformerBlockV2")


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
    """``{name: module}`` of the layers ``units`` names (see the package doc).

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

