"""Logits and penultimate (pre-logits) features from one teacher forward, for timm-style classifiers.

The diversity loss needs the pre-logits features, so the engine reads them through timm's
`forward_features` / `forward_head(x, pre_logits=True)` and checks once that its logits equal `model(x)`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from shared.errors import InvalidRequestError


class TeacherHead:
    """Callable `x -> (logits, pre_logits)`; refuses, at construction, any teacher it cannot read exactly."""

    def __init__(self, model: nn.Module, probe: torch.Tensor, arch: str):
        self.model = model
        if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
            raise InvalidRequestError(
                f"teacher {arch!r} does not follow timm's head protocol: it has no forward_features / forward_head, "
                "so the engine cannot read its penultimate features; use a timm model or add those two methods")
        shape = tuple(probe.shape)
        with torch.no_grad():  # fp32 even when the loop runs under bf16 autocast
            try:
                direct = model(probe)
            except Exception as exc:
                raise InvalidRequestError(f"teacher {arch!r} fails on a {shape} input: {exc}. Check the card's "
                                          "image_size and in_chans against the model") from exc
            if not isinstance(direct, torch.Tensor) or direct.dim() != 2:
                got = type(direct).__name__ if not isinstance(direct, torch.Tensor) else f"shape {tuple(direct.shape)}"
                raise InvalidRequestError(
                    f"teacher {arch!r} returns {got} from forward(), not one (N, classes) logits tensor; build it "
                    "without auxiliary outputs (e.g. timm's aux_logits=False) or wrap it to return the logits only")
            try:
                feats = model.forward_features(probe)
                pre = model.forward_head(feats, pre_logits=True)
            except Exception as exc:
                raise InvalidRequestError(f"teacher {arch!r}: forward_head(forward_features(x), pre_logits=True) "
                                          f"fails ({exc}); the engine needs it for penultimate features") from exc
            if not isinstance(pre, torch.Tensor) or pre.dim() != 2 or pre.shape[0] != shape[0]:
                got = type(pre).__name__ if not isinstance(pre, torch.Tensor) else f"shape {tuple(pre.shape)}"
                raise InvalidRequestError(
                    f"teacher {arch!r}: forward_head(..., pre_logits=True) gives {got}, not (N, features); "
                    "build it with a global pool (timm: global_pool='avg')")
            # A linear classifier on the pre-logits saves re-running the head; anything else (a 1x1 conv,
            # a pair of distilled heads) gets its logits from forward_head itself.
            classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
            self.linear = None
            if isinstance(classifier, nn.Linear) and classifier.in_features == pre.shape[1] \
                    and _same(classifier(pre), direct):
                self.linear = classifier
            elif not _same(model.forward_head(feats), direct):
                raise InvalidRequestError(
                    f"teacher {arch!r} does not follow timm's head protocol: forward_head(forward_features(x)) "
                    "differs from forward(x), so the engine cannot read its penultimate features; "
                    "make forward() equal forward_head(forward_features(x))")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        pre = self.model.forward_head(feats, pre_logits=True)
        logits = self.linear(pre) if self.linear is not None else self.model.forward_head(feats)
        return logits, pre


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, atol=1e-4, rtol=1e-4)
