"""What a synthesis run leaves on disk: a PNG grid (a row per class), an .npz, and a JSON quality report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from shared.teacher import TeacherCard
from synth_service.result import SynthResult

DIVERSITY_DESCRIPTION = (
    "intra_class_diversity.<space>: over the classes with at least 2 images, the mean of the mean pairwise Euclidean "
    "distance between the unit-length embeddings of a class's images (0: identical; sqrt 2: unrelated; at most 2). "
    "teacher: the teacher's penultimate features, which the BPID diversity loss optimises, so it flatters BPID; "
    "pixel: the delivered uint8 images, each standardised over all its values, so a distance is sqrt(2 - 2 r) with r "
    "the Pearson correlation of the two images' pixels (no model); verifier: the penultimate features of "
    "synth.verifier, a model the losses never see (only when one is configured)")


def _mean_pairwise_distance(x: torch.Tensor) -> float:
    """Mean Euclidean distance over ordered pairs i != j of the rows of `x` (n >= 2), each scaled to unit length.

    From a float64 Gram matrix, so equal rows give 0 (cdist's matmul path leaves up to ~1e-3 there); a zero row has no
    direction and sits sqrt 2 from every row.
    """
    u = F.normalize(x.flatten(1).double(), dim=1)
    d = (2 - 2 * (u @ u.T)).clamp_(min=0).sqrt_()
    n = len(u)
    return float((d.sum() - d.diagonal().sum()) / (n * (n - 1)))


def _per_class(x: torch.Tensor, labels: torch.Tensor, embed) -> dict[int, float]:
    out = {}
    for c in labels.unique().tolist():
        rows = x[labels == c]
        if len(rows) >= 2:
            out[int(c)] = _mean_pairwise_distance(embed(rows))
    return out


def intra_class_diversity(features: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per class with at least 2 images: mean pairwise Euclidean distance between L2-normalised features."""
    return _per_class(features, labels, lambda f: f)


def _centred_pixels(images: torch.Tensor) -> torch.Tensor:
    x = images.flatten(1).double()
    return x - x.mean(dim=1, keepdim=True)  # the unit scaling after it makes dividing by the std redundant


def pixel_diversity(images: torch.Tensor, labels: torch.Tensor) -> dict[int, float]:
    """Per class with at least 2 images: intra-class diversity in pixel space, with no model involved.

    Each image (all channels and pixels as one vector) is standardised to zero mean and unit variance, then scaled
    to unit length; the figure is the mean Euclidean distance over ordered pairs of distinct images of the class,
    sqrt(2 - 2 r) for a pair whose pixels have Pearson correlation r. Identical images give 0, unrelated ones about
    sqrt 2, and the maximum is 2 (one the negative of the other). A constant image has no variance: it counts as
    unrelated (sqrt 2) to every image, even an identical copy. Embeddings are built per class, so memory is one class's
    images in float64.
    """
    return _per_class(images, labels, _centred_pixels)


def diversity_per_class(result: SynthResult) -> dict[str, dict[int, float]]:
    """Per-class intra-class diversity in each space the result allows: teacher, pixel and (when set) verifier."""
    spaces = {"teacher": intra_class_diversity(result.features, result.labels),
              "pixel": pixel_diversity(result.images, result.labels)}
    if result.verifier_features is not None:
        spaces["verifier"] = intra_class_diversity(result.verifier_features, result.labels)
    return spaces


def _class_mean(per_class: dict[int, float]) -> float | None:
    return float(np.mean(list(per_class.values()))) if per_class else None


def diversity_by_space(result: SynthResult) -> dict[str, float | None]:
    """The mean over classes of each space's figure; None where no class has 2 images."""
    return {space: _class_mean(d) for space, d in diversity_per_class(result).items()}


def mean_diversity(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Teacher-space (or any feature-space) figure averaged over classes; 0 when no class has 2 images."""
    return _class_mean(intra_class_diversity(features, labels)) or 0.0


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


BN_DISTANCE_DESCRIPTION = (
    "bn_distance_first / bn_distance_last: the weighted BN-statistics distance (on the jittered view) at the first "
    "and last iteration of the last phase, which is the full-resolution phase under a multi-resolution schedule, so "
    "both are at one resolution; bn_distance_fall = first / last")


def bn_phase_history(result: SynthResult) -> tuple[list[float], dict[str, Any]]:
    """The BN distances of the last phase, and which iterations those are; distances at different resolutions do
    not compare."""
    bn = result.history["bn"]
    res, iters = result.phases[-1] if result.phases else (None, len(bn))
    start = len(bn) - iters
    return bn[start:], {"resolution": res, "first_iteration": start, "last_iteration": len(bn) - 1,
                        "description": BN_DISTANCE_DESCRIPTION}


def build_report(result: SynthResult, card: TeacherCard, settings: dict[str, Any]) -> dict[str, Any]:
    labels = result.labels
    correct = result.teacher_top1 == labels
    verified = result.verifier_top1 == labels if result.verifier_top1 is not None else None
    diversity = diversity_per_class(result)
    per_class = {}
    for c in labels.unique().tolist():
        m = labels == c
        per_class[card.class_names[c]] = {
            "class_id": int(c),
            "images": int(m.sum()),
            "teacher_top1": float(correct[m].float().mean()),
            "teacher_confidence": float(result.teacher_confidence[m].mean()),
            "teacher_margin": float(result.teacher_margin[m].mean()),
            **({"verifier_top1": float(verified[m].float().mean())} if verified is not None else {}),
            "intra_class_diversity": {space: d.get(int(c)) for space, d in diversity.items()},
        }
    bn, bn_phase = bn_phase_history(result)
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
        **({"verifier_top1": float(verified.float().mean())} if verified is not None else {}),
        "intra_class_diversity": {space: _class_mean(d) for space, d in diversity.items()},
        "intra_class_diversity_description": DIVERSITY_DESCRIPTION,
        "bn_distance_first": bn[0],
        "bn_distance_last": bn[-1],
        "bn_distance_fall": bn[0] / bn[-1] if bn[-1] > 0 else None,
        "bn_distance_phase": bn_phase,
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
