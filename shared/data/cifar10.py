"""CIFAR-10 as train / validation / test tensors, from any layout `cifar10_formats` reads.

The validation split is a fixed stratified 10 % of the training images (5,000 of 50,000), carved off before any
training, so a teacher trained here has never seen them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.data.cifar10_formats import CLASS_NAMES, open_split
from shared.data.splits import ImageSplit, train_val_indices

__all__ = ["CLASS_NAMES", "VAL_FRACTION", "load_cifar10_images", "load_cifar10_split", "train_val_positions"]

VAL_FRACTION = 0.1


def train_val_positions(train_labels: np.ndarray, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions in the training-image order, carved from its first `limit` images (all when None)."""
    return train_val_indices(np.asarray(train_labels)[:limit], VAL_FRACTION)


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0)


def load_cifar10_images(root: Path | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split, 'val' or 'test', without decoding the other images."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    if split == "test":
        test = open_split(root, "test")
        positions = np.arange(len(test.labels))
        return _to_tensor(test.images(positions)), torch.from_numpy(test.labels)
    train = open_split(root, "train")
    _, idx_val = train_val_positions(train.labels)
    return _to_tensor(train.images(idx_val)), torch.from_numpy(train.labels[idx_val])


def load_cifar10_split(root: Path | None, train_limit: int | None = None,
                       test_limit: int | None = None) -> ImageSplit:
    train, test = open_split(root, "train"), open_split(root, "test")
    idx_train, idx_val = train_val_positions(train.labels, train_limit)
    idx_test = np.arange(len(test.labels[:test_limit]))
    return ImageSplit(_to_tensor(train.images(idx_train)), torch.from_numpy(train.labels[idx_train]),
                      _to_tensor(test.images(idx_test)), torch.from_numpy(test.labels[idx_test]),
                      _to_tensor(train.images(idx_val)), torch.from_numpy(train.labels[idx_val]))
