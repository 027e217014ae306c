"""Orientation selectivity of units to full-field sinusoidal gratings (Ukita 2020).

Stimuli, responses and indices follow the public code of the paper (ukky17/ori_selectivity_CNN):
- gratings: 12 orientations (0..165° in 15° steps), 4 phases, spatial frequencies
  k_s = π/(S/2+4)·(s+1) rad/px; each greyscale grating min–max scaled to [0, 1] and copied to
  3 channels. Orientation θ is the direction of the wave vector, counter-clockwise from the +x
  (column) axis with y pointing up: θ = 0 is vertical stripes (luminance varies along x).
- a unit's response = spatial mean of its channel ([B, U, H, W]) or the value itself ([B, U]);
  max over phase gives R[unit, sf, orientation].
- preferred SF = argmax over SF of the max over orientation; the tuning curve R(θ) is taken there;
  OSI = (R_pref − R_orth)/(R_pref + R_orth) with orth = pref + 90°;
  gOSI = |Σ R(θ) e^{2iθ}| / Σ R(θ). Units with no positive response are dead: OSI = gOSI = 0.
- negative responses are clamped at 0 before the indices. Ukita measured post-ReLU maps, where this
  changes nothing; for other layers it reads the unit as a rectified (firing-rate) response, which
  keeps OSI and gOSI inside [0, 1].
- shift invariance: correlation across units between responses to an image and to its circular
  shift, raw or centred (unit means removed first; see ``shift_correlation``).
- ablation (for tools/orientation.py): ``ablation_groups`` splits a layer's live units into the
  top and bottom halves by gOSI; ``zero_channels`` zeroes them; ``loss_and_shift_invariance``
  measures per-image val loss and shift invariance in the same passes.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from selectivity.analyses.common import eval_no_grad
from selectivity.analyses.features import LOGITS, collect_features
from selectivity.units import UnitHooks, resolve_units, unit_means

Normalize = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Gratings:
    images: torch.Tensor        # [n_sf, n_orient, n_phase, 3, size, size] float32 in [0, 1]
    orientations: torch.Tensor  # [n_orient] radians (wave-vector direction, see module doc)
    phases: torch.Tensor        # [n_phase] radians
    sf: torch.Tensor            # [n_sf] rad/px


def default_n_sf(size: int) -> int:
    """How many of Ukita's frequencies k_s = π/(size/2+4)·(s+1) lie below π/2 rad/px (periods
    longer than 4 px, well clear of aliasing): 9 at 32 px and 57 at 224 px, his two settings."""
    return math.ceil((size / 2 + 4) / 2) - 1


def channel_normalize(mean: Sequence[float], std: Sequence[float]) -> Normalize:
    """The usual per-channel (x − mean)/std, as a callable for ``orientation_responses``."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return lambda x: (x - m.to(x.device)) / s.to(x.device)


def make_gratings(size: int, n_orient: int = 12, n_phase: int = 4,
                  n_sf: int | Sequence[float] | None = None) -> Gratings:
    """Full-field sinusoidal gratings [n_sf, n_orient, n_phase, 3, size, size] in [0, 1].

    ``n_sf``: None → ``default_n_sf(size)`` frequencies of Ukita's ladder; an int → that many
    frequencies of the ladder; a sequence → those frequencies in rad/px.
    """
    if size < 4 or n_orient < 1 or n_phase < 1:
        raise ValueError(f"need size ≥ 4, n_orient ≥ 1, n_phase ≥ 1; got {size}, {n_orient}, "
                         f"{n_phase}")
    if n_sf is None or isinstance(n_sf, int):
        count = default_n_sf(size) if n_sf is None else n_sf
        if count < 1:
            raise ValueError(f"n_sf must be ≥ 1, got {count}")
        sf = math.pi / (size / 2 + 4) * torch.arange(1, count + 1, dtype=torch.float64)
    else:
        sf = torch.tensor(list(n_sf), dtype=torch.float64)
        if sf.numel() == 0 or bool((sf <= 0).any()):
            raise ValueError(f"spatial frequencies must be > 0 rad/px, got {list(n_sf)}")
    ori = math.pi / n_orient * torch.arange(n_orient, dtype=torch.float64)
    phase = 2 * math.pi / n_phase * torch.arange(n_phase, dtype=torch.float64)
    offsets = torch.arange(size, dtype=torch.float64) - size // 2
    x = offsets.view(1, -1)    # column offset
    y = -offsets.view(-1, 1)   # row offset, pointing up
    kx = (sf.view(-1, 1) * torch.cos(ori)).view(-1, len(ori), 1, 1, 1)
    ky = (sf.view(-1, 1) * torch.sin(ori)).view(-1, len(ori), 1, 1, 1)
    # [n_sf, n_orient, n_phase, S, S]
    wave = torch.cos(kx * x + ky * y + phase.view(1, 1, -1, 1, 1))
    lo = wave.amin(dim=(-2, -1), keepdim=True)
    hi = wave.amax(dim=(-2, -1), keepdim=True)
    # Per-grating min–max scaling as in Ukita's code (stretches the lowest SFs, whose period is
    # longer than the image, to full contrast). hi > lo for any k > 0 on a grid of ≥ 4 px.
    grey = ((wave - lo) / (hi - lo)).to(torch.float32)
    images = grey.unsqueeze(3).expand(-1, -1, -1, 3, -1, -1).contiguous()
    return Gratings(images, ori.float(), phase.float(), sf.float())


