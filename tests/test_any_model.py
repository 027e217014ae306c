"""Presets on the models people use, built without weights at the smallest input each allows.

Each (model, preset) resolves, every layer's per-image unit means are [B, U] with U read from the
module's own unit dim, and the tracker's class sums equal a reduction of the raw outputs done here
by hand (mean over every dim but batch and units; tokens: all of them). Responses that go negative
are the tracker's one-line error by default, and with negative="relu" or negative="shift" every SI
is in [0, 1]. Each case also produces
its row of the table in docs/library.md and checks the row is there as produced, so the table
cannot drift from what the models do.
"""
import re
from pathlib import Path

import pytest
import torch

import selectivity as sel
from selectivity.units import Units

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

DOC = Path(__file__).resolve().parents[1] / "docs" / "library.md"
B, K = 4, 2


def _tv(name, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, **kw)


# (library, model, builder, input size, preset): the smallest input each model allows.
CASES = [
    ("torchvision", "resnet50", _tv("resnet50"), 32, "blocks"),
    ("torchvision", "mobilenet_v3_small", _tv("mobilenet_v3_small"), 32, "act"),
    ("torchvision", "efficientnet_b0", _tv("efficientnet_b0"), 32, "act"),
    ("torchvision", "vit_b_16", _tv("vit_b_16", image_size=32), 32, "mlp"),
    ("torchvision", "vit_b_16", _tv("vit_b_16", image_size=32), 32, "tokens"),
    ("timm", "convnext_atto", _timm("convnext_atto"), 32, "mlp"),
    ("timm", "vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32), 32, "mlp"),
    ("timm", "vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=32), 32, "tokens"),
    ("timm", "swin_tiny_patch4_window7_224",
     _timm("swin_tiny_patch4_window7_224", img_size=32), 32, "mlp"),
    ("timm", "swin_tiny_patch4_window7_224",
     _timm("swin_tiny_patch4_window7_224", img_size=32), 32, "tokens"),
]
_MODELS: dict = {}


def _model(lib, name, build):
    if (lib, name) not in _MODELS:  # one build per model (vit_b_16 takes seconds)
        _MODELS.clear()
        torch.manual_seed(0)
        _MODELS[(lib, name)] = build().eval()
    return _MODELS[(lib, name)]


def _by_hand(output: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, U] unit means of a raw output, its unit dim given by the layout."""
    x = output.double()
    if layout == "units_last":
        x = x.movedim(-1, 1)
    return x.flatten(2).mean(2) if x.dim() > 2 else x


def _row(lib, name, preset, layers, widths, negative):
    u = "–".join(str(w) for w in (min(widths), max(widths))) if len(set(widths)) > 1 \
        else str(widths[0])
    return (f"| {lib} `{name}` | `{preset}` | {len(layers)} | {u} | "
            f"{'yes' if negative else 'no'} ({negative}/{len(layers)} layers) |")


def _track(model, preset, labels, images, negative):
    """The tracker's results over one batch, and the raw outputs of its layers."""
    tracker = sel.SelectivityTracker(model, K, units=Units(preset), negative=negative)
    raw = {}
    handles = [m.register_forward_hook(lambda m, a, out, n=n: raw.setdefault(n, out.detach()))
               for n, m in tracker.layers.items()]
    try:
        with torch.no_grad(), tracker.track(labels):
            model(images)
    finally:
        tracker.remove()
        for h in handles:
            h.remove()
    return tracker, raw


@pytest.mark.parametrize("lib,name,build,size,preset", CASES,
                         ids=[f"{c[1]}-{c[4]}" for c in CASES])
def test_preset_gives_unit_means_of_the_right_width(lib, name, build, size, preset):
    """Every layer's [B, U] means equal a reduction by hand. Responses that go negative anywhere
    stop the default tracker with the one-line error; with negative="relu" the tracker measures
    their positive part (its class sums equal the hand reduction of relu(output)) and every SI is
    in [0, 1]."""
    model = _model(lib, name, build)
    seen = {}
    hooks = sel.UnitHooks(model, Units(preset), lambda layer, units: seen.update(
        {layer: sel.unit_means(units)}))
    images = torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 0, 1])
    try:
        with torch.no_grad():
            model(images)
    finally:
        hooks.remove()
    goes_negative = any(bool((m < 0).any()) for m in seen.values())
    if goes_negative:
        with pytest.raises(sel.UnitsError) as error:
            _track(model, preset, labels, images, "error")
        message = str(error.value)
        assert "\n" not in message and "negative per-image responses" in message, message
        assert message.split(":")[0].removeprefix("layer ") in seen, message
    tracker, raw = _track(model, preset, labels, images, "relu" if goes_negative else "error")
    results = tracker.compute()
    assert list(results) == [n for n in tracker.layers if n in raw] == list(seen)
    widths, negative = [], 0
    for layer, r in results.items():
        layout = hooks.layouts[layer]
        assert layout in sel.units.LAYOUTS, f"{name} {layer}: layout undecided"
        expected = _by_hand(raw[layer], layout)
        assert seen[layer].shape == expected.shape == (B, r.si.numel())
        torch.testing.assert_close(seen[layer].double(), expected, rtol=1e-5, atol=1e-5)
        by_class = torch.stack([expected[labels == k].sum(0) for k in range(K)])
        negative += bool((by_class < 0).any())
        measured = _by_hand(raw[layer].clamp_min(0), layout) if goes_negative else expected
        torch.testing.assert_close(r.sums, torch.stack([measured[labels == k].sum(0)
                                                        for k in range(K)]), rtol=1e-5, atol=1e-5)
        assert r.negative == ("relu" if goes_negative else "error")
        assert bool(((r.si >= 0) & (r.si <= 1)).all()), (layer, float(r.si.min()), float(r.si.max()))
        widths.append(r.si.numel())
    if goes_negative:  # the other choice: the raw responses, each unit's lowest class mean subtracted
        tracker, _ = _track(model, preset, labels, images, "shift")
        for layer, r in tracker.compute().items():
            means = torch.stack([_by_hand(raw[layer], hooks.layouts[layer])[labels == k].mean(0)
                                 for k in range(K)])
            torch.testing.assert_close(r.shifted_by, means.min(0).values, rtol=1e-5, atol=1e-5)
            assert r.negative == "shift"
            assert bool(((r.si >= 0) & (r.si <= 1)).all()), (layer, float(r.si.min()))
    row = _row(lib, name, preset, list(results), widths, negative)
    assert row in DOC.read_text().splitlines(), f"docs/library.md lacks the row, as produced:\n{row}"


def test_the_table_has_a_row_per_case_and_no_other():
    rows = [line for line in DOC.read_text().splitlines()
            if re.match(r"\| (torchvision|timm) `", line)]
    assert [(r.split("`")[1], r.split("`")[3]) for r in rows] == [(c[1], c[4]) for c in CASES]


def test_token_choice_cls_takes_token_0_and_is_recorded():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32).eval()
    got, raw = {}, {}
    hooks = sel.UnitHooks(model, Units("blocks.0", tokens="cls"),
                          lambda n, u: got.update({n: sel.unit_means(u)}))
    h = model.blocks[0].register_forward_hook(lambda m, a, out: raw.setdefault("x", out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    hooks.remove(), h.remove()
    assert hooks.tokens == "cls" and hooks.layouts == {"blocks.0": "units_last"}
    torch.testing.assert_close(got["blocks.0"], raw["x"][:, 0])
