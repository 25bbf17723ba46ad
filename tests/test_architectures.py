"""The papers' architectures in the model registry: shapes, layer listings, labels, fx tracing, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from layercrit import LayercritError, list_layers, select_units
from layercrit.models import create_model, factory_for_data, list_models
from layercrit.models.resnet import Block, ResNet
from layercrit.units.layers import is_norm_layer

BIG = {"vit-b16", "mixer-b16"}


def _small_config(name: str) -> tuple[tuple[int, int, int], dict]:
    """A fast input shape and keyword arguments for a registered model."""
    if name.startswith("vgg"):
        return (3, 32, 32), {}  # five 2×2 max-pools need at least 32×32
    if "resnet" in name and "-w" not in name:
        return (1, 8, 8), {"width": 8}  # the Chatterji widths are fixed by name
    return (1, 8, 8), {}


@pytest.mark.parametrize("name", [n for n in list_models() if n not in BIG])
def test_registered_model_builds_lists_and_traces(name):
    shape, kwargs = _small_config(name)
    # The registry's own path: num_classes and input_shape come from the data.
    model = factory_for_data(name, kwargs, num_classes=7, input_shape=shape)().eval()
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 7)
        assert torch.isfinite(out).all()
        traced = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(traced(x), out, rtol=0, atol=1e-6)
    assert list_layers(model)
    units = select_units(model, granularity="block")
    assert units and all(u.params for u in units)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("resnet18", {"stem": "imagenet", "bn": True}, 11_689_512),  # torchvision resnet18
        ("resnet50", {"stem": "imagenet", "bn": True}, 25_557_032),  # torchvision resnet50
        ("vit-b16", {}, 86_567_656),  # timm vit_base_patch16_224
        ("mixer-b16", {}, 59_880_472),  # timm mixer_b16_224
    ],
)
def test_parameter_counts_match_the_reference_models(name, kwargs, expected):
    with torch.device("meta"):  # shapes only: skips allocating and initialising ~100M values
        model = create_model(name, num_classes=1000, input_shape=(3, 224, 224), **kwargs)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vgg16_parameter_counts():
    """torchvision's vgg16 has 138,357,544 parameters; the CIFAR head is 512·10 + 10 on top of the convs."""
    convs = 14_714_688
    assert sum(p.numel() for p in create_model("vgg16", num_classes=10).parameters()) == convs + 5_130
    fc = create_model("vgg16", num_classes=10, classifier="cifar-fc")
    assert sum(p.numel() for p in fc.parameters()) == convs + 512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 10 + 10
    with torch.device("meta"):
        big = create_model("vgg16", num_classes=1000, input_shape=(3, 224, 224), classifier="imagenet")
    assert sum(p.numel() for p in big.parameters()) == 138_357_544


class _UserBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (out + (x if self.downsample is None else self.downsample(x))).relu()


