"""Turn an existing classifier into a teacher card + safetensors: local weights, or timm's pretrained weights.

The only place that may fetch weights, and only when asked to (`--pretrained`); services load the written files.
"""
from __future__ import annotations

from pathlib import Path

from shared.errors import WeightsError
from shared.teacher import TeacherCard, data_config, teacher_from_arch
from shared.weights import fingerprint, save_weights


def _pretrained_model(arch: str):
    import timm

    if not timm.is_model(arch):
        raise WeightsError(f"--pretrained needs a timm model name; {arch!r} is not one")
    try:
        return timm.create_model(arch, pretrained=True)
    except Exception as exc:  # hub unreachable, no weights for this name, ...
        raise WeightsError(f"could not fetch timm's pretrained weights for {arch!r}: {exc}. On a machine without "
                           f"network access, download them elsewhere and pass --weights FILE") from None


def _imagenet_names(num_classes: int) -> list[str] | None:
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        names = [info.index_to_description(i) for i in range(num_classes)]
        return names if len(set(names)) == num_classes else None
    except Exception:  # older timm, or not ImageNet-1k
        return None


def import_teacher(arch: str, out_dir: Path, name: str, *, weights: Path | None = None, pretrained: bool = False,
                   num_classes: int = 1000, in_chans: int = 3, image_size: int | None = None,
                   class_names: list[str] | None = None) -> Path:
    """Write `<out_dir>/<name>.safetensors` and `<name>.json`; return the card path."""
    if pretrained == (weights is not None):
        raise WeightsError("give exactly one of --weights FILE and --pretrained")
    if pretrained:
        model = _pretrained_model(arch)
        cfg = model.pretrained_cfg
        num_classes, in_chans = model.num_classes, cfg.get("input_size", (in_chans,))[0]
        data = data_config(model)
        mean, std, interpolation = data["mean"], data["std"], data["interpolation"]
        image_size = image_size or data["image_size"]
        recipe = {"source": "timm-pretrained", "pretrained_tag": cfg.get("tag")}
    else:  # mean, std, size and interpolation from timm's pretrained_cfg for the name, unless given
        teacher = teacher_from_arch(arch, num_classes=num_classes, in_chans=in_chans, weights=weights,
                                    image_size=image_size)
        model, mean, std = teacher.model, teacher.card.mean, teacher.card.std
        image_size, interpolation = teacher.card.image_size, teacher.card.interpolation
        recipe = {"source": "local-weights", "file": Path(weights).name}
    if class_names is None and num_classes == 1000:
        class_names = _imagenet_names(num_classes)
    out_dir = Path(out_dir)
    save_weights(model, out_dir / f"{name}.safetensors")
    card = TeacherCard(name=name, arch=arch, num_classes=num_classes, in_chans=in_chans, image_size=image_size,
                       mean=tuple(mean)[:in_chans], std=tuple(std)[:in_chans], interpolation=interpolation,
                       class_names=class_names or [str(i) for i in range(num_classes)],
                       fingerprint=fingerprint(model.state_dict()), weights=f"{name}.safetensors", recipe=recipe)
    card_path = out_dir / f"{name}.json"
    card.write(card_path)
    return card_path