def _model_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def unit_responses(model: nn.Module, layer_names: Sequence[str], images: torch.Tensor,
                   normalize: Normalize | None = None, batch_size: int = 256,
                   device=None) -> dict[str, torch.Tensor]:
    """{layer: [N, U]} per-image unit responses (spatial mean per channel) in eval mode, no_grad.

    ``images`` [N, 3, S, S] are moved batch by batch to ``device`` (default: the model's) and
    passed through ``normalize`` first. Results are float32 on the CPU.
    """
    names = list(layer_names)
    dev = _model_device(model, device)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with eval_no_grad(model), collect_features(model, names, include_logits=False,
                                               reduce=unit_means) as run:
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(dev)
            out = run(normalize(x) if normalize is not None else x)
            for n in names:
                parts[n].append(out[n].float().cpu())
    return {n: torch.cat(p) for n, p in parts.items()}


def orientation_responses(model: nn.Module, layer_names: Sequence[str], gratings: torch.Tensor,
                          normalize: Normalize | None = None, batch_size: int = 256,
                          device=None) -> dict[str, torch.Tensor]:
    """{layer: R [n_units, n_sf, n_orient]}: each unit's response to ``gratings`` (the ``images``
    of ``make_gratings``, [n_sf, n_orient, n_phase, 3, S, S]), max over phase."""
    if gratings.dim() != 6 or gratings.shape[3] != 3:
        raise ValueError(f"gratings must be [n_sf, n_orient, n_phase, 3, S, S], "
                         f"got shape {tuple(gratings.shape)}")
    n_sf, n_orient, n_phase = gratings.shape[:3]
    flat = gratings.reshape(-1, *gratings.shape[3:])
    per_image = unit_responses(model, layer_names, flat, normalize, batch_size, device)
    return {n: r.view(n_sf, n_orient, n_phase, -1).amax(dim=2).permute(2, 0, 1).contiguous()
            for n, r in per_image.items()}


@dataclass(frozen=True)
class OrientationIndices:
    pref_sf: torch.Tensor      # [U] int64 index into the SF axis
    tuning: torch.Tensor       # [U, n_orient] float64, clamped responses at the preferred SF
    pref_orient: torch.Tensor  # [U] radians (argmax of the tuning curve); NaN for dead units
    osi: torch.Tensor          # [U] float64 in [0, 1]
    gosi: torch.Tensor         # [U] float64 in [0, 1]
    dead: torch.Tensor         # [U] bool: no positive response to any grating


