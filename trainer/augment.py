"""Augmenting uint8 batches on the training device: random crop (+ flip), then the teacher's normalisation; or, for
images whose teacher logits were shipped, only the views those logits are for."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor onto `device` without making the host wait: a copy to a GPU goes through pinned memory (from
    pageable memory it would block until the GPU has caught up)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class Augment:
    """uint8 (N, C, H, W) host images -> random crop from a zero-padded copy (+ h-flip) -> normalised float, with
    the pixel work on `device`. Only the per-image draws (offsets, flips) come from the CPU generator, in a fixed
    order, so a generator state gives the same batch on any device."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], crop_padding: int, flip: bool,
                 device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.padding, self.flip = crop_padding, flip
        self.mean = to_device(torch.tensor(mean).view(1, -1, 1, 1), self.device)
        self.std = to_device(torch.tensor(std).view(1, -1, 1, 1), self.device)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n, _, h, w = images.shape
        p = self.padding
        draws = []
        if p > 0:
            draws += [torch.randint(0, 2 * p + 1, (n,), generator=gen) for _ in range(2)]  # dx, then dy
        if self.flip:
            draws.append((torch.rand(n, generator=gen) < 0.5).long())
        # One small copy for all the draws, queued behind the images'.
        x = to_device(images, self.device).float() / 255.0
        draws = to_device(torch.stack(draws), self.device) if draws else None
        if p > 0:
            dx, dy = draws[0], draws[1]
            padded = F.pad(x, (p,) * 4)
            rows = dy[:, None] + torch.arange(h, device=self.device)[None, :]  # (n, h)
            cols = dx[:, None] + torch.arange(w, device=self.device)[None, :]  # (n, w)
            idx = torch.arange(n, device=self.device)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        if self.flip:
            x = torch.where(draws[-1].bool()[:, None, None, None], x.flip(3), x)
        return (x - self.mean) / self.std

    def views(self, images: torch.Tensor, gen: torch.Generator, views: tuple[str, ...],
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image in one of `views` ("identity", "hflip"), drawn uniformly: no crop, so shipped logits for that
        view are exact. Returns the normalised images and, per image, the index into `views` drawn."""
        n = images.shape[0]
        pick = torch.randint(0, len(views), (n,), generator=gen) if len(views) > 1 else torch.zeros(n, dtype=torch.long)
        flipped = torch.tensor([v == "hflip" for v in views])[pick]
        x = to_device(images, self.device).float() / 255.0
        x = torch.where(to_device(flipped, self.device)[:, None, None, None], x.flip(3), x)
        return (x - self.mean) / self.std, pick
