"""Small nets for the 1-channel digits demo: a BN CNN teacher/student and a BN-free LeNet-style verifier."""
from __future__ import annotations

import torch.nn as nn

from shared.models.base import PooledClassifier, conv_bn_relu
from shared.models.registry import register_model


class DigitsCNN(PooledClassifier):
    """VGG-style BN CNN; two 2x poolings, so it works from 8x8 inputs upward."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.stem = conv_bn_relu(in_chans, w)
        self.stages = nn.ModuleList([
            nn.Sequential(conv_bn_relu(w, w), nn.MaxPool2d(2)),
            nn.Sequential(conv_bn_relu(w, 2 * w), conv_bn_relu(2 * w, 2 * w), nn.MaxPool2d(2)),
            conv_bn_relu(2 * w, 4 * w),
        ])
        self.final = nn.Identity()
        self._init_head(4 * w, num_classes)


class DigitsLeNet(PooledClassifier):
    """A different architecture on purpose (5x5 kernels, no BatchNorm): used as an independent verifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 24):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_chans, w, 5, padding=2), nn.ReLU(inplace=True))
        self.stages = nn.ModuleList([
            nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 5, padding=2), nn.ReLU(inplace=True)),
            nn.Sequential(nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True)),
        ])
        self.final = nn.Dropout(0.2)
        self._init_head(4 * w, num_classes)


@register_model
def digits_cnn(num_classes: int = 10, in_chans: int = 1, **kwargs) -> DigitsCNN:
    return DigitsCNN(num_classes, in_chans, width=kwargs.pop("width", 32), **kwargs)


@register_model
def digits_cnn_small(num_classes: int = 10, in_chans: int = 1, **kwargs) -> DigitsCNN:
    return DigitsCNN(num_classes, in_chans, width=kwargs.pop("width", 12), **kwargs)


@register_model
def digits_lenet(num_classes: int = 10, in_chans: int = 1, **kwargs) -> DigitsLeNet:
    return DigitsLeNet(num_classes, in_chans, **kwargs)
