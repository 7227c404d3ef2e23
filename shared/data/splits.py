"""The three splits every dataset has: train, validation (carved off the training images) and test.

Settings are chosen on the validation split; the test split is for reporting only. Teachers train on the train
split alone, so validation images are unseen by both the teacher and the student.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

VAL_SEED = 1  # not 0: partial-data exports draw their subsets with seed 0 from the same labels


@dataclass
class ImageSplit:
    """Images as float tensors in [0, 1], (N, C, H, W), with int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean = self.x_train.mean(dim=(0, 2, 3))
        std = self.x_train.std(dim=(0, 2, 3))
        return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())

    def images(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of split `name`: 'train', 'val' or 'test'."""
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        x, y = getattr(self, f"x_{name}"), getattr(self, f"y_{name}")
        if x is None:
            raise ValueError(f"this dataset has no {name!r} split")
        return x, y


def stratified_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices keeping `fraction` of each class (at least one image per present class), seeded."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    if fraction == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):  # sorted classes: one rng stream gives the same subset on every machine
        members = np.flatnonzero(labels == c)
        n = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(keep))


def stratified_limit(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Sorted positions of `limit` images (all when None or more than there are), each class giving the same share:
    its first images in `labels`' order. Quotas are rounded by largest remainder, ties to the lower class."""
    labels = np.asarray(labels)
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    classes, counts = np.unique(labels, return_counts=True)
    exact = limit * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    by_remainder = np.argsort(-(exact - quota), kind="stable")
    quota[by_remainder[:limit - int(quota.sum())]] += 1
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:n] for c, n in zip(classes, quota)]))


def unit_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] images as the uint8 pixels they were decoded from."""
    return x.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def split_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha256 over int64 labels and uint8 pixels of [0, 1] images: which images, in which order."""
    h = hashlib.sha256(y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    pixels = unit_to_uint8(x.detach().cpu())
    h.update(np.ascontiguousarray(pixels.numpy()).tobytes())
    return h.hexdigest()


def train_val_indices(labels: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) positions into `labels`: a stratified `val_fraction` of each class goes to validation."""
    val = stratified_subset(labels, val_fraction, seed=VAL_SEED)
    train = np.setdiff1d(np.arange(len(labels)), val, assume_unique=True)
    return train, val
