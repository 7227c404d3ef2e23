"""ScaleKD's cross-attention projector (CAP): a student feature map becomes tokens on the teacher's grid and at its
width, whatever the student's paradigm (CNN map, Mixer or ViT tokens laid out as a map).

conv 3x3 + BN + ReLU to the teacher's width, plus a learnable positional embedding on the student's grid, gives keys
and values; queries shaped like the teacher's token grid (learnable, or given: TPP's outputs) attend to them; then
LayerNorm and an FFN. `LinearProjector` is the ablation without cross-attention: a 1x1 conv and a resize to the
teacher's grid.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class CrossAttentionProjector(nn.Module):
    def __init__(self, student_channels: int, student_grid: tuple[int, int], teacher_dim: int,
                 teacher_grid: tuple[int, int], heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if teacher_dim % heads:
            raise ValueError(f"the teacher's width {teacher_dim} is not a multiple of {heads} projector heads")
        self.teacher_grid, self.heads = teacher_grid, heads
        self.embed = nn.Sequential(nn.Conv2d(student_channels, teacher_dim, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(teacher_dim), nn.ReLU(inplace=True))
        self.pos_embed = nn.Parameter(torch.zeros(1, student_grid[0] * student_grid[1], teacher_dim))
        self.queries = nn.Parameter(torch.zeros(1, teacher_grid[0] * teacher_grid[1], teacher_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.q, self.kv = nn.Linear(teacher_dim, teacher_dim), nn.Linear(teacher_dim, 2 * teacher_dim)
        self.proj = nn.Linear(teacher_dim, teacher_dim)
        self.norm = nn.LayerNorm(teacher_dim)
        hidden = int(teacher_dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(teacher_dim, hidden), nn.GELU(), nn.Linear(hidden, teacher_dim))

    def forward(self, feature: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, h, w] student map -> [B, H*W, D] tokens on the teacher's H x W grid."""
        kv = self.embed(feature).flatten(2).transpose(1, 2)
        if kv.shape[1] != self.pos_embed.shape[1]:
            raise ValueError(f"the student map has {kv.shape[1]} positions; this projector was built for "
                             f"{self.pos_embed.shape[1]}")
        kv = kv + self.pos_embed
        b, n, d = kv.shape
        q = self.queries.expand(b, -1, -1) if queries is None else queries
        split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        k, v = self.kv(kv).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(split(self.q(q)), split(k), split(v))
        out = q + self.proj(out.transpose(1, 2).reshape(b, -1, d))
        return out + self.ffn(self.norm(out))


class LinearProjector(nn.Module):
    """The ablation without cross-attention: a 1x1 conv to the teacher's width, resized to its grid."""

    def __init__(self, student_channels: int, teacher_dim: int, teacher_grid: tuple[int, int]):
        super().__init__()
        self.teacher_grid = teacher_grid
        self.conv = nn.Conv2d(student_channels, teacher_dim, 1)

    def forward(self, feature: torch.Tensor, queries: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(self.conv(feature), size=self.teacher_grid, mode="bilinear", align_corners=False)
        return x.flatten(2).transpose(1, 2)
