"""ImagePool: fixed-size, epoch-shuffled, augmented batches."""
from __future__ import annotations

import torch

from image_pool import ImagePool


def test_batches_have_the_batch_size_and_cover_every_image_each_epoch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    labels = torch.arange(10)
    pool = ImagePool(images, labels, (0.0,), (1 / 255,), batch_size=4, crop_padding=0, seed=0)
    seen = []
    for _ in range(5):  # 20 images = exactly 2 epochs
        x, y = next(pool)
        assert x.shape == (4, 1, 4, 4) and y.shape == (4,)
        assert torch.equal(x[:, 0, 0, 0].round().long(), y)  # image and label stay paired
        seen += y.tolist()
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
