"""ResNets v1 (He et al. 2016a) and v2 / pre-activation (He et al. 2016b), in torchvision's layout.

Module names match torchvision's ResNet exactly (`conv1`, `bn1`, `layer1.0.conv1`,
`layer1.0.downsample.0`, `fc`), so `layercrit.labels` gives the papers' labels: Gavrikov's
`[0.0] conv`, `[1.0] conv1`, `[2.0] downsample`, `[Head] fc` and Zhang's blocks `stage0`,
`stage1.resblk1`, …, `final_linear`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LayercritError
from .registry import register_model

__all__ = ["Block", "ResNet"]

# depth -> (blocks per stage, bottleneck blocks)
_DEPTHS: dict[int, tuple[tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
_STEMS = ("cifar", "imagenet")


def _conv(cin: int, cout: int, k: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=bias)


def _maybe(module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    # Absent norm layers are None rather than nn.Identity, so a model without BN has no `bn*` modules at all.
    return x if module is None else module(x)


class Block(nn.Module):
    """One residual block: basic (3×3, 3×3) or bottleneck (1×1, 3×3, 1×1, ×4 channels).

    v1 (post-activation) registers `conv1, bn1, conv2, bn2[, conv3, bn3]` and a shortcut
    `downsample = Sequential(conv1x1, bn)`; v2 (pre-activation) registers `bn1, conv1, bn2, conv2[, bn3,
    conv3]` and `downsample = Sequential(conv1x1)` applied to the pre-activated input. The stride sits on
    the 3×3 conv (torchvision's "ResNet v1.5" bottleneck). Without BN the `bn*` attributes are None and
    convs have a bias.

    Args:
        cin: input channels.
        planes: width of the block; the output has `planes` (basic) or `4 * planes` (bottleneck) channels.
        stride: stride of the block's 3×3 conv and of its shortcut.
        bottleneck: bottleneck block instead of basic.
        preact: pre-activation (v2) ordering.
        bn: use BatchNorm.
    """

    def __init__(self, cin: int, planes: int, stride: int, bottleneck: bool, preact: bool, bn: bool) -> None:
        super().__init__()
        self.preact = preact
        cout = planes * (4 if bottleneck else 1)
        if bottleneck:
            specs = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, cout, 1, 1)]
        else:
            specs = [(cin, planes, 3, stride), (planes, cout, 3, 1)]
        self.n = len(specs)
        for i, (a, b, k, s) in enumerate(specs, 1):
            conv = _conv(a, b, k, s, bias=not bn)
            norm = nn.BatchNorm2d(a if preact else b) if bn else None
            # Registration order is module order, which is the order layers are listed in.
            for name, m in ((f"bn{i}", norm), (f"conv{i}", conv)) if preact else ((f"conv{i}", conv), (f"bn{i}", norm)):
                setattr(self, name, m)
        self.downsample = None
        if stride != 1 or cin != cout:
            shortcut = [_conv(cin, cout, 1, stride, bias=not bn)]
            if bn and not preact:
                shortcut.append(nn.BatchNorm2d(cout))
            self.downsample = nn.Sequential(*shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            pre = F.relu(_maybe(self.bn1, x))
            shortcut = x if self.downsample is None else self.downsample(pre)
            out = self.conv1(pre)
            for i in range(2, self.n + 1):
                out = getattr(self, f"conv{i}")(F.relu(_maybe(getattr(self, f"bn{i}"), out)))
            return out + shortcut
        out = x
        for i in range(1, self.n + 1):
            out = _maybe(getattr(self, f"bn{i}"), getattr(self, f"conv{i}")(out))
            if i < self.n:
                out = F.relu(out)
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))

    def zero_init_last(self) -> None:
        """Make the residual branch output zero, so the block starts as (nearly) the identity.

        v1 with BN zeroes the last BN's scale (torchvision's `zero_init_residual`); where the branch ends in
        a conv (v2, or no BN) that conv's weight and bias are zeroed instead.
        """
        last_bn = getattr(self, f"bn{self.n}")
        last = last_bn if (not self.preact and last_bn is not None) else getattr(self, f"conv{self.n}")
        nn.init.zeros_(last.weight)
        if last.bias is not None and last is not last_bn:
            nn.init.zeros_(last.bias)


class ResNet(nn.Module):
    """ResNet v1 or v2 with basic or bottleneck blocks, CIFAR or ImageNet stem, with or without BN.

    Stem: "cifar" is a 3×3 stride-1 conv without max-pool; "imagenet" is a 7×7 stride-2 conv and a 3×3
    stride-2 max-pool. v1 stems have `bn1` + ReLU after the conv; v2 follows He et al.'s
    fb.resnet.torch `preresnet.lua`: the CIFAR stem is the bare conv (the first block's `bn1`
    pre-activates it), the ImageNet stem keeps `bn1` + ReLU before the max-pool, and a final
    `bn_final` + ReLU follows the last stage. Then global average pooling and `fc`.

    Init (torchvision's ResNet init): convs kaiming_normal_(mode="fan_out", nonlinearity="relu") with
    zero bias when they have one; BN weight 1, bias 0; `fc` keeps PyTorch's default Linear init.

    Args:
        depth: 18 or 34 (basic blocks), 50, 101 or 152 (bottleneck blocks).
        version: 1 (post-activation) or 2 (pre-activation).
        stem: "cifar" or "imagenet".
        bn: use BatchNorm; without it there are no norm layers and every conv has a bias.
        width: channels of the stem and of the first stage; stages have width × 1, 2, 4, 8 (× 4 for
            bottleneck outputs).
        num_classes: outputs of `fc`.
        in_chans: input channels.
        zero_init_residual: start every residual branch at zero (see `Block.zero_init_last`).
    """

    def __init__(
        self,
        depth: int = 18,
        version: int = 1,
        stem: str = "cifar",
        bn: bool = True,
        width: int = 64,
        num_classes: int = 10,
        in_chans: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth not in _DEPTHS:
            raise LayercritError(f"Expected `depth` to be one of {', '.join(map(str, _DEPTHS))}, got {depth!r}")
        if version not in (1, 2):
            raise LayercritError(f"Expected `version` to be 1 or 2, got {version!r}")
        if stem not in _STEMS:
            raise LayercritError(f"Expected `stem` to be 'cifar' or 'imagenet', got {stem!r}")
        blocks, bottleneck = _DEPTHS[depth]
        imagenet, preact = stem == "imagenet", version == 2
        self.preact = preact
        self.conv1 = _conv(in_chans, width, 7 if imagenet else 3, 2 if imagenet else 1, bias=not bn)
        self.bn1 = nn.BatchNorm2d(width) if bn and (imagenet or not preact) else None
        self.stem_relu = imagenet or not preact
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else None
        cin = width
        for s, n in enumerate(blocks):
            planes = width * 2**s
            stage = []
            for b in range(n):
                stage.append(Block(cin, planes, 2 if s > 0 and b == 0 else 1, bottleneck, preact, bn))
                cin = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{s + 1}", nn.Sequential(*stage))
        self.bn_final = nn.BatchNorm2d(cin) if bn and preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Block):
                    m.zero_init_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _maybe(self.bn1, self.conv1(x))
        if self.stem_relu:
            x = F.relu(x)
        x = _maybe(self.maxpool, x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        if self.preact:
            x = F.relu(_maybe(self.bn_final, x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _default_stem(input_shape: tuple[int, ...]) -> str:
    # CIFAR-sized inputs (up to 64 px, e.g. Tiny ImageNet) keep their resolution; larger ones are downsampled early.
    return "cifar" if max(input_shape[1:]) <= 64 else "imagenet"


def _register(depth: int, version: int) -> None:
    name = f"resnet{depth}" if version == 1 else f"preact-resnet{depth}"

    def build(
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (3, 32, 32),
        stem: str | None = None,
        bn: bool = True,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> ResNet:
        stem = stem or _default_stem(input_shape)
        return ResNet(depth, version, stem, bn, width, num_classes, int(input_shape[0]), zero_init_residual)

    build.__name__ = build.__qualname__ = name.replace("-", "_")
    build.__doc__ = (
        f"ResNet-{depth} {'v1' if version == 1 else 'v2 (pre-activation)'}; stem defaults to 'cifar' for "
        "inputs up to 64 px, else 'imagenet'."
    )
    register_model(name)(build)


def _register_chatterji(width: int) -> None:
    def build(
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (3, 32, 32),
        width_mult: int = 1,
        stem: str | None = None,
        bn: bool = True,
        zero_init_residual: bool = False,
    ) -> ResNet:
        if width_mult not in (1, 2, 4, 8):
            raise LayercritError(f"Expected `width_mult` to be 1, 2, 4 or 8, got {width_mult!r}")
        stem = stem or _default_stem(input_shape)
        return ResNet(18, 1, stem, bn, width * width_mult, num_classes, int(input_shape[0]), zero_init_residual)

    build.__name__ = build.__qualname__ = f"resnet18_w{width}"
    build.__doc__ = (
        f"Chatterji et al.'s width-scaled ResNet-18 v1: {width}, {width}, {2 * width}, {4 * width}, {8 * width} "
        "channels in stages 0-4, times `width_mult`."
    )
    register_model(f"resnet18-w{width}")(build)


for _depth in _DEPTHS:
    _register(_depth, 1)
    _register(_depth, 2)
for _width in (16, 32, 64, 128):
    _register_chatterji(_width)
