"""The real torchvision and timm models end to end: `torchvision:NAME` / `timm:NAME` specs, the
incremental executor engaging (and equal to the full forward) on every architecture the issue names,
the paper's 54 ResNet-50 layers under the published results' names, and re-randomization drawing from
the library's own initialization."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn as nn
import torchvision

from layercrit import LayercritError, create_model, measure, resolve_factory
from layercrit.cli.app import main
from layercrit.engine.probes import Rerandomize
from layercrit.results import VALUE_COLUMNS
from layercrit.testing import assert_no_hooks, assert_same_state, snapshot
from layercrit.units.layers import list_layers, select_units

PUBLISHED = Path(__file__).resolve().parents[3] / "shared" / "data" / "gavrikov2024" / "results.csv.gz"

# (spec, constructor arguments, input side): random init, the smallest inputs each model takes.
# ViTs get a 32-px image size (2×2 patches of 16 px) through their own arguments.
MODELS = [
    ("torchvision:resnet18", {}, 32),
    ("torchvision:resnet50", {}, 32),
    ("torchvision:vgg16_bn", {"num_classes": 10}, 32),  # (10 classes: the 4096×1000 head only costs time)
    ("torchvision:convnext_tiny", {}, 32),
    ("torchvision:efficientnet_b0", {}, 32),
    ("torchvision:mobilenet_v3_small", {}, 32),
    ("torchvision:swin_t", {}, 32),
    ("torchvision:vit_b_16", {"image_size": 32}, 32),
    ("timm:resnet50", {}, 32),
    ("timm:regnety_002", {}, 32),
    ("timm:convnext_atto", {}, 32),
    ("timm:vit_small_patch16_224", {"img_size": 32}, 32),
    ("timm:deit_tiny_patch16_224", {"img_size": 32}, 32),
]
# Models that truly cannot run incrementally, with the reason the executor gives: none of these.
FALLS_BACK: dict[str, str] = {}
TOL = 1e-5


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics of `x`, as a trained model has for its data: an untrained deep network's
    activations otherwise grow layer by layer until float32 round-off, not the executor, decides."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _data(side: int, classes: int, n: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, side, side, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("spec,kwargs,side", MODELS, ids=[m[0] for m in MODELS])
def test_incremental_engages_and_equals_the_full_forward(spec, kwargs, side):
    # One thread: with two, the regions run on two single-threaded workers, whose convolutions round
    # differently from two-thread ones, and an untrained EfficientNet's zeroed layer (logits ~1e4)
    # turns that into 1e-3 of its KL; on one thread the numbers are the full forward's. (The threaded
    # path is tested in tests/test_executors.py.)
    torch.set_num_threads(1)
    factory = resolve_factory(spec, **kwargs)
    torch.manual_seed(0)
    model = factory()
    x, y = _data(side, 10 if "num_classes" in kwargs else 1000)
    model = _calibrate(model, x)
    units = [u.name for u in select_units(model)]
    picked = [units[0], units[len(units) // 2], units[-1]]  # first, a middle and the last layer
    probe = Rerandomize(factory)  # shared: each fresh model is built once
    before = snapshot(model)
    common = dict(probes=[probe, "zero"], trials=1, batch_size=2, layers=picked)
    inc = measure(model, (x, y), **common)
    full = measure(model, (x, y), executor="full", **common)
    if spec in FALLS_BACK:
        assert inc.config["executor_used"] == "full" and FALLS_BACK[spec] in inc.config["executor_reason"]
    else:
        assert inc.config["executor_used"] == "incremental", inc.config["executor_reason"]
        assert inc.config["kept_peak_bytes"] > 0
    cols = [c for c in VALUE_COLUMNS if c in inc.table.columns]
    assert list(inc.table["layer"]) == list(full.table["layer"])
    # Every measure to 1e-5 (relative for the unbounded ones: a loss of 7 may differ by 7e-5).
    np.testing.assert_allclose(inc.table[cols].to_numpy(float), full.table[cols].to_numpy(float), atol=TOL, rtol=TOL)
    assert_same_state(model, before)
    assert_no_hooks(model)


def _published_layers() -> list[str]:
    with gzip.open(PUBLISHED, "rt") as f:
        table = pd.read_csv(f, usecols=["layer", "model_id"])
    first = table[table["model_id"] == table["model_id"].iloc[0]]
    return [n.removeprefix("model.") for n in dict.fromkeys(first["layer"])]


@pytest.mark.parametrize("spec", ["torchvision:resnet50", "timm:resnet50"])
def test_resnet50_has_the_papers_54_layers_under_the_published_names(spec):
    model = create_model(spec)
    published = _published_layers()
    assert len(published) == 54
    default = select_units(model)  # normalization layers are not probed by default (Gavrikov §2)
    convs = select_units(model, types=["Conv2d", "Linear"])  # the reference's Conv/Linear selection
    assert [u.name for u in default] == [u.name for u in convs] == published
    labels = [u.label for u in default]
    assert labels[:4] == ["[0.0] conv", "[1.0] conv1", "[1.0] conv2", "[1.0] conv3"]
    assert labels[4] == "[1.0] downsample" and labels[-1] == "[Head] fc"
    figure = [u.label for u in select_units(model, label_style="figure")]  # the axis of the paper's Fig. 1
    assert figure[:5] == ["[0.0] conv:7x7", "[1.0] conv1:1x1", "[1.0] conv2:3x3", "[1.0] conv3:1x1", "[1.0] downsample"]
    assert figure[-1] == "[Head] fc"
    norms = {la.label: la for la in list_layers(model) if la.is_norm}
    assert "[1.0] downsample.bn" in norms and "[0.0] bn" in norms
    assert [la.label for la in list_layers(model, label_style="figure") if la.is_norm][:2] == ["[0.0] bn", "[1.0] bn1"]


def test_resnet18_figure_labels_use_its_own_kernel_sizes():
    labels = {u.name: u.label for u in select_units(create_model("torchvision:resnet18"), label_style="figure")}
    assert labels["layer1.0.conv1"] == "[1.0] conv1:3x3" and labels["layer2.0.downsample.0"] == "[2.0] downsample"


def _kaiming_fan_out_std(weight: torch.Tensor) -> float:
    return math.sqrt(2.0 / (weight.shape[0] * weight[0, 0].numel()))


@pytest.mark.parametrize("spec", ["torchvision:resnet50", "timm:resnet50"])
def test_rerandomize_draws_from_the_librarys_own_init(spec):
    """Both libraries initialize ResNet convolutions Kaiming-normal (fan_out, ReLU gain), not PyTorch's
    default Kaiming-uniform(a=√5), whose std for a 3×3×64 kernel is 3× smaller; timm zero-initializes
    each block's last norm (`zero_init_last`): a norm, not probed unless asked."""
    factory = resolve_factory(spec)
    torch.manual_seed(1)
    model = factory()
    unit = next(u for u in select_units(model) if u.name == "layer1.0.conv2")
    drawn = Rerandomize(factory).values(model, unit, seed=7)["layer1.0.conv2.weight"]
    want = _kaiming_fan_out_std(drawn)
    assert float(drawn.std()) == pytest.approx(want, rel=0.03)
    assert float(drawn.mean()) == pytest.approx(0.0, abs=0.05 * want)
    assert not torch.equal(drawn, model.get_submodule("layer1.0.conv2").weight)  # a fresh draw, not the model's
    bn3 = next(u for u in select_units(model, include_norm=True) if u.name == "layer1.0.bn3")
    assert "layer1.0.bn3" not in {u.name for u in select_units(model)}
    fresh = Rerandomize(factory).values(model, bn3, seed=7)["layer1.0.bn3.weight"]
    assert torch.all(fresh == 0) == (spec == "timm:resnet50")


