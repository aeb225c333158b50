"""CIFAR ResNet-(6n+2) as InfoPro builds it, exposed as a flat list of *units*.

A unit is the smallest piece a split may cut after: the stem (conv-BN-ReLU) is unit 0, then every
BasicBlock of the three stages in order. Splits (``splits.py``) group consecutive units into local
modules; the classifier (global average pool + linear) always belongs to the last module.
"""
from __future__ import annotations

import math
import re

import torch
from torch import nn

from . import lean

STAGE_WIDTHS = (16, 32, 64)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+shortcut) -ReLU, with a 1x1 conv + BN projection (option B)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, droprate: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(droprate) if droprate > 0 else nn.Identity()
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )
        self.out_channels = planes
        self.stride = stride
        self.lean = False  # --lean-blocks: pgl_fast.lean's memory-lean backward (training, fp32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and self.training and torch.is_grad_enabled():
            return lean.lean_block_forward(self, x)
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.dropout(out)
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Stem(nn.Sequential):
    def __init__(self, in_channels: int = 3, width: int = 16):
        super().__init__(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.out_channels = width
        self.stride = 1


class Classifier(nn.Module):
    """Global average pool + linear: the network's own output head."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


def blocks_per_stage(arch: str) -> int:
    """``resnet32`` -> 5. Any depth 6n+2 (n >= 1) is accepted."""
    m = re.fullmatch(r"resnet(\d+)", arch)
    if not m or (int(m.group(1)) - 2) % 6 != 0 or int(m.group(1)) < 8:
        raise ValueError(
            f"--arch {arch!r} is not a CIFAR ResNet-(6n+2); use e.g. resnet20, resnet32, resnet56, resnet110"
        )
    return (int(m.group(1)) - 2) // 6


def build_units(arch: str, droprate: float = 0.0) -> list[nn.Module]:
    """Stem followed by the 3n BasicBlocks, in forward order."""
    n = blocks_per_stage(arch)
    units: list[nn.Module] = [Stem()]
    inplanes = 16
    for stage, planes in enumerate(STAGE_WIDTHS):
        for b in range(n):
            stride = 2 if (stage > 0 and b == 0) else 1
            units.append(BasicBlock(inplanes, planes, stride, droprate))
            inplanes = planes
    return units


def unit_stage(arch: str, unit: int) -> tuple[int, int]:
    """Global unit index -> InfoPro's ``(stage, block)`` (stem is stage 0, block 0)."""
    n = blocks_per_stage(arch)
    if unit == 0:
        return (0, 0)
    return (1 + (unit - 1) // n, (unit - 1) % n)


def unit_shapes(arch: str, image_size: int) -> list[tuple[int, int]]:
    """(channels, spatial size) of every unit's output for a square input."""
    units = build_units(arch)
    size = image_size
    shapes = []
    for u in units:
        size = math.ceil(size / u.stride)
        shapes.append((u.out_channels, size))
    return shapes


def init_infopro_(model: nn.Module) -> None:
    """InfoPro's initialisation: every conv N(0, sqrt(2/(k*k*out))), BN weight 1 / bias 0.

    It runs over the whole network after the aux heads and decoders exist, so their convs are
    initialised the same way; linear layers keep PyTorch's defaults.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
