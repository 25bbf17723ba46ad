"""Vision Transformer (Dosovitskiy et al. 2021) with timm's module names, traceable by torch.fx."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LayercritError
from ._layers import Mlp, patch_grid
from .registry import register_model

__all__ = ["Attention", "Mlp", "PatchEmbed", "TransformerBlock", "VisionTransformer"]


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: conv `proj` with kernel = stride = patch size, then (B, N, dim)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with a fused `qkv` projection and an output `proj`."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise LayercritError(f"Expected `dim` {dim} to be divisible by `heads` {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, N, 3·dim) -> (3, B, heads, N, head_dim); indexing, not unpacking, keeps it fx-traceable.
        qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).flatten(2))


class TransformerBlock(nn.Module):
    """Pre-norm encoder block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: patch embedding, class token, learned position embedding, encoder blocks, final norm, head.

    The head reads the class token after the final `norm`. No dropout. Init as timm's original
    `vit_*` models: `cls_token`, `pos_embed` and every Linear (head included) trunc_normal(std=0.02)
    with zero bias, LayerNorm weight 1, bias 0; the patch-embedding conv keeps PyTorch's default.

    Args:
        input_shape: (channels, height, width); both sides divisible by `patch_size`.
        patch_size: side of the square patches.
        dim: token width.
        depth: number of encoder blocks.
        heads: attention heads.
        mlp_dim: hidden width of the block MLPs.
        num_classes: outputs of `head`.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 224, 224),
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int = 3072,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        gh, gw = patch_grid(input_shape, patch_size)
        self.patch_embed = PatchEmbed(int(input_shape[0]), dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, gh * gw + 1, dim))
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


@register_model("vit-tiny")
def vit_tiny(
    num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), patch_size: int = 4
) -> VisionTransformer:
    """A small ViT for tests and CIFAR-size data: dim 64, depth 4, 4 heads, MLP 256, 4×4 patches."""
    return VisionTransformer(tuple(input_shape), patch_size, 64, 4, 4, 256, num_classes)


@register_model("vit-digits")
def vit_digits(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 8, 8), patch_size: int = 4) -> VisionTransformer:
    """A ViT that trains on 8×8 digits in seconds per epoch (Zhang et al. §5 on a transformer): dim 64,
    depth 4, 4 heads, MLP 128, 4×4 patches (136,138 parameters on digits)."""
    return VisionTransformer(tuple(input_shape), patch_size, 64, 4, 4, 128, num_classes)


@register_model("vit-b16")
def vit_b16(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 224, 224)) -> VisionTransformer:
    """ViT-B/16: dim 768, depth 12, 12 heads, MLP 3072, 16×16 patches (86,567,656 parameters at 224 px, 1000 classes)."""
    return VisionTransformer(tuple(input_shape), 16, 768, 12, 12, 3072, num_classes)
