"""What SI does with responses that go negative: the ``negative`` choices and the one-line check.

Apart from the layers and their layouts: a rule of the consumers (tracker, regularizer, the Lightning
callback) about the values the hooks hand them, not about where those values come from.
"""
from __future__ import annotations

import torch

from selectivity.errors import UnitsError

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
