"""timm's ViT and MLP-Mixer at the project's dataset sizes, by name, so that cards, `dfkd teacher train` and the
ScaleKD recipe build them like any other model: `<family>_nano_patch<P>_<S>` takes S-pixel inputs in P-pixel
patches (an 8x8 token grid at both sizes); "nano" is half of vit_tiny's width and depth (96 wide, 6 blocks), small
enough to train on 2 CPU cores."""
from __future__ import annotations

import torch.nn as nn

from shared.models.registry import register_model

NANO = dict(embed_dim=96, depth=6)


def _vit(img_size: int, patch_size: int, num_classes: int, in_chans: int) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                             num_heads=3, mlp_ratio=4.0, **NANO)


def _mixer(img_size: int, patch_size: int, num_classes: int, in_chans: int) -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
                    num_blocks=NANO["depth"], embed_dim=NANO["embed_dim"])


@register_model
def vit_nano_patch2_16(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return _vit(16, 2, num_classes, in_chans)


@register_model
def vit_nano_patch4_32(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return _vit(32, 4, num_classes, in_chans)


@register_model
def mixer_nano_patch2_16(num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    return _mixer(16, 2, num_classes, in_chans)


@register_model
def mixer_nano_patch4_32(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return _mixer(32, 4, num_classes, in_chans)