def orientation_indices(R: torch.Tensor) -> OrientationIndices:
    """OSI, gOSI and preferences per unit from R [n_units, n_sf, n_orient] (orientations
    π·o/n_orient, as ``make_gratings`` makes them)."""
    if R.dim() != 3:
        raise ValueError(f"R must be [n_units, n_sf, n_orient], got shape {tuple(R.shape)}")
    n_units, _, n_orient = R.shape
    if n_orient < 2 or n_orient % 2:
        raise ValueError(f"need an even number of orientations (orth = pref + 90°), got {n_orient}")
    r = R.detach().to(torch.float64).clamp_min(0)
    dead = r.amax(dim=(1, 2)) <= 0
    pref_sf = r.amax(dim=2).argmax(dim=1)
    tuning = r[torch.arange(n_units), pref_sf]                      # [U, n_orient]
    pref = tuning.argmax(dim=1)
    orth = (pref + n_orient // 2) % n_orient
    r_pref = tuning.gather(1, pref[:, None])[:, 0]
    r_orth = tuning.gather(1, orth[:, None])[:, 0]
    twice = 2 * math.pi / n_orient * torch.arange(n_orient, dtype=torch.float64)  # 2θ
    vector = torch.complex(tuning @ torch.cos(twice), tuning @ torch.sin(twice)).abs()
    total = tuning.sum(dim=1)
    # Dead units would be 0/0; where() keeps the NaN out of the result (denominators set to 1).
    osi = torch.where(dead, 0.0, (r_pref - r_orth) / torch.where(dead, 1.0, r_pref + r_orth))
    gosi = torch.where(dead, 0.0, vector / torch.where(dead, 1.0, total))
    pref_orient = torch.where(dead, math.nan, pref.to(torch.float64) * (math.pi / n_orient))
    return OrientationIndices(pref_sf, tuning, pref_orient, osi, gosi, dead)


def permuted_control(R: torch.Tensor, generator: torch.Generator | None = None
                     ) -> OrientationIndices:
    """Indices after shuffling, independently for each unit, which (SF, orientation) condition
    each of its responses belongs to — the null distribution of a unit with the same responses
    but no orientation structure. (Ukita shuffled the stimulus order once for all units, before
    the max over phase; shuffling per unit after it keeps each unit's set of responses exact.)"""
    if R.dim() != 3:
        raise ValueError(f"R must be [n_units, n_sf, n_orient], got shape {tuple(R.shape)}")
    flat = R.reshape(R.shape[0], -1)
    gen_device = generator.device if generator is not None else "cpu"
    order = torch.rand(flat.shape, generator=generator, device=gen_device).argsort(dim=1)
    return orientation_indices(flat.gather(1, order.to(R.device)).view(R.shape))


def shift_invariance(model: nn.Module, layer_names: Sequence[str], images: torch.Tensor,
                     shift_px: int | tuple[int, int], normalize: Normalize | None = None,
                     batch_size: int = 256, device=None, centered: bool = False
                     ) -> dict[str, float]:
    """{layer: mean over images of the Pearson correlation, across the layer's units, between its
    responses to an image and to the same image circularly shifted by ``shift_px`` (int: down and
    right by that many pixels; or (dy, dx)).

    1 means the layer's response pattern ignores the shift; Ukita argues that ablating low-layer
    orientation-selective units hurts higher layers' shift invariance. The shift is circular
    (torch.roll) so no content leaves the image; spatial means of a convolutional layer with
    circular padding would be exactly invariant, so values below 1 come from zero padding, strides
    and pooling. Images whose responses are constant across units (correlation undefined) are
    left out of the mean; NaN if all are. ``centered``: see ``shift_correlation``.
    """
    shifted = roll_images(images, shift_px)
    a = unit_responses(model, layer_names, images, normalize, batch_size, device)
    b = unit_responses(model, layer_names, shifted, normalize, batch_size, device)
    return {name: shift_correlation(a[name], b[name], centered) for name in a}


def roll_images(images: torch.Tensor, shift_px: int | tuple[int, int]) -> torch.Tensor:
    """Circular shift of [N, C, H, W] images down and right by ``shift_px`` (int) or (dy, dx).
    Per-channel normalisation commutes with it, so normalised images can be shifted directly."""
    dy, dx = (shift_px, shift_px) if isinstance(shift_px, int) else shift_px
    return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


def shift_correlation(a: torch.Tensor, b: torch.Tensor, centered: bool = False) -> float:
    """Mean over images of the Pearson correlation across units between rows of ``a`` and ``b``
    ([N, U] responses to images and to their shifted copies). Images whose responses are constant
    across units are left out; NaN if all are.

    ``centered``: first subtract each unit's mean response over the unshifted images (``a``'s
    column means) from both. Without it, the profile of unit means that every image shares
    dominates the correlation and keeps it near 1 even in a random network; centred, only the
    image-specific part of the pattern counts (docs/analyses.md has the measurements).
    """
    a, b = a.double(), b.double()
    if centered:
        mu = a.mean(dim=0, keepdim=True)
        a, b = a - mu, b - mu
    x = a - a.mean(dim=1, keepdim=True)
    y = b - b.mean(dim=1, keepdim=True)
    r = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))
    return float(r[r.isfinite()].mean()) if bool(r.isfinite().any()) else math.nan


