"""CIFAR-10 from a JPEG copy: `train_jpeg.npz` (JPEG bytes + offsets) and `test.npz` (decoded pixels).

The validation split is a fixed stratified 10 % of the training images (5,000 of 50,000), carved off before any
training, so a teacher trained here has never seen them.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.data.splits import ImageSplit, train_val_indices

VAL_FRACTION = 0.1
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray, indices: np.ndarray) -> np.ndarray:
    if len(indices) == 0:
        return np.zeros((0, 32, 32, 3), np.uint8)
    return np.stack([np.asarray(Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                     for i in indices.tolist()])


def train_val_positions(train_labels: np.ndarray, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into `train_jpeg.npz`, carved from its first `limit` images (all when None)."""
    return train_val_indices(np.asarray(train_labels)[:limit], VAL_FRACTION)


def _check_files(root: Path, names: tuple[str, ...]) -> None:
    for name in names:
        if not (root / name).is_file():
            raise FileNotFoundError(f"CIFAR-10 file {root / name} not found (set DFKD_DATA__CIFAR10_DIR)")


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)


def load_cifar10_images(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split, 'val' or 'test', without decoding the training images."""
    root = Path(root)
    if split == "test":
        _check_files(root, ("test.npz",))
        test = np.load(root / "test.npz")
        return _to_tensor(test["x"]), torch.from_numpy(test["y"].astype(np.int64))
    if split != "val":
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    _check_files(root, ("train_jpeg.npz",))
    train = np.load(root / "train_jpeg.npz")
    labels = train["y"].astype(np.int64)
    _, idx_val = train_val_positions(labels)
    return _to_tensor(_decode_jpegs(train["jpeg"], train["offsets"], idx_val)), torch.from_numpy(labels[idx_val])


def load_cifar10_split(root: Path, train_limit: int | None = None, test_limit: int | None = None) -> ImageSplit:
    root = Path(root)
    _check_files(root, ("train_jpeg.npz", "test.npz"))
    train = np.load(root / "train_jpeg.npz")
    labels = train["y"].astype(np.int64)
    idx_train, idx_val = train_val_positions(labels, train_limit)
    x_train, x_val = (_decode_jpegs(train["jpeg"], train["offsets"], idx) for idx in (idx_train, idx_val))
    test = np.load(root / "test.npz")
    x_test, y_test = test["x"][:test_limit], test["y"][:test_limit]
    return ImageSplit(_to_tensor(x_train), torch.from_numpy(labels[idx_train]),
                      _to_tensor(x_test), torch.from_numpy(y_test.astype(np.int64)),
                      _to_tensor(x_val), torch.from_numpy(labels[idx_val]))
