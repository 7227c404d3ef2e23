"""What a synthesis run leaves on disk: a PNG grid (a row per class), an .npz, and a JSON quality report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared.teacher import TeacherCard
from synth_service.engine import SynthResult


def intra_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Mean pairwise Euclidean distance between L2-normalised features, per class with at least 2 images."""
    out = {}
    for c in labels.unique().tolist():
        f = features[labels == c]
        if len(f) < 2:
            continue
        d = torch.cdist(f, f)
        out[int(c)] = float(d.sum() / (len(f) * (len(f) - 1)))
    return out


def mean_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    per_class = intra_class_diversity(features, labels)
    return float(np.mean(list(per_class.values()))) if per_class else 0.0


def grid_image(images: torch.Tensor, labels: torch.Tensor, min_tile: int = 48) -> Image.Image:
    """A row per class (in first-seen order), tiles upscaled with nearest-neighbour to at least `min_tile` px."""
    classes = list(dict.fromkeys(labels.tolist()))
    rows = [images[labels == c] for c in classes]
    cols = max(len(r) for r in rows)
    n, c, h, w = images.shape
    scale = max(1, -(-min_tile // h))
    pad = 2
    th, tw = h * scale + pad, w * scale + pad
    canvas = np.full((len(rows) * th + pad, cols * tw + pad, c), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for k, img in enumerate(row):
            tile = img.permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
            y0, x0 = pad + r * th, pad + k * tw
            canvas[y0:y0 + h * scale, x0:x0 + w * scale] = tile
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas[..., :3])


def build_report(result: SynthResult, card: TeacherCard, settings: dict[str, Any]) -> dict[str, Any]:
    labels = result.labels
    correct = result.teacher_top1 == labels
    diversity = intra_class_diversity(result.features, labels)
    per_class = {}
    for c in labels.unique().tolist():
        m = labels == c
        per_class[card.class_names[c]] = {
            "class_id": int(c),
            "images": int(m.sum()),
            "teacher_top1": float(correct[m].float().mean()),
            "teacher_confidence": float(result.teacher_confidence[m].mean()),
            "teacher_margin": float(result.teacher_margin[m].mean()),
            "intra_class_diversity": diversity.get(int(c)),
        }
    bn = result.history["bn"]
    n = len(labels)
    return {
        "teacher": {"name": card.name, "arch": card.arch, "fingerprint": card.fingerprint,
                    "image_size": card.image_size},
        "images": n,
        "iterations": result.iterations,
        "seconds": result.seconds,
        "images_per_second": n / result.seconds if result.seconds > 0 else None,
        "teacher_top1": float(correct.float().mean()),
        "teacher_confidence": float(result.teacher_confidence.mean()),
        "teacher_margin": float(result.teacher_margin.mean()),
        "intra_class_diversity": float(np.mean(list(diversity.values()))) if diversity else None,
        "bn_distance_first": bn[0],
        "bn_distance_last": bn[-1],
        "bn_distance_fall": bn[0] / bn[-1] if bn[-1] > 0 else None,
        "final_terms": result.final_terms,
        "last_iteration_terms": {k: v[-1] for k, v in result.history.items()},
        "per_class": per_class,
        "settings": settings,
    }


def write_outputs(result: SynthResult, card: TeacherCard, out_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Write grid.png, images.npz and report.json into `out_dir`; return the report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    grid_image(result.images, result.labels).save(out_dir / "grid.png")
    arrays = {
        "images": result.images.numpy(),  # (N, C, H, W) uint8
        "labels": result.labels.numpy(),
        "teacher_top1": result.teacher_top1.numpy(),
        "teacher_confidence": result.teacher_confidence.numpy(),
    }
    if result.logits is not None:
        arrays["teacher_logits"] = result.logits.numpy()
    np.savez_compressed(out_dir / "images.npz", **arrays)
    report = build_report(result, card, settings)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
