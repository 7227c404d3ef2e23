"""A fixed in-memory pool of uint8 images as augmented, normalised batches: the trainer's augmentation without the
store or the stream (tests and benches)."""
from __future__ import annotations

import torch

from trainer.augment import Augment


def augment_normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], crop_padding: int,
                      flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Augment on the images' own device."""
    return Augment(mean, std, crop_padding, flip, images.device)(images, gen)


class ImagePool:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...],
                 batch_size: int, crop_padding: int = 2, flip: bool = False, seed: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{len(images)} images for {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = mean, std
        self.batch_size, self.crop_padding, self.flip = batch_size, crop_padding, flip
        self.augment = Augment(mean, std, crop_padding, flip, images.device)
        self.gen = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(images), generator=self.gen)
        self._cursor = 0

    def __iter__(self) -> "ImagePool":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch-wise shuffled batch (wrapping around), augmented and normalised."""
        parts, count = [], 0
        while count < self.batch_size:
            if self._cursor == len(self._order):
                self._order, self._cursor = torch.randperm(len(self.images), generator=self.gen), 0
            take = min(self.batch_size - count, len(self._order) - self._cursor)
            parts.append(self._order[self._cursor:self._cursor + take])
            self._cursor += take
            count += take
        idx_t = torch.cat(parts)
        return self.augment(self.images[idx_t], self.gen), self.labels[idx_t]
