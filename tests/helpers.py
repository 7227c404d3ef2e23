"""Small helpers for tests (imported as `helpers`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import torch

from shared.teacher import TeacherCard


def accuracy(model: torch.nn.Module, card: TeacherCard, images_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 of `model` (normalised with `card`'s mean/std) on uint8 images."""
    mean = torch.tensor(card.mean).view(1, -1, 1, 1)
    std = torch.tensor(card.std).view(1, -1, 1, 1)
    with torch.no_grad():
        pred = model.eval()((images_uint8.float() / 255 - mean) / std).argmax(1)
    return float((pred == labels).float().mean())
