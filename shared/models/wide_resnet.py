"""Wide ResNets (Zagoruyko & Komodakis) for 32x32 inputs: pre-activation blocks, final BN-ReLU."""
from __future__ import annotations

import torch
import torch.nn as nn

from shared.models.base import PooledClassifier, residual_stages
from shared.models.registry import register_model


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None if (cin == cout and stride == 1) else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        # The projection reads the pre-activated input, as in the original WRN.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(PooledClassifier):
    def __init__(self, depth: int, widen: int, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.stages = residual_stages(WideBlock, 16, widths, (n, n, n))
        self.final = nn.Sequential(nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self._init_head(widths[-1], num_classes)


@register_model
def wrn_40_2(num_classes: int = 10, in_chans: int = 3) -> WideResNet:
    return WideResNet(40, 2, num_classes, in_chans)


@register_model
def wrn_16_2(num_classes: int = 10, in_chans: int = 3) -> WideResNet:
    return WideResNet(16, 2, num_classes, in_chans)
