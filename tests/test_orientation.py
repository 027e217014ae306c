"""Orientation selectivity (selectivity/analyses/orientation/) on units whose tuning is known by
design."""
import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from selectivity.analyses.orientation.orientation import (
    default_n_sf, make_gratings, orientation_indices, orientation_responses, permuted_control,
    shift_invariance)

SIZE = 32
GRATINGS = make_gratings(SIZE)
KERNEL = 25  # odd, holds the LoG's ±3σ support
SIGMA = 4.0
K_PREF = GRATINGS.sf[4].item()  # the Gabors' frequency, on the grating ladder (period 8 px)
GABOR_DEG = (0.0, 45.0, 100.0, 150.0)


class Abs(nn.Module):
    def forward(self, x):
        return x.abs()


def _xy():
    o = torch.arange(KERNEL, dtype=torch.float64) - KERNEL // 2
    return o.view(1, -1), -o.view(-1, 1)  # same axes as the gratings: x right, y up


def gabor(theta):
    x, y = _xy()
    g = torch.exp(-(x**2 + y**2) / (2 * SIGMA**2)) * torch.cos(
        K_PREF * (x * math.cos(theta) + y * math.sin(theta)))
    return g - g.mean()  # zero mean: no response to the gratings' uniform 0.5 background


def laplacian_of_gaussian():
    x, y = _xy()
    r2 = (x**2 + y**2) / (2 * SIGMA**2)
    g = (r2 - 1) * torch.exp(-r2)
    return g - g.mean()


def filter_bank(kernels):
    """One conv channel per kernel (same kernel on R, G, B), then |·|: a bank of model units."""
    conv = nn.Conv2d(3, len(kernels), KERNEL, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.stack(kernels).float()[:, None].expand(-1, 3, -1, -1) / 3)
    return nn.Sequential(OrderedDict(conv=conv, act=Abs()))


@pytest.fixture(scope="module")
def bank_indices():
    kernels = [gabor(math.radians(d)) for d in GABOR_DEG]
    kernels += [laplacian_of_gaussian(), torch.zeros(KERNEL, KERNEL, dtype=torch.float64)]
    R = orientation_responses(filter_bank(kernels), ["act"], GRATINGS.images, batch_size=128)
    return R["act"], orientation_indices(R["act"])


def test_grating_shapes_and_values():
    g = GRATINGS.images
    assert g.shape == (9, 12, 4, 3, SIZE, SIZE) and g.dtype == torch.float32
    assert torch.equal(g.amin(dim=(-2, -1)), torch.zeros(9, 12, 4, 3))
    assert torch.equal(g.amax(dim=(-2, -1)), torch.ones(9, 12, 4, 3))
    assert torch.equal(g[:, :, :, 0], g[:, :, :, 2])  # greyscale in 3 channels
    torch.testing.assert_close(torch.rad2deg(GRATINGS.orientations),
                               torch.arange(0.0, 180.0, 15.0))
    torch.testing.assert_close(GRATINGS.phases, torch.arange(4) * (math.pi / 2))
    torch.testing.assert_close(GRATINGS.sf, torch.arange(1, 10) * (math.pi / 20))
    # θ = 0 varies along x only (all rows equal); θ = 90° along y only (all columns equal).
    assert torch.allclose(g[:, 0, :, :, :1, :].expand_as(g[:, 0]), g[:, 0], atol=1e-6)
    assert torch.allclose(g[:, 6, :, :, :, :1].expand_as(g[:, 6]), g[:, 6], atol=1e-6)
    # Phase π is the contrast-reversed grating (min–max scaling is symmetric).
    torch.testing.assert_close(g[:, :, 2], 1 - g[:, :, 0], atol=1e-5, rtol=0)
    assert default_n_sf(224) == 57  # Ukita's ImageNet setting
    explicit = make_gratings(16, n_orient=4, n_phase=2, n_sf=[0.5, 1.0])
    assert explicit.images.shape == (2, 4, 2, 3, 16, 16)
    torch.testing.assert_close(explicit.sf, torch.tensor([0.5, 1.0]))


