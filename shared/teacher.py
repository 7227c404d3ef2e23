"""Teachers: a frozen classifier plus the metadata every synthetic batch carries (size, mean/std, fingerprint)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn
from pydantic import BaseModel, Field, model_validator

from shared.errors import WeightsError
from shared.models import create_model
from shared.weights import fingerprint, load_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherCard(BaseModel):
    """The JSON card written beside a teacher's safetensors file."""

    name: str
    arch: str
    num_classes: int = Field(ge=1)
    in_chans: int = Field(ge=1, le=4)
    image_size: int = Field(ge=4, le=1024)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"  # how real images are resized to image_size (timm's pretrained_cfg name)
    class_names: list[str]
    fingerprint: str = ""
    weights: str | None = None  # file name relative to the card; None = random init (speed benchmarks only)
    metrics: dict[str, float] = Field(default_factory=dict)
    recipe: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> "TeacherCard":
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"mean/std need {self.in_chans} values, got {len(self.mean)}/{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be > 0")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        return self

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> "TeacherCard":
        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"teacher card not found: {path}")
        return cls.model_validate_json(path.read_text())


@dataclass
class Teacher:
    model: nn.Module
    card: TeacherCard


def load_teacher(card_path: Path) -> Teacher:
    """Build the architecture named by a card and load its weights (fingerprint checked)."""
    card_path = Path(card_path)
    card = TeacherCard.read(card_path)
    model = create_model(card.arch, num_classes=card.num_classes, in_chans=card.in_chans)
    if card.weights is None:
        card.fingerprint = fingerprint(model.state_dict())
    else:
        state = load_weights(model, card_path.parent / card.weights)
        actual = fingerprint(state)
        if card.fingerprint and card.fingerprint != actual:
            raise WeightsError(f"weights fingerprint {actual[:12]} does not match the card's {card.fingerprint[:12]}")
        card.fingerprint = actual
    return Teacher(model.eval(), card)


def data_config(model: nn.Module) -> dict[str, Any]:
    """Mean, std, image size and interpolation from a timm model's `pretrained_cfg`, else ImageNet at 224 px."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"mean": tuple(cfg.get("mean") or IMAGENET_MEAN), "std": tuple(cfg.get("std") or IMAGENET_STD),
            "image_size": int((cfg.get("input_size") or (3, 224, 224))[-1]),
            "interpolation": cfg.get("interpolation") or "bilinear"}


def teacher_from_arch(arch: str, num_classes: int = 1000, in_chans: int = 3, image_size: int | None = None,
                      weights: Path | None = None, mean: tuple[float, ...] | None = None,
                      std: tuple[float, ...] | None = None, class_names: list[str] | None = None,
                      interpolation: str | None = None) -> Teacher:
    """A teacher from a model name (project or timm) and optional local weights.

    Mean, std, image size and interpolation not given here come from the model's timm `pretrained_cfg`
    (e.g. 0.5/0.5 at 299 px for inception_v3), else ImageNet statistics at 224 px.
    """
    model = create_model(arch, num_classes=num_classes, in_chans=in_chans)
    state = load_weights(model, Path(weights)) if weights is not None else model.state_dict()
    cfg = data_config(model)
    mean, std = mean or cfg["mean"], std or cfg["std"]
    card = TeacherCard(
        name=arch, arch=arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size or cfg["image_size"],
        mean=tuple(mean)[:in_chans], std=tuple(std)[:in_chans], interpolation=interpolation or cfg["interpolation"],
        class_names=class_names or [str(i) for i in range(num_classes)],
        fingerprint=fingerprint(state), weights=str(weights) if weights else None,
    )
    return Teacher(model.eval(), card)


def resolve_teacher(ref: str | Path, weights: Path | None = None) -> Teacher:
    """A card path (`*.json`), or a model name (project or timm) with optional local weights."""
    ref = str(ref)
    if ref.endswith(".json") or Path(ref).is_file():
        if weights is not None:
            raise WeightsError("--weights is for model names; a teacher card names its own weights file")
        return load_teacher(Path(ref))
    return teacher_from_arch(ref, weights=weights)
