"""MLP-Mixer (Tolstikhin et al. 2021) with timm's module names, traceable by torch.fx."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._layers import Mlp, patch_grid
from .registry import register_model

__all__ = ["MixerBlock", "MlpMixer"]


class MixerBlock(nn.Module):
    """Token mixing across patches, then channel mixing, each pre-norm and residual."""

    def __init__(self, num_tokens: int, dim: int, tokens_dim: int, channels_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_tokens = Mlp(num_tokens, tokens_dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp_channels = Mlp(dim, channels_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mlp_tokens(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mlp_channels(self.norm2(x))


class MlpMixer(nn.Module):
    """MLP-Mixer: conv patch embedding `stem`, mixer blocks, final `norm`, mean over tokens, `head`.

    Init: every Linear xavier_uniform with zero bias, LayerNorm weight 1, bias 0, the `stem` conv
    PyTorch's default. The official code draws the MLP biases from N(0, 1e-6²) (zero here, to the same
    effect) and zero-initialises the head; we do not, because a zero head would make the untrained model
    constant and "re-randomize the head" the same probe as "zero the head".

    Args:
        input_shape: (channels, height, width); both sides divisible by `patch_size`.
        patch_size: side of the square patches.
        dim: channels per token.
        depth: number of mixer blocks.
        tokens_dim: hidden width of the token-mixing MLPs.
        channels_dim: hidden width of the channel-mixing MLPs.
        num_classes: outputs of `head`.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (3, 224, 224),
        patch_size: int = 16,
        dim: int = 768,
        depth: int = 12,
        tokens_dim: int = 384,
        channels_dim: int = 3072,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        gh, gw = patch_grid(input_shape, patch_size)
        self.stem = nn.Conv2d(int(input_shape[0]), dim, patch_size, patch_size)
        self.blocks = nn.Sequential(*(MixerBlock(gh * gw, dim, tokens_dim, channels_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


@register_model("mixer-tiny")
def mixer_tiny(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), patch_size: int = 4) -> MlpMixer:
    """A small Mixer for tests and CIFAR-size data: dim 64, depth 4, token MLP 32, channel MLP 256, 4×4 patches."""
    return MlpMixer(tuple(input_shape), patch_size, 64, 4, 32, 256, num_classes)


@register_model("mixer-b16")
def mixer_b16(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 224, 224)) -> MlpMixer:
    """Mixer-B/16: dim 768, depth 12, token MLP 384, channel MLP 3072, 16×16 patches (59,880,472 parameters at 224 px, 1000 classes)."""
    return MlpMixer(tuple(input_shape), 16, 768, 12, 384, 3072, num_classes)
