"""Models and the unit registry.

- CIFAR-style ResNet-20/32/56 (He et al. 2015, §4.2): 3 stages of 16/32/64 channels, n basic
  blocks each (n = 3, 5, 9), option-A (zero-padding) shortcuts, as in the paper.
- torchvision ResNet-18/50 (``weights=None``: nothing is downloaded), optionally with a small-image
  stem (3×3 stride-1 conv, no max-pool) for 32–64 px inputs.
- paper 3's (Ukita 2020) models for the orientation study: its small CNN (``cnn7``, see
  ``SmallCNN``) and VGG16 (torchvision ``vgg16`` / ``vgg16_bn``, ``weights=None``). They have no
  residual blocks: track their units with ``track_units: relu``.

The unit registry names every residual block by its module path (``layer1.0``, ``layer1.1``, …):
a block's output is its activation after the final ReLU (post-addition), the units the papers
measure. ``unit_registry(model)`` returns ``{name: number of units}`` in forward order.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from selectivity.errors import ModelError  # noqa: F401  (importable from here too)

CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}
TORCHVISION = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
# Plain (non-residual) nets, built as they are: the small-stem option does not apply to them.
PLAIN = {"cnn7": lambda num_classes: SmallCNN(num_classes),
         "vgg16": lambda num_classes: torchvision.models.vgg16(weights=None,
                                                               num_classes=num_classes),
         "vgg16_bn": lambda num_classes: torchvision.models.vgg16_bn(weights=None,
                                                                     num_classes=num_classes)}
MODELS = tuple(CIFAR_DEPTHS) + tuple(TORCHVISION) + tuple(PLAIN)


class BasicBlock(nn.Module):
    """3×3 → BN → ReLU → 3×3 → BN, + shortcut, → ReLU. Each ReLU is its own module so hooks on
    ReLUs see every activation exactly once."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.pad = cout - cin  # option A: subsample and zero-pad the shortcut's channels
        self.stride = stride

    def shortcut(self, x):
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (i > 0 and j == 0) else 1)
                      for j in range(blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SmallCNN(nn.Module):
    """Paper 3's (Ukita 2020) CIFAR-10 CNN: six valid 3×3 convolutions of 32-32-64-64-128-128
    channels with strides 1-2-1-2-1-2, each followed by ReLU *then* BatchNorm (the paper's order),
    Flatten, FC 512 → ReLU → BatchNorm, FC ``num_classes``.

    At the paper's 32 px the last map is 1×1 (32→30→14→12→5→3→1), so the 128-d flatten is the
    paper's. ``AdaptiveAvgPool2d(1)`` before it is the identity there and lets other image sizes
    run with the same FC sizes (an average over the last map then, not the paper's flatten).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layers, cin = [], 3
        for cout, stride in zip((32, 32, 64, 64, 128, 128), (1, 2, 1, 2, 1, 2)):
            layers += [nn.Conv2d(cin, cout, 3, stride, 0), nn.ReLU(inplace=True),
                       nn.BatchNorm2d(cout)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(128, 512)
        self.relu = nn.ReLU(inplace=True)
        self.bn = nn.BatchNorm1d(512)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.fc(self.bn(self.relu(self.fc1(x))))


def build_model(name: str, num_classes: int, small_stem: bool = False) -> nn.Module:
    """A freshly initialised model by name (see MODELS)."""
    if name in CIFAR_DEPTHS:
        return CifarResNet(CIFAR_DEPTHS[name], num_classes)
    if name in TORCHVISION:
        model = TORCHVISION[name](weights=None, num_classes=num_classes)
        if small_stem:
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            model.maxpool = nn.Identity()
        return model
    if name in PLAIN:
        return PLAIN[name](num_classes)
    raise ModelError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")


def residual_blocks(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """Every residual block (``layerS.B``) of a ResNet, in forward order (the ``blocks`` preset)."""
    from selectivity.units import resolve_units
    return resolve_units(model, "blocks")


def block_units(block: nn.Module) -> int:
    """Channels of a block's output: its last BatchNorm's (bn3 in a Bottleneck, else bn2)."""
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def unit_registry(model: nn.Module) -> "OrderedDict[str, int]":
    """{block name: unit count} for every residual block output (after its final ReLU)."""
    return OrderedDict((n, block_units(b)) for n, b in residual_blocks(model).items())


def stage_of(layer_name: str) -> str:
    """``layer2.3`` → ``layer2`` (the stage a unit layer belongs to)."""
    return layer_name.split(".")[0]
