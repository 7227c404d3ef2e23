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


def encode_result(result: SynthResult, fmt: str, class_names: list[str]) -> bytes:
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
                                 "teacher_confidence": float(result.teacher_confidence[i])})
            zf.writestr("manifest.json", json.dumps(manifest, indent=1))
        return buf.getvalue()
    if fmt == "npz":
        buf = io.BytesIO()
        arrays = {"images": result.images.numpy(), "labels": result.labels.numpy(),
                  "teacher_top1": result.teacher_top1.numpy(),
                  "teacher_confidence": result.teacher_confidence.numpy()}
        if result.logits is not None:
            arrays["teacher_logits"] = result.logits.numpy().astype(np.float32)
        np.savez_compressed(buf, **arrays)
        return buf.getvalue()
    raise ValueError(f"unknown format {fmt!r}")
