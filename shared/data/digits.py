"""scikit-learn's 1,797 handwritten 8x8 digits, upsampled, with fixed stratified train/validation/test splits."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from shared.data.splits import ImageSplit, train_val_indices

CLASS_NAMES = [str(i) for i in range(10)]
TEST_FRACTION = 0.25  # 450 test images
VAL_FRACTION = 0.15  # of the rest, per class: 201 validation images, 1,146 train
SPLIT_SEED = 0


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
    train, val = train_val_indices(digits.target[idx_train], VAL_FRACTION)
    idx_train, idx_val = torch.from_numpy(idx_train[train]), torch.from_numpy(idx_train[val])
    idx_test = torch.from_numpy(idx_test)
    return ImageSplit(x[idx_train], y[idx_train], x[idx_test], y[idx_test], x[idx_val], y[idx_val])
