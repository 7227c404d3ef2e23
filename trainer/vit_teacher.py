"""A frozen timm VisionTransformer split in two: its blocks up to a middle point, and its tail (the last blocks and
the final norm), which ScaleKD's teacher parameter perception runs the student's projected tokens through."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

_PARTS = ("patch_embed", "_pos_embed", "blocks", "norm", "forward_head", "num_prefix_tokens")


@dataclass
class TeacherTokens:
    middle: torch.Tensor  # [B, P + N, D] the input of the tail, prefix tokens first
    final: torch.Tensor   # [B, P + N, D] after the tail and the final norm
    logits: torch.Tensor  # [B, K]


class ViTTeacherStages(nn.Module):
    def __init__(self, model: nn.Module, tail_blocks: int):
        super().__init__()
        missing = [p for p in _PARTS if not hasattr(model, p)]
        if missing:
            raise ValueError(f"a ScaleKD teacher must be a timm VisionTransformer; {type(model).__name__} has no "
                             f"{', '.join(missing)}")
        depth = len(model.blocks)
        if not 1 <= tail_blocks < depth:
            raise ValueError(f"scalekd.teacher_tail_blocks must be between 1 and {depth - 1} for a {depth}-block "
                             f"teacher, got {tail_blocks}")
        self.model = model.eval().requires_grad_(False)
        self.split = depth - tail_blocks
        self.prefix = int(model.num_prefix_tokens)
        self.grid = tuple(model.patch_embed.grid_size)
        self.dim = int(model.embed_dim)

    def train(self, mode: bool = True) -> "ViTTeacherStages":
        return super().train(False)  # frozen: dropout and the like stay off whatever the trainer sets

    def head(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        for block in m.blocks[:self.split]:
            x = block(x)
        return x

    def tail(self, tokens: torch.Tensor) -> torch.Tensor:
        """The teacher's last blocks and final norm on [B, P + N, D] tokens; gradients flow to the tokens, never
        into the frozen weights."""
        for block in self.model.blocks[self.split:]:
            tokens = block(tokens)
        return self.model.norm(tokens)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> TeacherTokens:
        middle = self.head(x)
        final = self.tail(middle)
        return TeacherTokens(middle, final, self.model.forward_head(final))

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.prefix:]