def test_include_norm_stats_resets_running_statistics_too():
    factory = resolve_factory("torchvision:resnet18")
    torch.manual_seed(0)
    x, _ = _data(32, 1000)
    model = _calibrate(factory(), x)
    with torch.no_grad():  # trained-like affine parameters (not the init's ones and zeros)
        model.layer1[0].bn1.weight.uniform_(0.5, 1.5)
        model.layer1[0].bn1.bias.uniform_(-0.5, 0.5)
    affine = next(u for u in select_units(model, include_norm=True) if u.name == "layer1.0.bn1")
    stats = next(u for u in select_units(model, include_norm="stats") if u.name == "layer1.0.bn1")
    assert stats.params == affine.params + ("layer1.0.bn1.running_mean", "layer1.0.bn1.running_var")
    fresh = Rerandomize(factory).values(model, stats, seed=0)
    assert torch.all(fresh["layer1.0.bn1.running_mean"] == 0) and torch.all(fresh["layer1.0.bn1.running_var"] == 1)
    common = dict(factory=factory, trials=1, layers=["layer1.0.bn1"], batch_size=2)
    with_stats = measure(model, x, include_norm="stats", **common)
    assert with_stats.config["executor_used"] == "incremental"
    full = measure(model, x, include_norm="stats", executor="full", **common)
    np.testing.assert_allclose(with_stats.table["criticality"], full.table["criticality"], atol=TOL)
    affine_only = measure(model, x, include_norm=True, **common)
    assert with_stats.table["criticality"].iloc[1] != affine_only.table["criticality"].iloc[1]


def test_specs_errors_and_the_cli(capsys):
    with pytest.raises(LayercritError, match=r"torchvision has no model 'resnet5O'; close matches: resnet50"):
        resolve_factory("torchvision:resnet5O")
    with pytest.raises(LayercritError, match=r"timm has no model 'vit_smol_patch16_224'; close matches: vit_small_patch16_224"):
        resolve_factory("timm:vit_smol_patch16_224")
    with pytest.raises(LayercritError, match=r"model spec 'timm:' names no model"):
        resolve_factory("timm:")
    assert create_model("timm:resnet18", num_classes=7).fc.out_features == 7
    assert isinstance(create_model("torchvision:resnet18"), torchvision.models.ResNet)
    assert isinstance(create_model("timm:resnet18"), timm.models.ResNet)
    assert main(["layers", "--model", "timm:resnet50", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    rows = rows if isinstance(rows, list) else rows["layers"]
    assert sum(r["probed"] == "yes" for r in rows) == 54
