"""The DearKD student: a timm DeiT with a distillation token whose first K blocks use MHCA (docs/architecture.md §4).
With `dist_tokens` > 1 it has one distillation token and head per teacher of an ensemble (Co-advise)."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from shared.config import StudentConfig
from shared.models.mhca import MHCAttention


class MultiTokenDistilled(VisionTransformerDistilled):
    """A distilled DeiT with `dist_tokens` distillation tokens: timm's `dist_token` and `head_dist` are the first;
    `extra_dist_tokens` and `extra_heads` the others. The tokens follow the class token, each with its own position
    embedding. `forward` gives (cls_logits, [T, B, K] dist logits) in distilled training, and the mean of every
    head otherwise."""

    def __init__(self, *args, dist_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        if self.no_embed_class or self.dynamic_img_size:
            raise ValueError("several distillation tokens need position embeddings for the prefix tokens")
        extra = dist_tokens - 1
        self.num_prefix_tokens = 1 + dist_tokens
        self.extra_dist_tokens = nn.Parameter(torch.zeros(1, extra, self.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens,
                                                  self.embed_dim))
        self.extra_heads = nn.ModuleList(nn.Linear(self.embed_dim, self.num_classes) for _ in range(extra))
        trunc_normal_(self.extra_dist_tokens, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        self.extra_heads.apply(init_weights_vit_timm)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = torch.cat((self.cls_token.expand(b, -1, -1), self.dist_token.expand(b, -1, -1),
                       self.extra_dist_tokens.expand(b, -1, -1), x), dim=1)
        return self.pos_drop(x + self.pos_embed)

    def dist_heads(self) -> list[nn.Module]:
        return [self.head_dist, *self.extra_heads]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        cls_logits, dist_logits = heads(self, x)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return cls_logits, dist_logits
        return torch.cat((cls_logits[None], dist_logits)).mean(0)


def heads(model: VisionTransformerDistilled, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cls_logits, dist_logits) from the final (normed) tokens: dist_logits is [B, K] for one distillation token,
    [T, B, K] for T of them."""
    cls_logits = model.head(model.head_drop(x[:, 0]))
    if not isinstance(model, MultiTokenDistilled):
        return cls_logits, model.head_dist(model.head_drop(x[:, 1]))
    return cls_logits, torch.stack([h(model.head_drop(x[:, 1 + t])) for t, h in enumerate(model.dist_heads())])


def create_student(cfg: StudentConfig) -> VisionTransformerDistilled:
    """Untrained DeiT-style student: in train mode `forward` gives (cls_logits, dist_logits), in eval their mean."""
    if not cfg.resolved:
        raise ValueError("the student's img_size, in_chans and num_classes are unset: fill them from the teacher "
                         "with StudentConfig.for_teacher(card)")
    kind = VisionTransformerDistilled
    extra = {}
    if cfg.dist_tokens > 1:
        kind, extra = MultiTokenDistilled, {"dist_tokens": cfg.dist_tokens}
    model = kind(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=True,
        global_pool="token",
        drop_path_rate=cfg.drop_path,
        **extra,
    )
    for blk in model.blocks[:cfg.mhca_blocks]:
        blk.attn = MHCAttention(
            cfg.embed_dim,
            num_heads=cfg.num_heads,
            grid_size=model.patch_embed.grid_size,
            num_prefix_tokens=model.num_prefix_tokens,
            qkv_bias=True,
            attn_drop=cfg.mhca_dropout,
        )
        # Fresh qkv/proj get the same init as the rest of the ViT (trunc-normal 0.02, zero bias).
        blk.attn.apply(init_weights_vit_timm)
    # Without this, timm averages the two heads even in training and the distillation token learns nothing apart.
    model.set_distilled_training(True)
    return model


def block_outputs(model: VisionTransformerDistilled, x: torch.Tensor, blocks: list[int],
                  ) -> tuple[dict[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One forward: the (B, T, D) outputs of the 1-based `blocks`, and (cls_logits, dist_logits); dist_logits is
    [T, B, K] for a student with T > 1 distillation tokens.

    Mirrors timm's forward_features + forward_head step by step, but returns both heads in every mode
    (model(x) averages them in eval), so that evaluation can average their softmax instead.
    """
    depth = len(model.blocks)
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"student blocks {bad} out of range: the student has {depth} blocks (1..{depth})")
    wanted = set(blocks)
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    outputs: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks, start=1):
        if model.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
        if i in wanted:
            outputs[i] = x
    return outputs, heads(model, model.norm(x))


def mhca_blocks(model: nn.Module) -> list[int]:
    """1-based indexes of the blocks whose attention is MHCA."""
    return [i for i, blk in enumerate(model.blocks, start=1) if isinstance(blk.attn, MHCAttention)]
