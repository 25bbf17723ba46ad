"""Building blocks the architectures share (timm's `layers/`): the transformer MLP and the patch grid."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LayercritError


def patch_grid(input_shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    h, w = int(input_shape[1]), int(input_shape[2])
    if h % patch_size or w % patch_size:
        raise LayercritError(f"Expected the input size {h}×{w} to be divisible by `patch_size` {patch_size}")
    return h // patch_size, w // patch_size


class Mlp(nn.Module):
    """Linear `fc1`, GELU, Linear `fc2` on the last dimension."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))
