"""Where a layer's units are: its layout (``units_first`` / ``units_last``, decided by the module,
never by the shape), an output seen as ``[B, U]`` or ``[B, U, H, W]`` (``as_units``) and back
(``from_units``), and the per-image unit means (``unit_means``).

Apart from ``resolve`` (which layers) and ``hooks`` (when they are seen): these are the tensor rules
that the hooks, the fused epilogue and the analyses share.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from selectivity.errors import UnitsError
from selectivity.units.resolve import (ACTIVATION_CLASSES, BLOCK_CLASSES, TRANSFORMER_BLOCKS, Units,
                                       _class_names, _glob_regex, unwrap)

# Modules that keep their input's layout; an activation is one of them.
PASS_THROUGH_CLASSES = ACTIVATION_CLASSES | {
    "Dropout", "Dropout1d", "Dropout2d", "Identity", "DropPath", "StochasticDepth", "LayerScale"}
# Blocks whose layout their class decides (containers otherwise are undecided, but a Sequential).
BLOCK_LAYOUTS = {
    **{name: "units_first" for name in (
        *BLOCK_CLASSES, "InvertedResidual", "MBConv", "FusedMBConv", "ConvNeXtBlock", "CNBlock",
        "ConvNeXtStage", "SqueezeExcitation", "SqueezeExcite", "LayerNorm2d")},
    **{name: "units_last" for name in (
        *TRANSFORMER_BLOCKS, "SwinTransformerStage", "PatchMerging", "PatchMergingV2")},
}



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
    (package doc): by its type; an activation, dropout or identity by its parent — the layer
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
