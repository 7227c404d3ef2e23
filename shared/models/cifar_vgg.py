"""A VGG-style CIFAR net with GroupNorm: the independent verifier of synthetic CIFAR images.

It shares nothing with the ResNet teachers that BN-statistics inversion could fit: no BatchNorm, no residuals.
"""
from __future__ import annotations

import torch.nn as nn

from shared.models.base import PooledClassifier
from shared.models.registry import register_model


def conv_gn_relu(cin: int, cout: int, groups: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
                         nn.ReLU(inplace=True))


class CifarVGG(PooledClassifier):
    """Six 3x3 convs in three stages of two, 2x max-pool after each: 32 -> 4 px at 32 px input."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32):
        super().__init__()
        w = width
        self.stem = conv_gn_relu(in_chans, w)
        self.stages = nn.ModuleList([
            nn.Sequential(conv_gn_relu(w, w), nn.MaxPool2d(2)),
            nn.Sequential(conv_gn_relu(w, 2 * w), conv_gn_relu(2 * w, 2 * w), nn.MaxPool2d(2)),
            nn.Sequential(conv_gn_relu(2 * w, 4 * w), conv_gn_relu(4 * w, 4 * w), nn.MaxPool2d(2)),
        ])
        self.final = nn.Identity()
        self._init_head(4 * w, num_classes)


@register_model
def vgg7_gn(num_classes: int = 10, in_chans: int = 3, **kwargs) -> CifarVGG:
    return CifarVGG(num_classes, in_chans, width=kwargs.pop("width", 32), **kwargs)
