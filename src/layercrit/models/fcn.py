"""Fully connected networks of Zhang et al. (FCN D×H): D hidden Linear+ReLU layers of width H."""

from __future__ import annotations

import math

import torch.nn as nn

from .registry import register_model

__all__ = ["FCN", "fcn"]


class FCN(nn.Module):
    """Flatten, D × (Linear(H) + ReLU), then a linear classifier. PyTorch's default init.

    Layers are named `fc1`, …, `fcD` and `classifier` (Zhang's `final_linear`).
    """

    def __init__(
        self,
        depth: int = 3,
        width: int = 256,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (1, 8, 8),
    ) -> None:
        super().__init__()
        self.depth, self.width = depth, width
        in_features = math.prod(input_shape)
        for i in range(depth):
            self.add_module(f"fc{i + 1}", nn.Linear(in_features if i == 0 else width, width))
        self.classifier = nn.Linear(width if depth else in_features, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        for i in range(self.depth):
            x = getattr(self, f"fc{i + 1}")(x).relu()
        return self.classifier(x)


def fcn(depth: int = 3, width: int = 256, num_classes: int = 10, input_shape: tuple[int, ...] = (1, 8, 8)) -> FCN:
    """FCN with `depth` hidden layers of `width` units."""
    return FCN(depth, width, num_classes, tuple(input_shape))


def _register(depth: int, width: int) -> None:
    def build(num_classes: int = 10, input_shape: tuple[int, ...] = (1, 8, 8)) -> FCN:
        return FCN(depth, width, num_classes, tuple(input_shape))

    build.__doc__ = f"FCN with {depth} hidden layers of width {width} (Zhang et al.)."
    register_model(f"fcn-{depth}x{width}")(build)


for _d, _w in [(1, 256), (2, 256), (3, 256), (4, 256), (5, 256), (3, 64), (3, 128), (3, 512), (3, 1024), (5, 64)]:
    _register(_d, _w)
register_model("fcn")(fcn)
