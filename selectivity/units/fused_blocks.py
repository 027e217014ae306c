"""Fused residual blocks: in ``UnitHooks``' means mode, a known block's forward (torchvision
``BasicBlock`` / ``Bottleneck``, this package's CIFAR ``BasicBlock``) is replaced on the instance by
its own computation up to the last BN and the shortcut, then ``epilogue.add_relu_means_`` (add, ReLU
and the unit means in one pass).

Apart from ``hooks``: this file knows other libraries' block forwards and swaps an instance's
forward, which the hooks need not know; it imports the epilogue only when a fused forward runs.
"""
from __future__ import annotations

import sys

import torch.nn as nn


def _torchvision_basic(b, x):
    out = b.relu(b.bn1(b.conv1(x)))
    out = b.bn2(b.conv2(out))
    return out, (x if b.downsample is None else b.downsample(x))


def _torchvision_bottleneck(b, x):
    out = b.relu(b.bn1(b.conv1(x)))
    out = b.relu(b.bn2(b.conv2(out)))
    out = b.bn3(b.conv3(out))
    return out, (x if b.downsample is None else b.downsample(x))


def _cifar_basic(b, x):
    out = b.relu1(b.bn1(b.conv1(x)))
    out = b.bn2(b.conv2(out))
    return out, b.shortcut(x)


def _known_blocks() -> dict:
    """{block class: (its forward up to the last BN and the shortcut → (out, identity), the name of
    the ReLU module its stock forward calls last)} for the block classes whose forward is known."""
    # Looked up among the loaded modules, not imported: the core imports nothing above it, and a
    # block's class is loaded whenever one of its instances exists.
    known = {}
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        known[tv.BasicBlock] = (_torchvision_basic, "relu")
        known[tv.Bottleneck] = (_torchvision_bottleneck, "relu")
    cifar = sys.modules.get("selectivity.train.models")
    if cifar is not None:
        known[cifar.BasicBlock] = (_cifar_basic, "relu2")
    return known


class _FusedBlock:
    """A residual block whose forward is replaced (on the instance, while any means-mode UnitHooks
    captures it) by: its own computation up to the last BN and the shortcut, then
    ``epilogue.add_relu_means_`` instead of ``out + identity → ReLU``; the means go to every enabled
    consumer. Each call falls back to the stock forward (the consumers' hooks then take the means
    from the output) when

    - no consumer is enabled (an untracked step runs exactly the stock forward);
    - the ReLU module the stock forward calls last has hooks (the fused forward would not call it;
      torchvision's Bottleneck calls its one ``relu`` three times, so a ``relu``-preset UnitHooks
      sees all three calls only through the stock forward);
    - the block has a forward hook of anyone other than a means consumer (e.g. an ablation mask
      that replaces the output: the means must describe the output it leaves).
    """

    @staticmethod
    def of(block: nn.Module) -> "_FusedBlock | None":
        """The fused forward installed on ``block``, if any (it is the instance's ``forward``)."""
        owner = getattr(vars(block).get("forward"), "__self__", None)
        return owner if isinstance(owner, _FusedBlock) else None

    @staticmethod
    def supports(block: nn.Module) -> bool:
        # Not a block whose forward someone else replaced on the instance.
        installed = "forward" in vars(block)
        return _FusedBlock.of(block) is not None or (not installed and type(block) in _known_blocks())

    @classmethod
    def attach(cls, block: nn.Module, hooks, name: str):
        fused = cls.of(block) or cls(block)
        fused.consumers.append((hooks, name))
        return _Detach(fused, (hooks, name))

    def __init__(self, block: nn.Module):
        self.body, relu_name = _known_blocks()[type(block)]
        self.final_relu = getattr(block, relu_name)
        self.block = block
        # (UnitHooks, layer name) of each consumer; typed loosely: hooks.py imports this file.
        self.consumers: list[tuple[object, str]] = []
        block.forward = self.forward  # an instance attribute shadows the class's forward

    def _stock_needed(self, block: nn.Module) -> bool:
        relu = self.final_relu
        if relu._forward_hooks or relu._forward_pre_hooks:
            return True
        return not all(getattr(h, "_selectivity_means", False) for h in block._forward_hooks.values())

    def forward(self, x):
        block = self.block
        live = [(h, n) for h, n in self.consumers if h.enabled]
        if not live or self._stock_needed(block):
            return type(block).forward(block, x)
        # Here, not at the top: the epilogue imports selectivity.units (unit_means), whose
        # __init__ imports this file.
        from selectivity.epilogue import add_relu_means_
        # In place into the last BN's output, which nothing reads afterwards (torchvision's own
        # forward overwrites it too).
        y, means = add_relu_means_(*self.body(block, x))
        for hooks, name in live:
            hooks._deliver(name, means)
        return y

    def detach(self, consumer) -> None:
        self.consumers.remove(consumer)
        if not self.consumers:
            del self.block.forward  # the class's forward again


class _Detach:
    """A handle like a hook's: ``remove()`` takes one consumer off a fused block."""

    def __init__(self, fused: _FusedBlock, consumer):
        self.fused, self.consumer = fused, consumer

    def remove(self) -> None:
        if self.fused is not None:
            self.fused.detach(self.consumer)
            self.fused = None

