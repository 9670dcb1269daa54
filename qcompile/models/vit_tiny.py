"""A small Vision Transformer for 28×28 one-channel digits: torchvision's VisionTransformer (class
token, learned positional embedding, pre-norm encoder blocks of nn.MultiheadAttention, LayerNorm,
GELU MLP) with a one-channel patch embedding."""
from __future__ import annotations

import math

from torch import nn
from torchvision.models.vision_transformer import VisionTransformer


def vit_tiny(num_classes: int = 10, image_size: int = 28, patch_size: int = 7, in_channels: int = 1,
             num_layers: int = 2, num_heads: int = 4, hidden_dim: int = 64, mlp_dim: int = 128) -> nn.Module:
    model = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                              num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes)
    model.conv_proj = nn.Conv2d(in_channels, hidden_dim, patch_size, patch_size)
    fan_in = in_channels * patch_size ** 2                  # torchvision's initialization of the patch embedding
    nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(model.conv_proj.bias)
    return model
