"""RedNet-style involution networks (Li et al., CVPR 2021) at the digits and CIFAR sizes: residual blocks whose
spatial mixing is an involution instead of a 3x3 convolution. They keep BatchNorm, so they can be inverted, and their
inductive bias differs from the convolutional teachers' (an ensemble member with another view of the data)."""
from __future__ import annotations

import torch
import torch.nn as nn

from shared.models.base import PooledClassifier, conv_bn_relu, residual_stages
from shared.models.involution import Involution2d
from shared.models.registry import register_model


class InvolutionBlock(nn.Module):
    """1x1 conv + BN + ReLU, involution + BN + ReLU, 1x1 conv + BN, plus the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, kernel_size: int = 5):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.involution = Involution2d(cout, kernel_size, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv3 = nn.Sequential(nn.Conv2d(cout, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn2(self.involution(self.conv1(x))))
        return self.relu(self.conv3(out) + self.shortcut(x))


class RedNet(PooledClassifier):
    def __init__(self, depths: tuple[int, ...], widths: tuple[int, ...], num_classes: int, in_chans: int,
                 kernel_size: int):
        super().__init__()
        self.stem = conv_bn_relu(in_chans, widths[0])
        self.stages = residual_stages(lambda cin, cout, stride: InvolutionBlock(cin, cout, stride, kernel_size),
                                      widths[0], widths, depths)
        self.final = nn.Identity()
        self._init_head(widths[-1], num_classes)


@register_model
def rednet_digits(num_classes: int = 10, in_chans: int = 1, **kwargs) -> RedNet:
    """16 px digits: two stages of 32 and 64 channels (16 -> 8 px), 5x5 involutions."""
    return RedNet((1, 2), (32, 64), num_classes, in_chans, kernel_size=kwargs.pop("kernel_size", 5), **kwargs)


@register_model
def rednet_cifar(num_classes: int = 10, in_chans: int = 3, **kwargs) -> RedNet:
    """32 px CIFAR: three stages of 16, 32 and 64 channels, two blocks each (32 -> 8 px), 5x5 involutions."""
    return RedNet((2, 2, 2), (16, 32, 64), num_classes, in_chans, kernel_size=kwargs.pop("kernel_size", 5),
                  **kwargs)
