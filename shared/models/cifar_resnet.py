"""ResNets for 32x32 inputs, 3x3 stem and no max-pool: ResNet-18/34 (four stages, 64-512 channels, the standard
data-free KD variants) and the CIFAR ResNet-8/20 (three stages of 16/32/64 channels, depth 6n+2), small enough to
train and invert on a CPU. Their downsampling shortcuts are 1x1 convolutions (He et al.'s option B: 272k parameters
for ResNet-20, against 270k with the zero-padded option A)."""
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
    def __init__(self, layers: tuple[int, ...], num_classes: int = 10, in_chans: int = 3,
                 widths: tuple[int, ...] = (64, 128, 256, 512)):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, widths[0])
        self.stages = residual_stages(BasicBlock, widths[0], widths, layers)
        self.final = nn.Identity()
        self._init_head(widths[-1], num_classes)


def _thin_resnet(depth: int, num_classes: int, in_chans: int) -> CifarResNet:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
    n = (depth - 2) // 6
    return CifarResNet((n, n, n), num_classes, in_chans, widths=(16, 32, 64))


@register_model
def resnet8(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return _thin_resnet(8, num_classes, in_chans)


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return _thin_resnet(20, num_classes, in_chans)


@register_model
def resnet18_cifar(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet((2, 2, 2, 2), num_classes, in_chans)


@register_model
def resnet34_cifar(num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    return CifarResNet((3, 4, 6, 3), num_classes, in_chans)
