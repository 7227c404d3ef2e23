"""Write the project's datasets as ImageFolder trees (`out/{class}/{index:05d}.{png,jpg}`) for the DALI reader.

File names are the image's index in its split, so every export of the same data names the same files,
and a partial export is a subset of the full one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from shared.data.cifar10 import CLASS_NAMES as CIFAR10_CLASSES, train_val_positions
from shared.data.cifar10_formats import open_split
from shared.data.digits import CLASS_NAMES as DIGITS_CLASSES, load_digits_split
from shared.data.splits import stratified_limit, stratified_subset

Split = Literal["train", "val", "test"]


def export_digits(out_dir: Path, image_size: int = 16, split: Split = "train", *,
                  partial_fraction: float = 1.0, seed: int = 0) -> dict[str, int]:
    """Digits as 8-bit grayscale PNGs, at the size `load_digits_split(image_size)` gives. Returns images per class."""
    x, y = load_digits_split(image_size).images(_check_split(split))
    pixels = (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    labels = y.numpy()

    def write(i: int, path: Path) -> None:
        Image.fromarray(pixels[i]).save(path.with_suffix(".png"))

    return _write_tree(Path(out_dir), DIGITS_CLASSES, labels, stratified_subset(labels, partial_fraction, seed), write)


def export_cifar10(root: Path | None, out_dir: Path, split: Split = "train", limit: int | None = None, *,
                   partial_fraction: float = 1.0, seed: int = 0) -> dict[str, int]:
    """CIFAR-10 from any layout `shared.data.cifar10_formats` reads, as PNGs; images of the JPEG copy
    (`train_jpeg.npz`, `test_jpeg.npz`) keep their original JPEG bytes instead (no re-encode).

    `limit` keeps that many images of the training (train and val are carved from those) or test order, the same
    share of each class; `partial_fraction` then keeps a stratified share of the split. File names are positions in
    that order. Returns images per class.
    """
    reader = open_split(root, "test" if _check_split(split) == "test" else "train")
    labels = reader.labels
    if split == "test":
        members = stratified_limit(labels, limit)
    else:
        members = train_val_positions(labels, limit)[0 if split == "train" else 1]
    keep = members[stratified_subset(labels[members], partial_fraction, seed)]

    encoded = reader.encoded  # only the layout that was read: never bytes from another copy in the same folder
    if encoded is not None:

        def write(i: int, path: Path) -> None:
            path.with_suffix(".jpg").write_bytes(encoded(i))
    else:
        pixels = dict(zip(keep.tolist(), reader.images(keep)))  # decodes only the kept images

        def write(i: int, path: Path) -> None:
            Image.fromarray(pixels[i]).save(path.with_suffix(".png"))

    return _write_tree(Path(out_dir), CIFAR10_CLASSES, labels, keep, write)


def _write_tree(out_dir: Path, class_names: Sequence[str], labels: np.ndarray, keep: np.ndarray,
                write: Callable[[int, Path], None]) -> dict[str, int]:
    # A reader labels folders in sorted order; unsorted names would silently relabel every image.
    if list(class_names) != sorted(class_names):
        raise ValueError(f"class names {list(class_names)} are not in sorted order; folder labels would not match")
    # Leftovers from an earlier export (another fraction or limit) would be read as data: refuse to mix.
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; export into a new folder")
    for name in class_names:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(class_names, 0)
    for i in keep.tolist():
        name = class_names[int(labels[i])]
        write(i, out_dir / name / f"{i:05d}")
        counts[name] += 1
    return counts


def _check_split(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    return split

