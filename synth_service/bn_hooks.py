"""Forward hooks that measure each BatchNorm input's batch statistics against the layer's running statistics."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from synth_service.losses import bn_statistics_distance


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers with running statistics; refuses a model without any (checked before any hook)."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        raise ValueError("the teacher has no BatchNorm layers with running statistics; BN-statistics matching "
                         "needs them: use a teacher with BatchNorm (e.g. a ResNet or EfficientNet)")
    return layers


class BNStatsHooks:
    """Registered once per teacher, removed by `remove()`; `pop()` gives one distance per BN layer per forward.

    With a `probe` input, a dry forward keeps only the layers the forward reaches, in the order it reaches them.
    A layer called more than once per forward (a shared BatchNorm) gets the mean of its per-call distances.
    With `blend` = m > 0, each call's batch statistics are first blended with a running average of earlier
    forwards' (m·earlier + (1 − m)·this batch), so a small batch is pulled towards the statistics of many.
    """

    def __init__(self, model: nn.Module, probe: torch.Tensor | None = None, blend: float = 0.0):
        if not 0.0 <= blend < 1.0:
            raise ValueError(f"blend must be in [0, 1), got {blend}")
        self.blend = 0.0  # the probe must not seed the running average
        self._ema: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        layers = batchnorm_layers(model)
        self._log: list[tuple[int, torch.Tensor]] = []
        self._handles: list = []
        self._register(layers)
        self.calls = [1] * len(layers)  # calls per layer in one forward; known after a probe
        if probe is not None:
            try:
                with torch.no_grad():
                    model(probe)
                order = list(dict.fromkeys(k for k, _ in self._log))  # first-call order
                counts = [sum(k == j for k, _ in self._log) for j in order]
                self.remove()
                if not order:
                    raise ValueError("no BatchNorm layer of the teacher runs in its forward pass; "
                                     "BN-statistics matching needs at least one")
                self._register([layers[k] for k in order])
                self.calls = counts
            except BaseException:
                self.remove()
                raise
        self.blend = blend

    def _register(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self._handles = [m.register_forward_hook(partial(self._hook, k)) for k, m in enumerate(layers)]

    def _hook(self, k: int, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()  # bf16 activations under autocast: statistics in fp32
        dims = (0,) if x.dim() == 2 else (0, *range(2, x.dim()))
        if x.device.type == "cpu":
            # E[x^2] - E[x]^2: about 2x faster than var_mean's reduction on the CPU, and exact enough in fp32 for
            # activations whose mean is not orders of magnitude above their spread.
            mean = x.mean(dim=dims)
            var = (x.square().mean(dim=dims) - mean.square()).clamp_min(0)
        else:
            var, mean = torch.var_mean(x, dim=dims, correction=0)
        if self.blend > 0:
            key = (k, sum(j == k for j, _ in self._log))  # (layer, call) for a BatchNorm used twice
            if key in self._ema:
                old_mean, old_var = self._ema[key]
                mean = self.blend * old_mean + (1 - self.blend) * mean
                var = self.blend * old_var + (1 - self.blend) * var
            self._ema[key] = (mean.detach(), var.detach())
        self._log.append((k, bn_statistics_distance(mean, var, module.running_mean, module.running_var)))

    def pop(self) -> torch.Tensor:
        """Per-layer distances of the last forward, in `self.layers` order, as one (L,) tensor."""
        per_layer: list[list[torch.Tensor]] = [[] for _ in self.layers]
        for k, d in self._log:
            per_layer[k].append(d)
        self._log = []
        missing = [k for k, ds in enumerate(per_layer) if not ds]
        if missing:
            raise RuntimeError(f"BatchNorm layer(s) {missing} did not run in this forward; the teacher's forward "
                               "must reach the same BatchNorm layers on every call")
        return torch.stack([ds[0] if len(ds) == 1 else torch.stack(ds).mean() for ds in per_layer])

    def frozen(self) -> float:
        """Turn blending off (for a reporting forward) and return the setting for `unfreeze`."""
        blend, self.blend = self.blend, 0.0
        return blend

    def unfreeze(self, blend: float) -> None:
        self.blend = blend

    def reset_blend(self) -> None:
        """Forget the running average (a new generator starts from its own statistics)."""
        self._ema.clear()

    def clear(self) -> None:
        """Drop what a forward that failed part-way left behind."""
        self._log = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._log = []

    @property
    def active(self) -> bool:
        return bool(self._handles)
