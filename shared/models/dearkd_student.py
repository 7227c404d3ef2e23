"""The DearKD student: a timm DeiT with a distillation token whose first K blocks use MHCA (docs/architecture.md §4)."""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import init_weights_vit_timm
from torch.utils.checkpoint import checkpoint

from shared.config import StudentConfig
from shared.models.mhca import MHCAttention


def create_student(cfg: StudentConfig) -> VisionTransformerDistilled:
    """Untrained DeiT-style student: in train mode `forward` gives (cls_logits, dist_logits), in eval their mean."""
    if not cfg.resolved:
        raise ValueError("the student's img_size, in_chans and num_classes are unset: fill them from the teacher "
                         "with StudentConfig.for_teacher(card)")
    model = VisionTransformerDistilled(
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
    """One forward: the (B, T, D) outputs of the 1-based `blocks`, and (cls_logits, dist_logits).

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
    x = model.norm(x)
    cls_tok, dist_tok = model.head_drop(x[:, 0]), model.head_drop(x[:, 1])
    return outputs, (model.head(cls_tok), model.head_dist(dist_tok))


def mhca_blocks(model: nn.Module) -> list[int]:
    """1-based indexes of the blocks whose attention is MHCA."""
    return [i for i, blk in enumerate(model.blocks, start=1) if isinstance(blk.attn, MHCAttention)]
