"""CIFAR-10 from the team's JPEG copy: `train_jpeg.npz` (JPEG bytes + offsets) and `test.npz` (decoded pixels)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from shared.data.digits import ImageSplit

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray, limit: int | None) -> np.ndarray:
    n = len(offsets) - 1 if limit is None else min(limit, len(offsets) - 1)
    return np.stack([np.asarray(Image.open(io.BytesIO(buf[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
                     for i in range(n)])


def load_cifar10_split(root: Path, train_limit: int | None = None, test_limit: int | None = None) -> ImageSplit:
    root = Path(root)
    for name in ("train_jpeg.npz", "test.npz"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"CIFAR-10 file {root / name} not found (set DFKD_DATA__CIFAR10_DIR)")
    train = np.load(root / "train_jpeg.npz")
    x_train = _decode_jpegs(train["jpeg"], train["offsets"], train_limit)
    y_train = train["y"][: len(x_train)]
    test = np.load(root / "test.npz")
    x_test, y_test = test["x"][:test_limit], test["y"][:test_limit]

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)

    return ImageSplit(to_tensor(x_train), torch.from_numpy(y_train.astype(np.int64)),
                      to_tensor(x_test), torch.from_numpy(y_test.astype(np.int64)))
