"""Which units: presets on torchvision, timm and our ResNets; names, globs, predicates; errors."""
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from selectivity.errors import UnitsError
from selectivity.train.models import build_model
from selectivity.units import UnitHooks, count_units, resolve_units


@pytest.mark.parametrize("make", [
    lambda: torchvision.models.resnet50(num_classes=1000),
    lambda: timm.create_model("resnet50", pretrained=False, num_classes=1000),
], ids=["torchvision", "timm"])
def test_blocks_preset_finds_the_16_blocks_and_15104_units_of_resnet50(make):
    model = make()
    units = count_units(model, torch.randn(1, 3, 64, 64), "blocks")
    assert len(units) == 16 and sum(units.values()) == 15104
    assert list(units)[:3] == ["layer1.0", "layer1.1", "layer1.2"] and list(units)[-1] == "layer4.2"


def test_blocks_preset_on_our_cifar_resnet_and_ddp_style_wrappers():
    model = build_model("resnet20", 10)
    assert list(resolve_units(model)) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    wrapped = nn.Module()
    wrapped.module = model  # DDP keeps the user's model as .module
    assert list(resolve_units(wrapped)) == list(resolve_units(model))


def test_names_globs_lists_predicates_and_mappings():
    model = build_model("resnet20", 10)
    assert list(resolve_units(model, "layer3.*")) == ["layer3.0", "layer3.1", "layer3.2"]
    assert list(resolve_units(model, "layer*.0.relu2")) == [f"layer{s}.0.relu2" for s in (1, 2, 3)]
    assert len(resolve_units(model, "**.bn2")) == 9
    assert list(resolve_units(model, ["layer2.1", "layer1.0"])) == ["layer1.0", "layer2.1"]
    assert list(resolve_units(model, lambda n, m: isinstance(m, nn.Linear))) == ["fc"]
    assert list(resolve_units(model, {"x": model.fc})) == ["x"]
    assert len(resolve_units(model, "relu")) == 19 and len(resolve_units(model, "bn")) == 19


@pytest.mark.parametrize("units, message", [
    ("layer9.*", "matched no module"),
    ("layer1.7", "no module named 'layer1.7' (did you mean"),
    (lambda n, m: False, "matched no module"),
    (42, "units must be a preset"),
    ({}, "mapping is empty"),
])
def test_units_that_resolve_to_nothing_are_one_line_errors(units, message):
    with pytest.raises(UnitsError) as e:
        resolve_units(build_model("resnet20", 10), units)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert "presets: blocks, relu, bn" in str(e.value) or message.startswith(("units must", "mapping"))


def test_no_blocks_in_a_plain_cnn_says_what_exists():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(UnitsError, match=r"'blocks' matched no module; Sequential has modules 0, 1; "
                                         r"presets: blocks, relu, bn \(0 residual blocks\)"):
        resolve_units(model, "blocks")


def test_hooks_can_replace_an_output_and_are_removed():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    nn.init.ones_(model[0].weight)
    with UnitHooks(model, "0", lambda name, out: torch.zeros_like(out)):
        assert model(torch.ones(2, 3)).abs().sum() == 0
    assert not model[0]._forward_hooks and not model._forward_pre_hooks
    assert (model(torch.ones(2, 3)) >= 3 + model[0].bias.min()).all()
