"""CIFAR-10 as train / validation / test tensors, from any layout `cifar10_formats` reads.

The validation split is a fixed stratified 10 % of the training images (5,000 of 50,000), carved off before any
training, so a teacher trained here has never seen them. It is chosen by position within each class, in the order
the layout's reader lists the images (an ImageFolder tree: by file name), so the layout and its file names decide
which images it holds. Limits keep the same share of each class (`stratified_limit`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.data.cifar10_formats import CLASS_NAMES, open_split
from shared.data.splits import ImageSplit, stratified_limit, train_val_indices

__all__ = ["CLASS_NAMES", "VAL_FRACTION", "load_cifar10_images", "load_cifar10_split", "train_val_positions"]

VAL_FRACTION = 0.1


def train_val_positions(train_labels: np.ndarray, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions in the training-image order, carved from `limit` of its images (all when None), the
    same share of each class."""
    kept = stratified_limit(train_labels, limit)
    train, val = train_val_indices(np.asarray(train_labels)[kept], VAL_FRACTION)
    return kept[train], kept[val]


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)


def load_cifar10_images(root: Path | None, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split, 'val' or 'test', without decoding the other images. `limit` is `load_cifar10_split`'s: the
    training images the validation ones are carved from, or the test images kept."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if split == "test":
        test = open_split(root, "test")
        positions = stratified_limit(test.labels, limit)
        return _to_tensor(test.images(positions)), torch.from_numpy(test.labels[positions])
    train = open_split(root, "train")
    _, idx_val = train_val_positions(train.labels, limit)
    return _to_tensor(train.images(idx_val)), torch.from_numpy(train.labels[idx_val])


def load_cifar10_split(root: Path | None, train_limit: int | None = None,
                       test_limit: int | None = None) -> ImageSplit:
    train, test = open_split(root, "train"), open_split(root, "test")
    idx_train, idx_val = train_val_positions(train.labels, train_limit)
    idx_test = stratified_limit(test.labels, test_limit)
    return ImageSplit(_to_tensor(train.images(idx_train)), torch.from_numpy(train.labels[idx_train]),
                      _to_tensor(test.images(idx_test)), torch.from_numpy(test.labels[idx_test]),
                      _to_tensor(train.images(idx_val)), torch.from_numpy(train.labels[idx_val]))
