"""VGG-11/13/16/19 (Simonyan & Zisserman 2014), with or without BN, in torchvision's module layout."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import LayercritError
from .registry import register_model

__all__ = ["VGG"]

# depth -> conv widths, "M" = 2×2 max-pool (torchvision's configurations A, B, D, E)
_CFGS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """VGG: `features` (3×3 convs [+ BN] + ReLU, five max-pools), then `classifier`.

    Heads, on the flattened features (512 × H/32 × W/32, i.e. 512 for 32×32 inputs):

    - "cifar": one Linear, the head of the common CIFAR VGGs (e.g. kuangliu/pytorch-cifar).
    - "cifar-fc": the original three Linear layers (4096, ReLU, Dropout, 4096, ReLU, Dropout, classes)
      without pooling. Zhang et al. label their CIFAR VGG layers `fc1`, `fc2`, `final_linear`, so their
      head has this shape (its width is not stated; 4096 is an assumption), and it gives the parameter
      counts implied by Chatterji et al.'s Table 3 for VGG-16.
    - "imagenet": torchvision's head, the same three layers after an adaptive average pool to 7×7,
      for 224×224 inputs.

    Init (torchvision's VGG init): convs kaiming_normal_(mode="fan_out", nonlinearity="relu"), Linear
    normal(0, 0.01), all biases zero, BN weight 1, bias 0.

    Args:
        depth: 11, 13, 16 or 19 weight layers.
        bn: BatchNorm after every conv (torchvision's `vgg*_bn`; convs keep their bias, as there).
        num_classes: outputs of the last Linear.
        input_shape: (channels, height, width) of one input; at least 32×32.
        classifier: "cifar", "cifar-fc" or "imagenet".
    """

    def __init__(
        self,
        depth: int = 16,
        bn: bool = False,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (3, 32, 32),
        classifier: str = "cifar",
    ) -> None:
        super().__init__()
        if depth not in _CFGS:
            raise LayercritError(f"Expected `depth` to be one of 11, 13, 16, 19, got {depth!r}")
        if classifier not in ("cifar", "cifar-fc", "imagenet"):
            raise LayercritError(f"Expected `classifier` to be 'cifar', 'cifar-fc' or 'imagenet', got {classifier!r}")
        c, h, w = (int(s) for s in input_shape)
        if h < 32 or w < 32:
            raise LayercritError(f"Expected VGG inputs of at least 32×32 (five 2×2 max-pools), got {h}×{w}")
        layers: list[nn.Module] = []
        for v in _CFGS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                # Not in-place: a ReLU must not overwrite the conv/BN output that a forward hook may have kept.
                layers += [nn.Conv2d(c, v, 3, padding=1), *([nn.BatchNorm2d(v)] if bn else []), nn.ReLU()]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7)) if classifier == "imagenet" else None
        features = 512 * 7 * 7 if classifier == "imagenet" else 512 * (h // 32) * (w // 32)
        if classifier == "cifar":
            self.classifier: nn.Module = nn.Linear(features, num_classes)
        else:
            self.classifier = nn.Sequential(
                nn.Linear(features, 4096), nn.ReLU(), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(),
                nn.Linear(4096, num_classes),
            )  # fmt: skip
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.avgpool is not None:
            x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))


def _register(depth: int, bn: bool) -> None:
    name = f"vgg{depth}{'-bn' if bn else ''}"

    def build(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), classifier: str = "cifar") -> VGG:
        return VGG(depth, bn, num_classes, tuple(input_shape), classifier)

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    build.__doc__ = f"VGG-{depth}{' with BN' if bn else ''}; one-Linear CIFAR head unless `classifier` says otherwise."
    register_model(name)(build)


for _depth in _CFGS:
    _register(_depth, False)
    _register(_depth, True)
