"""scikit-learn's 1,797 handwritten 8x8 digits, upsampled, with one fixed stratified train/test split."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = [str(i) for i in range(10)]
TEST_FRACTION = 0.25
SPLIT_SEED = 0


@dataclass
class ImageSplit:
    """Images as float tensors in [0, 1], (N, C, H, W), with int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        mean = self.x_train.mean(dim=(0, 2, 3))
        std = self.x_train.std(dim=(0, 2, 3))
        return tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist())


def load_digits_split(image_size: int = 16) -> ImageSplit:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_test = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=digits.target)
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return ImageSplit(x[idx_train], y[idx_train], x[idx_test], y[idx_test])
