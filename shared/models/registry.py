"""A timm-style registry: project models by name first, then any timm model.

Every model built here follows timm's head protocol (`forward_features`, `forward_head(x, pre_logits=True)`,
`get_classifier()`), so the inversion engine can read penultimate features from one forward.
"""
from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

from shared.errors import UnknownModelError

_MODEL_FNS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODEL_FNS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODEL_FNS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    """Names of the project's own models (timm's are listed by `timm.list_models()`)."""
    return sorted(_MODEL_FNS)


def is_model(name: str) -> bool:
    import timm

    return name in _MODEL_FNS or timm.is_model(name)


def create_model(name: str, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build an untrained model by name. Weights are loaded separately (see `shared.weights`)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name in _MODEL_FNS:
        return _MODEL_FNS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    import timm

    if timm.is_model(name):
        # Never pretrained=True: nothing is fetched from a hub; weights come from local files.
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    known = list_models()
    close = difflib.get_close_matches(name, known + timm.list_models(), n=5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {name!r}: not a project model ({', '.join(known)}) and not a timm model.{hint}"
    )
