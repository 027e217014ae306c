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

The files: ``resolve`` (the spec, presets and class-name tables, ``resolve_units``), ``layouts``
(where a layer's units are, ``as_units`` / ``from_units``, ``unit_means``), ``responses`` (the
``negative`` rule), ``fused_blocks`` (the means computed in a residual block's own epilogue),
``hooks`` (``UnitHooks``, ``count_units``, ``HooksOwner``).
"""
from selectivity.units.hooks import HooksOwner, UnitHooks, count_units
from selectivity.units.layouts import (BLOCK_LAYOUTS, PASS_THROUGH_CLASSES, as_units, from_units,
                                       layout_of, unit_means)
from selectivity.units.resolve import (ACTIVATION_CLASSES, BLOCK_CLASSES, LAYOUTS, MLP_CLASSES,
                                       PRESETS, TOKENS, TRANSFORMER_BLOCKS, Units, resolve_units,
                                       unwrap)
from selectivity.units.responses import NEGATIVE, check_negative, check_responses

__all__ = [
    "resolve_units", "Units", "unwrap", "PRESETS", "LAYOUTS", "TOKENS",
    "BLOCK_CLASSES", "ACTIVATION_CLASSES", "MLP_CLASSES", "TRANSFORMER_BLOCKS",
    "layout_of", "as_units", "from_units", "unit_means", "BLOCK_LAYOUTS", "PASS_THROUGH_CLASSES",
    "NEGATIVE", "check_negative", "check_responses",
    "UnitHooks", "count_units", "HooksOwner",
]
