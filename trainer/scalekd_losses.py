"""ScaleKD's dual-view feature mimicking (DFM) on [B, N, D] tokens laid out on an H x W grid: the spatial view
compares per-position L2-normalised tokens, the frequency view the same after each channel's DCT direct component
is removed (which otherwise dominates a ViT's features). Both are squared errors summed and divided by the batch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.dct import remove_dc


def token_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, H*W, D] -> [B, D, H, W]."""
    b, n, d = tokens.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}x{grid[1]} grid")
    return tokens.transpose(1, 2).reshape(b, d, *grid)


def mimic(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error of channel-normalised [B, D, H, W] maps, summed, over the batch."""
    diff = F.normalize(student.float(), dim=1) - F.normalize(teacher.float(), dim=1)
    return diff.pow(2).sum() / len(student)


def spatial_view(student: torch.Tensor, teacher: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return mimic(token_map(student, grid), token_map(teacher, grid))


def frequency_view(student: torch.Tensor, teacher: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    return mimic(remove_dc(token_map(student.float(), grid)), remove_dc(token_map(teacher.float(), grid)))
