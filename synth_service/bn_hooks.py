"""Forward hooks that measure each BatchNorm input's batch statistics against the layer's running statistics."""
from __future__ import annotations

import torch
import torch.nn as nn

from synth_service.losses import bn_statistics_distance


class BNStatsHooks:
    """Registered once per teacher, removed by `remove()`; each forward appends one distance per BN layer."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not self.layers:
            raise ValueError("the teacher has no BatchNorm layers with running statistics; "
                             "BN-statistics matching needs them")
        self.distances: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()  # bf16 activations under autocast: statistics in fp32
        dims = (0,) if x.dim() == 2 else (0, *range(2, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        self.distances.append(bn_statistics_distance(mean, var, module.running_mean, module.running_var))

    def pop(self) -> torch.Tensor:
        """Per-layer distances of the last forward, in call order, as one (L,) tensor."""
        out = torch.stack(self.distances)
        self.distances = []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.distances = []

    @property
    def active(self) -> bool:
        return bool(self._handles)
