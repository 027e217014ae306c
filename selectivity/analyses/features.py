"""What the analyses read off a network, shared by all of them: the outputs of named layers for
one batch at a time (``collect_features``), the model's stages, and the names they use.

- ``LOGITS``: the name of the model's output among the layers (always the last; a model module
  cannot take it, and ``refuse_logits`` turns a user's list naming it into a one-line error).
- ``STAGES``: the stage outputs ``layer1..layerN`` as a units glob (``*`` stays inside one name
  segment); ``stage_names(model)`` resolves it.
- ``base_name``: ``UnitHooks`` reports a module's k-th call in one forward as ``name#k``.

Layer lists are resolved as the analyses take them: ``resolve_units(model, layers,
order="given", names_first=True)`` (selectivity/units/resolve.py).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from selectivity.errors import UnitsError
from selectivity.units import UnitHooks, resolve_units

LOGITS = "logits"
STAGES = "layer*"


def base_name(reported: str) -> str:
    """The module's name of a ``UnitHooks`` report (``name`` or ``name#k``)."""
    return reported.partition("#")[0]


def refuse_logits(layers: Sequence[str] | None) -> None:
    """A user's layer list may not name the model output: it is always there, as the last."""
    if layers and LOGITS in layers:
        raise UnitsError(f"{LOGITS!r} is always included; leave it out of the layers")


def stage_names(model: nn.Module) -> list[str]:
    """The model's stages (top-level modules named layer1, layer2, ...), in order."""
    try:
        return list(resolve_units(model, STAGES))
    except UnitsError:
        raise UnitsError(f"{type(model).__name__} has no layer1..layerN stages; name the layers "
                         f"(--layers)") from None


@contextlib.contextmanager
def collect_features(model: nn.Module, layer_names: Sequence[str], include_logits: bool = True,
                     reduce: Callable[[torch.Tensor], object] | None = None
                     ) -> Iterator[Callable[[torch.Tensor], dict[str, object]]]:
    """Hook the named modules; yields ``run(images) -> {name: output}`` for one batch at a time.

    Each call runs the model once and returns a fresh dict (layer order, then ``"logits"``, the
    model's return value, when ``include_logits``); nothing is kept between calls. ``reduce`` is
    applied to each (detached) output inside the hook, so e.g. a Gram can replace a large feature
    map before the next layer runs. A module called several times in one forward (torchvision
    ResNet blocks reuse ``relu``) reports its last call, which for those blocks is the block output.
    Hooks are removed on exit. The caller chooses train/eval mode and grad mode.
    """
    layers = resolve_units(model, list(layer_names), order="given", names_first=True)
    names = list(layers)
    if include_logits and LOGITS in names:
        raise ValueError(f"layer name {LOGITS!r} is reserved for the model output")
    reduce = reduce if reduce is not None else (lambda t: t)
    store: dict[str, object] = {}

    def keep(reported, output):
        name = base_name(reported)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {name!r} returned {type(output).__name__}, not a Tensor")
        try:
            store[name] = reduce(output.detach())
        except UnitsError as e:  # e.g. unit_means of a 3-D output: say which layer
            raise UnitsError(f"layer {name!r}: {e}") from None

    def run(images: torch.Tensor) -> dict[str, object]:
        store.clear()
        logits = model(images)
        silent = [n for n in names if n not in store]
        if silent:
            raise RuntimeError(f"layer {silent[0]!r} produced no output in this forward pass")
        out = {n: store[n] for n in names}
        store.clear()
        if include_logits:
            if not isinstance(logits, torch.Tensor):
                raise TypeError(f"model returned {type(logits).__name__}, not a logits Tensor")
            out[LOGITS] = reduce(logits.detach())
        return out

    with UnitHooks(model, layers, keep):
        yield run
