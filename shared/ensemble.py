"""A teacher ensemble (LIB-KD): the primary teacher, which drives synthesis, and further members whose logits are
computed once, on the images as delivered, and shipped with every batch.

Members may differ in architecture and normalisation, but must classify the same classes from the same input, or
their logits would not mean the same thing. See docs/architecture.md §5.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from shared.errors import DfkdError
from shared.models import create_model
from shared.teacher import Teacher, resolve_teacher
from shared.wire import LOGIT_VIEWS, MAX_MEMBERS


class EnsembleError(DfkdError, ValueError):
    """Ensemble members that cannot be combined (other classes, input size or channels, or listed twice)."""


@dataclass
class Ensemble:
    members: list[Teacher]  # members[0] is the primary teacher

    @classmethod
    def load(cls, primary: Teacher, refs: list[Path | str]) -> "Ensemble":
        """The primary teacher plus the members named by `refs` (cards or model names), each checked."""
        members = [primary]
        for ref in refs:
            try:
                member = resolve_teacher(ref)
            except (DfkdError, OSError) as exc:
                raise EnsembleError(f"ensemble member {str(ref)!r} cannot be loaded: {exc}") from exc
            members.append(member)
        ensemble = cls(members)
        ensemble.check()
        return ensemble

    def check(self) -> None:
        if len(self.members) > MAX_MEMBERS:
            raise EnsembleError(f"{len(self.members)} ensemble members; at most {MAX_MEMBERS} (the teacher included)")
        first = self.members[0].card
        seen = {first.fingerprint: first.name}
        for member in self.members[1:]:
            c = member.card
            for what, theirs, ours in (("classes", c.num_classes, first.num_classes),
                                       ("channels", c.in_chans, first.in_chans),
                                       ("input size", c.image_size, first.image_size)):
                if theirs != ours:
                    raise EnsembleError(f"ensemble member {c.name!r} ({c.arch}) has {what} {theirs}; the teacher "
                                        f"{first.name!r} has {ours}: every member must classify the same images")
            if c.class_names != first.class_names:
                raise EnsembleError(f"ensemble member {c.name!r} names its classes differently from the teacher "
                                    f"{first.name!r}; its logit columns would not mean the same classes")
            if c.fingerprint in seen:
                raise EnsembleError(f"ensemble member {c.name!r} has the same weights as {seen[c.fingerprint]!r}: "
                                    "each member must be listed once")
            seen[c.fingerprint] = c.name

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(m.card.fingerprint for m in self.members)

    @property
    def fingerprint(self) -> str:
        """One id for the whole ensemble, in member order."""
        return hashlib.sha256(",".join(self.fingerprints).encode()).hexdigest()

    @property
    def names(self) -> list[str]:
        return [m.card.name for m in self.members]

    def to(self, device: torch.device | str) -> "Ensemble":
        for m in self.members:
            m.model.to(device).eval().requires_grad_(False)
        return self

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor, views: tuple[str, ...] = LOGIT_VIEWS, batch_size: int = 512,
               amp: torch.dtype | None = None) -> torch.Tensor:
        """fp32 [M, V, N, K] of every member on uint8 NCHW `pixels`, each in its own normalisation, for each view."""
        unknown = [v for v in views if v not in LOGIT_VIEWS]
        if unknown:
            raise EnsembleError(f"unknown logit view(s) {unknown}; known: {list(LOGIT_VIEWS)}")
        out = []
        for member in self.members:
            device = next(member.model.parameters()).device
            per_view = []
            for view in views:
                rows = []
                for i in range(0, len(pixels), batch_size):
                    x = pixels[i:i + batch_size].to(device)
                    if view == "hflip":
                        x = torch.flip(x, dims=(3,))
                    rows.append(member_logits(member, x, amp))
                per_view.append(torch.cat(rows))
            out.append(torch.stack(per_view))
        return torch.stack(out).cpu()


def member_logits(member: Teacher, pixels: torch.Tensor, amp: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits of one member on uint8 images already on its device."""
    card, model = member.card, member.model
    mean = torch.tensor(card.mean, device=pixels.device).view(1, -1, 1, 1)
    std = torch.tensor(card.std, device=pixels.device).view(1, -1, 1, 1)
    x = (pixels.float() / 255 - mean) / std
    with torch.autocast(pixels.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        return _eval(model)(x).float()


def _eval(model: nn.Module) -> nn.Module:
    if model.training:
        model.eval()
    return model


def hook_free_copy(teacher: Teacher) -> Teacher:
    """A fresh copy of `teacher` (the architecture rebuilt, the weights loaded): another thread can run it while the
    original is hooked (BN statistics) and in use. Rebuilt rather than deep-copied, since a model in use may hold
    non-leaf tensors that cannot be copied."""
    card = teacher.card
    model = create_model(card.arch, num_classes=card.num_classes, in_chans=card.in_chans)
    model.load_state_dict(teacher.model.state_dict())
    device = next(teacher.model.parameters()).device
    return Teacher(model.to(device).eval().requires_grad_(False), card)
