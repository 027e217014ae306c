import pytest
import torch

from selectivity.train.models import ModelError, build_model, unit_registry


@pytest.mark.parametrize("name, blocks, units", [
    ("resnet20", 9, 336), ("resnet32", 15, 560), ("resnet56", 27, 1008),
    ("resnet18", 8, 1920), ("resnet50", 16, 15104)])
def test_unit_registry(name, blocks, units):
    reg = unit_registry(build_model(name, 10))
    assert len(reg) == blocks and sum(reg.values()) == units
    assert list(reg)[0] == "layer1.0"


def test_forward_shapes_and_small_stem():
    x = torch.randn(2, 3, 32, 32)
    assert build_model("resnet20", 7)(x).shape == (2, 7)
    m = build_model("resnet18", 5, small_stem=True).eval()
    feats = {}
    m.layer4.register_forward_hook(lambda mod, i, o: feats.update(o=o))
    m(x)
    assert feats["o"].shape[-1] == 4  # 32 px / 8 with the small stem (vs 1 with the ImageNet one)
    with pytest.raises(ModelError, match="unknown model 'vgg'"):
        build_model("vgg", 10)
