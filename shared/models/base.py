"""Common head for the project's CNNs, matching timm's `forward_features` / `forward_head` protocol."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn


class PooledClassifier(nn.Module):
    """Global-average-pool + linear head. Subclasses build `self.stem`, `self.stages` and `self.final`."""

    num_features: int

    def _init_head(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.final(x)

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None,
                              intermediates_only: bool = False, output_fmt: str = "NCHW",
                              ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's protocol over the stages: the outputs of the stages in `indices` (an int n: the last n), and the
        final features for `forward_head` unless `intermediates_only`."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: these CNNs give NCHW maps only")
        count = len(self.stages)
        if indices is None:
            indices = count
        wanted = list(range(count - indices, count)) if isinstance(indices, int) else [i % count for i in indices]
        if not all(0 <= i < count for i in wanted):
            raise IndexError(f"stage indices {indices} out of range for {count} stages")
        x = self.stem(x)
        maps = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in wanted:
                maps.append(x)
            if intermediates_only and i == max(wanted):
                return maps
        return self.final(x), maps

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def residual_stages(block: Callable[[int, int, int], nn.Module], cin: int, widths: Sequence[int],
                    depths: Sequence[int]) -> nn.ModuleList:
    """Stages of `block(cin, cout, stride)`; every stage after the first halves the resolution in its first block."""
    stages = []
    for i, (width, depth) in enumerate(zip(widths, depths)):
        blocks = []
        for j in range(depth):
            blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
            cin = width
        stages.append(nn.Sequential(*blocks))
    return nn.ModuleList(stages)


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )
