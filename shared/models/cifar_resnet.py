"""ResNet-18/34 for 32x32 inputs: 3x3 stem, no max-pool (the standard data-free KD CIFAR variants)."""
from __future__ import annotations

import torch
import torch.nn as nn

from shared.models.base import PooledClassifier, conv_bn_relu, residual_stages
from shared.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(PooledClassifier):
    def __init__(self, layers: tuple[int, ...], num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, 64)
        self.stages = residual_stages(BasicBlock, 64, (64, 128, 256, 512), layers)
        self.final = nn.Identity()
        self._init_head(512, num_classes)


@register_model
def resnet18_cifar(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), num_classes, in_chans)


@register_model
def resnet34_cifar(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet((3, 4, 6, 3), num_classes, in_chans)