class _UserResNet(nn.Module):
    """A user's own two-stage ResNet that only shares torchvision's module names."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(_UserBlock(4, 4, 1), _UserBlock(4, 4, 1))
        self.layer2 = nn.Sequential(_UserBlock(4, 8, 2), _UserBlock(8, 8, 1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.bn1(self.conv1(x)).relu()))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("make", [lambda: create_model("resnet18"), _UserResNet], ids=["resnet18", "user"])
def test_resnet_layouts_get_paper_labels(make):
    model = make()
    labels = [layer.label for layer in list_layers(model)]
    for label in ["[0.0] conv", "[0.0] bn", "[1.0] conv1", "[1.1] conv2", "[2.0] downsample", "[Head] fc"]:
        assert label in labels
    assert labels[0] == "[0.0] conv" and labels[-1] == "[Head] fc"
    stages = 4 if isinstance(model, ResNet) else 2
    blocks = [f"stage{s}.resblk{b}" for s in range(1, stages + 1) for b in (1, 2)]
    assert [u.label for u in select_units(model, granularity="block")] == ["stage0", *blocks, "final_linear"]


def test_preact_resnet_labels_and_final_norm():
    model = create_model("preact-resnet18")
    labels = [layer.label for layer in list_layers(model)]
    assert labels[:3] == ["[0.0] conv", "[1.0] bn1", "[1.0] conv1"]
    assert labels[-2:] == ["bn_final", "[Head] fc"]
    assert isinstance(model.layer2[0].downsample, nn.Sequential) and len(model.layer2[0].downsample) == 1
    units = [u.label for u in select_units(model, granularity="block", include_norm=True)]
    assert units[0] == "stage0" and units[-2:] == ["bn_final", "final_linear"]


def test_chatterji_resnet18_widths():
    def widths(model: ResNet) -> list[int]:
        return [model.conv1.out_channels] + [getattr(model, f"layer{s}")[-1].conv2.out_channels for s in range(1, 5)]

    assert widths(create_model("resnet18-w16")) == [16, 16, 32, 64, 128]
    assert widths(create_model("resnet18-w16", width_mult=8)) == [128, 128, 256, 512, 1024]
    assert widths(create_model("resnet18-w64")) == [64, 64, 128, 256, 512]
    with pytest.raises(LayercritError, match="Expected `width_mult` to be 1, 2, 4 or 8, got 3"):
        create_model("resnet18-w16", width_mult=3)


def test_stem_follows_input_size():
    small, large = create_model("resnet18"), create_model("resnet18", input_shape=(3, 224, 224))
    assert small.conv1.kernel_size == (3, 3) and small.maxpool is None
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)
    for name in ("resnet50", "preact-resnet18"):
        for bn in (True, False):
            model = create_model(name, stem="imagenet", bn=bn, width=8, input_shape=(1, 64, 64), num_classes=3)
            assert model.eval()(torch.zeros(1, 1, 64, 64)).shape == (1, 3)


@pytest.mark.parametrize(
    ("name", "bn"),
    [("resnet18", True), ("resnet50", True), ("preact-resnet18", True), ("preact-resnet50", True), ("resnet18", False)],
)
def test_zero_init_residual_zeroes_the_end_of_every_branch(name, bn):
    model = create_model(name, width=8, bn=bn, zero_init_residual=True).eval()
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    ends = [getattr(b, f"conv{b.n}" if b.preact or not bn else f"bn{b.n}") for b in blocks]
    assert not any(end.weight.any() for end in ends)
    default = create_model(name, width=8, bn=bn).layer1[0]
    assert getattr(default, f"conv{default.n}" if default.preact or not bn else f"bn{default.n}").weight.any()
    # A block without a projection then passes (the ReLU of) its input through unchanged.
    x = torch.randn(2, blocks[1].conv1.in_channels, 8, 8).relu()
    torch.testing.assert_close(blocks[1](x), x)


@pytest.mark.parametrize("name", ["resnet18", "preact-resnet50", "vgg11"])
def test_without_bn_there_are_no_norm_layers(name):
    model = create_model(name, **({"width": 8, "bn": False} if "resnet" in name else {})).eval()
    assert not any(is_norm_layer(m) for m in model.modules())
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_invalid_configurations_are_explained():
    with pytest.raises(LayercritError, match="Expected the input size 30×30 to be divisible by `patch_size` 4"):
        create_model("vit-tiny", input_shape=(3, 30, 30))
    with pytest.raises(LayercritError, match="Expected `stem` to be 'cifar' or 'imagenet', got 'tiny'"):
        create_model("resnet18", stem="tiny")
    with pytest.raises(LayercritError, match="Expected VGG inputs of at least 32×32"):
        create_model("vgg11", input_shape=(1, 8, 8))
    with pytest.raises(LayercritError, match="Expected `classifier` to be 'cifar', 'cifar-fc' or 'imagenet'"):
        create_model("vgg11", classifier="mlp")