# ---------------------------------------------------------------- ablation by gOSI (Ukita 2020)

def ablation_groups(indices: OrientationIndices) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, bottom): the unit indices of the most and least orientation-selective halves of a
    layer by gOSI, dead units excluded (Ukita put them in the control half, which flatters the
    comparison). Each half holds ⌊alive/2⌋ units; with an odd count the median unit is in neither.
    Ties are broken by unit index, so the split is deterministic."""
    alive = torch.nonzero(~indices.dead).flatten()
    order = alive[torch.argsort(indices.gosi[alive], stable=True)]  # ascending gOSI
    half = order.numel() // 2
    return order[order.numel() - half:].flip(0), order[:half]


@contextlib.contextmanager
def zero_channels(model: nn.Module, layer_name: str, channels: Sequence[int] | torch.Tensor):
    """Set the given channels of a named module's output to 0 for the duration (a forward hook).

    A deliberately small local mask for the orientation ablation; the project's general ablation
    masks on residual-block outputs live in selectivity/analyses/ablation/. Works for [B, U, ...]
    outputs in any memory format; the output is replaced (not modified in place), so hooks registered
    after this one, and the next layer, see the zeroed tensor.
    """
    layer = resolve_units(model, [layer_name], order="given", names_first=True)
    index = torch.as_tensor(channels, dtype=torch.long).flatten()

    def mask(_reported, output):
        if not isinstance(output, torch.Tensor) or output.dim() < 2:
            raise TypeError(f"cannot zero channels of {layer_name!r}: "
                            f"its output is not [B, U, ...]")
        if index.numel() and int(index.max()) >= output.shape[1]:
            raise IndexError(f"channel {int(index.max())} out of range for {layer_name!r} "
                             f"({output.shape[1]} channels)")
        keep = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
        keep[index.to(output.device)] = 0
        return output * keep.view(1, -1, *([1] * (output.dim() - 2)))

    with UnitHooks(model, layer, mask):
        yield


@dataclass(frozen=True)
class LossAndShift:
    loss: torch.Tensor                 # [N] float64 per-image cross-entropy
    correct: torch.Tensor              # [N] bool: top-1 prediction right
    shift_invariance: dict             # {layer: mean correlation (see shift_correlation)}
    shift_invariance_centered: dict    # {layer: the same with unit means removed (centered=True)}


def loss_and_shift_invariance(model: nn.Module, batches, layer_names: Sequence[str],
                              shift_px: int | tuple[int, int]) -> LossAndShift:
    """Per-image cross-entropy and correctness over ``batches`` of ``(images, labels)`` (already
    normalised, on the model's device), and the shift invariance of ``layer_names`` on the same
    images, raw and centred (see ``shift_correlation``) — two forward passes per batch (the
    images, then their circular shifts), eval mode, no_grad. Hooks already on the model (e.g.
    ``zero_channels``) apply to both passes."""
    names = list(layer_names)
    losses, correct = [], []
    a: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    b: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with eval_no_grad(model), collect_features(model, names, include_logits=True,
                                               reduce=unit_means) as run:
        for images, labels in batches:
            out = run(images)
            logits = out.pop(LOGITS).float()
            losses.append(torch.nn.functional.cross_entropy(
                logits, labels, reduction="none").double().cpu())
            correct.append((logits.argmax(1) == labels).cpu())
            shifted = run(roll_images(images, shift_px))
            for n in names:
                a[n].append(out[n].float().cpu())
                b[n].append(shifted[n].float().cpu())
    if not losses:
        raise ValueError("no batches to evaluate")
    a = {n: torch.cat(a[n]) for n in names}
    b = {n: torch.cat(b[n]) for n in names}
    return LossAndShift(torch.cat(losses), torch.cat(correct),
                        {n: shift_correlation(a[n], b[n]) for n in names},
                        {n: shift_correlation(a[n], b[n], centered=True) for n in names})
