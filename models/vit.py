"""Vision encoder: timm's VisionTransformer with BLIP's settings and partial activation checkpointing."""
from __future__ import annotations

import logging
from functools import partial
from typing import Mapping, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

_logger = logging.getLogger(__name__)

# Named sizes of the official checkpoints. ViT-L always used drop-path 0.1 in the original.
VIT_SIZES = {
    'base': dict(embed_dim=768, depth=12, num_heads=12, patch_size=16, mlp_ratio=4.0, drop_path_rate=0.0),
    'large': dict(embed_dim=1024, depth=24, num_heads=16, patch_size=16, mlp_ratio=4.0, drop_path_rate=0.1),
}
VIT_SPEC_KEYS = {'embed_dim', 'depth', 'num_heads', 'patch_size', 'mlp_ratio'}

VitSpec = Union[str, Mapping[str, Union[int, float]]]


class BlipVisionTransformer(VisionTransformer):
    """A timm ViT that returns every token after the final norm, checkpointing only the last blocks.

    The original checkpointed the last `ckpt_layers` blocks (not all of them as timm's
    `set_grad_checkpointing` does), trading compute for memory only where activations are largest in use.
    """

    def __init__(self, *args, ckpt_layers: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ckpt_layers = ckpt_layers

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        first_ckpt = len(self.blocks) - self.ckpt_layers
        for i, block in enumerate(self.blocks):
            if i >= first_ckpt and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)  # (B, 1 + num_patches, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def vit_settings(vit: VitSpec) -> dict:
    """Resolve `vit` ('base', 'large' or a mapping for small models) to constructor settings."""
    if isinstance(vit, str):
        if vit not in VIT_SIZES:
            raise ValueError(f"vit must be 'base', 'large' or a mapping with keys {sorted(VIT_SPEC_KEYS)}; got {vit!r}")
        return dict(VIT_SIZES[vit])
    unknown = set(vit) - VIT_SPEC_KEYS
    missing = {'embed_dim', 'depth', 'num_heads'} - set(vit)
    if unknown or missing:
        raise ValueError(f'vit mapping {dict(vit)} has unknown keys {sorted(unknown)} / misses {sorted(missing)}; '
                         f'allowed keys: {sorted(VIT_SPEC_KEYS)}')
    settings = dict(patch_size=16, mlp_ratio=4.0, drop_path_rate=0.0)
    settings.update(vit)
    return settings


def create_vit(vit: VitSpec, image_size: int, grad_ckpt: bool = False, ckpt_layer: int = 0,
               drop_path_rate: float | None = None) -> tuple[BlipVisionTransformer, int]:
    """Build the image encoder; returns (encoder, width)."""
    settings = vit_settings(vit)
    if drop_path_rate is not None:
        settings['drop_path_rate'] = drop_path_rate
    encoder = BlipVisionTransformer(
        img_size=image_size,
        patch_size=int(settings['patch_size']),
        embed_dim=int(settings['embed_dim']),
        depth=int(settings['depth']),
        num_heads=int(settings['num_heads']),
        mlp_ratio=float(settings['mlp_ratio']),
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        drop_path_rate=float(settings['drop_path_rate']),
        ckpt_layers=int(ckpt_layer) if grad_ckpt else 0,
    )
    return encoder, int(settings['embed_dim'])


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a checkpoint's (1, prefix + g*g, D) position embedding to `num_patches` positions.

    Bicubic, align_corners=False and NO antialiasing (timm's default antialias=True gives other values):
    this is how the official checkpoints were resized from pre-training (224 px) to fine-tuning (384 px).
    The class token is kept as it is.
    """
    old_grid = int(round((pos_embed.shape[1] - num_prefix_tokens) ** 0.5))
    new_grid = int(round(num_patches ** 0.5))
    if old_grid == new_grid:
        return pos_embed
    _logger.info('Resizing position embedding from %dx%d to %dx%d patches', old_grid, old_grid, new_grid, new_grid)
    return resample_abs_pos_embed(pos_embed, [new_grid, new_grid], [old_grid, old_grid],
                                  num_prefix_tokens=num_prefix_tokens, interpolation='bicubic', antialias=False)