def test_indices_on_a_hand_made_table():
    # R(θ) = 1 + cos 2(θ − 30°) at SF 2 (the largest), half of it at SF 0: pref SF 2, pref 30°,
    # R_orth = 0 → OSI 1, and gOSI = (n/2)/n = 0.5 exactly for a sampled cosine.
    theta = torch.arange(12) * (math.pi / 12)
    curve = 1 + torch.cos(2 * (theta - math.radians(30)))
    R = torch.stack([curve / 2, torch.zeros(12), curve])[None]
    ix = orientation_indices(R)
    assert ix.pref_sf.item() == 2 and not ix.dead.item()
    assert math.degrees(ix.pref_orient.item()) == pytest.approx(30.0)
    assert ix.osi.item() == pytest.approx(1.0) and ix.gosi.item() == pytest.approx(0.5)


def _orientation_error_deg(a, b):
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


def test_oriented_unit_is_tuned_at_its_orientation(bank_indices):
    # Threshold 0.7: at the matching frequency a Gabor's response falls off with angle like a
    # Gaussian of s.d. 1/(σk) = 0.32 rad, i.e. 0.64 rad in 2θ, for which gOSI = exp(−0.64²/2)
    # ≈ 0.82; 0.7 leaves room for the 15° sampling and the truncated kernel.
    _, ix = bank_indices
    for unit, deg in enumerate(GABOR_DEG):
        assert ix.gosi[unit].item() > 0.7, f"Gabor at {deg}°"
        assert ix.osi[unit].item() > 0.7, f"Gabor at {deg}°"
        assert _orientation_error_deg(math.degrees(ix.pref_orient[unit].item()), deg) <= 15.0
        assert GRATINGS.sf[ix.pref_sf[unit]].item() == pytest.approx(K_PREF)


def test_isotropic_unit_is_untuned(bank_indices):
    # A Laplacian of Gaussian responds to every orientation alike (up to the pixel grid).
    _, ix = bank_indices
    assert ix.gosi[len(GABOR_DEG)].item() < 0.1


def test_dead_unit_scores_zero_not_nan(bank_indices):
    _, ix = bank_indices
    dead = len(GABOR_DEG) + 1
    assert ix.dead.tolist() == [False] * dead + [True]
    assert ix.osi[dead].item() == 0.0 and ix.gosi[dead].item() == 0.0
    assert torch.isfinite(ix.osi).all() and torch.isfinite(ix.gosi).all()
    # Negative responses are clamped at 0, so an always-negative unit is dead as well.
    assert orientation_indices(-torch.rand(1, 3, 12)).dead.item()


def test_permuted_control_lowers_gosi_of_tuned_units(bank_indices):
    R, ix = bank_indices
    tuned = R[:len(GABOR_DEG)]
    repeats = 200  # each copy gets its own permutation: a null distribution per unit
    null = permuted_control(tuned.repeat(repeats, 1, 1), torch.Generator().manual_seed(0))
    null_mean = null.gosi.view(repeats, len(GABOR_DEG)).mean(0)
    assert (null_mean < ix.gosi[:len(GABOR_DEG)] - 0.2).all()


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="even number"):
        orientation_indices(torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="n_sf, n_orient, n_phase, 3"):
        orientation_responses(filter_bank([gabor(0.0)]), ["act"], torch.rand(4, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match=r"no module named 'nope'.*modules conv, act"):
        orientation_responses(filter_bank([gabor(0.0)]), ["nope"], GRATINGS.images[:1])
    tokens = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 2, 3), seq=nn.Flatten(2)))
    with pytest.raises(ValueError, match=r"layer 'seq': a unit activation must be \[B, U, H, W\] or \[B, U\]"):
        orientation_responses(tokens, ["seq"], GRATINGS.images[:1])


def test_shift_invariance():
    torch.manual_seed(0)
    images = torch.rand(6, 3, 16, 16)
    net = nn.Sequential(OrderedDict(
        mix=nn.Conv2d(3, 5, 1), relu=nn.ReLU(), flat=nn.Flatten()))
    got = shift_invariance(net, ["relu", "flat"], images, shift_px=(3, -5))
    # A pointwise layer's spatial means ignore a circular shift exactly; the flattened map's
    # units are single positions, which a shift moves to other units.
    assert got["relu"] == pytest.approx(1.0, abs=1e-6)
    assert got["flat"] < 0.9
