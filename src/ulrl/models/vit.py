"""Vision Transformers in plain torch: ``vit-b16`` (ViT-Base/16, for 224x224) and ``vit-small``
(patch 4, dim 192, depth 6, 3 heads, for 28-32 px images).

Conv patch embedding, a class token, learned position embeddings, pre-norm blocks
(attention through ``F.scaled_dot_product_attention``, GELU MLP), a final LayerNorm and the
``head`` Linear on the class token. The head is registered last, so it is the last
``nn.Linear`` in ``named_modules()`` order. Weights: truncated normal (std 0.02) as in timm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import register_model


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, image_size: int, patch: int,
                 dim: int, depth: int, heads: int, mlp_dim: int, name: str = "vit") -> None:
        super().__init__()
        if image_size % patch:
            raise UserError(f"{name} uses {patch}x{patch} patches, which do not tile {image_size}x{image_size} images; "
                            f"use an image size divisible by {patch}")
        if dim % heads:
            raise UserError(f"{name}: dim {dim} is not divisible by {heads} heads")
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)  # registered last: the classifier
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model("vit-b16")
def vit_b16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return VisionTransformer(num_classes, in_channels, image_size, patch=16, dim=768, depth=12,
                             heads=12, mlp_dim=3072, name="vit-b16")


@register_model("vit-small")
def vit_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return VisionTransformer(num_classes, in_channels, image_size, patch=4, dim=192, depth=6,
                             heads=3, mlp_dim=768, name="vit-small")
