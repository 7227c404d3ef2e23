"""Response bodies for synthesized images: one PNG, a PNG grid (a row per class), a zip of PNGs, or an .npz."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import torch
from PIL import Image

from synth_service.result import SynthResult
from synth_service.report import grid_image

MEDIA_TYPES = {"png": "image/png", "zip": "application/zip", "npz": "application/octet-stream"}


def png_bytes(image: torch.Tensor) -> bytes:
    """One (C, H, W) uint8 image as PNG."""
    array = image.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def image_figures(result: SynthResult, i: int, age_s: np.ndarray | None = None) -> dict[str, float | int]:
    """One image's quality figures, as the zip manifest gives them."""
    out = {"teacher_top1": int(result.teacher_top1[i]), "teacher_confidence": float(result.teacher_confidence[i]),
           "teacher_margin": float(result.teacher_margin[i])}
    if result.verifier_top1 is not None:
        out["verifier_top1"] = int(result.verifier_top1[i])
    if age_s is not None:
        out["age_s"] = round(float(age_s[i]), 3)
    return out


def quality_headers(result: SynthResult, age_s: np.ndarray | None = None) -> dict[str, str]:
    """A summary of the images' figures, for responses whose body cannot carry them (a PNG)."""
    hit = lambda pred: f"{float((pred == result.labels).float().mean()):.4f}"  # noqa: E731
    headers = {"X-Teacher-Top1": hit(result.teacher_top1),
               "X-Teacher-Confidence-Mean": f"{float(result.teacher_confidence.mean()):.4f}",
               "X-Teacher-Margin-Mean": f"{float(result.teacher_margin.mean()):.4f}"}
    if result.verifier_top1 is not None:
        headers["X-Verifier-Top1"] = hit(result.verifier_top1)
    if age_s is not None:
        headers["X-Image-Age-Max-S"] = f"{float(age_s.max()):.3f}"
    return headers


def encode_result(result: SynthResult, fmt: str, class_names: list[str], age_s: np.ndarray | None = None) -> bytes:
    """`age_s`: per image, seconds since it was made (images served from the pool)."""
    if fmt == "png":
        if len(result.labels) == 1:
            return png_bytes(result.images[0])
        buf = io.BytesIO()
        grid_image(result.images, result.labels).save(buf, format="PNG")
        return buf.getvalue()
    if fmt == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            manifest = []
            for i, (image, label) in enumerate(zip(result.images, result.labels.tolist())):
                name = f"{i:05d}_class{label}.png"
                zf.writestr(name, png_bytes(image))
                manifest.append({"file": name, "class_id": label, "class_name": class_names[label],
                                 **image_figures(result, i, age_s)})
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
        return buf.getvalue()
    if fmt == "npz":
        buf = io.BytesIO()
        arrays = {"images": result.images.numpy(), "labels": result.labels.numpy(),
                  "teacher_top1": result.teacher_top1.numpy(),
                  "teacher_confidence": result.teacher_confidence.numpy(),
                  "teacher_margin": result.teacher_margin.numpy()}
        if result.verifier_top1 is not None:
            arrays["verifier_top1"] = result.verifier_top1.numpy()
        if age_s is not None:
            arrays["age_s"] = age_s
        if result.logits is not None:
            arrays["teacher_logits"] = result.logits.numpy().astype(np.float32)
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()
    raise ValueError(f"unknown format {fmt!r}")
