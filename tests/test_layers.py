import pytest
import torch.nn as nn

from layercrit import LayercritError, create_model, list_layers, select_units
from layercrit.testing import TinyCNN, TinyResNet, TinyTransformer


def test_fcn_layers():
    layers = list_layers(create_model("fcn-3x256"))
    assert [la.name for la in layers] == ["fc1", "fc2", "fc3", "classifier"]
    assert [la.n_params for la in layers] == [64 * 256 + 256, 256 * 256 + 256, 256 * 256 + 256, 256 * 10 + 10]
    assert all(la.kind == "Linear" and not la.is_norm for la in layers)


def test_cnn_with_batchnorm_lists_but_does_not_probe_norm():
    model = TinyCNN()
    assert [(la.name, la.is_norm) for la in list_layers(model)] == [("conv", False), ("bn", True), ("fc", False)]
    assert [u.name for u in select_units(model)] == ["conv", "fc"]
    assert [u.name for u in select_units(model, include_norm=True)] == ["conv", "bn", "fc"]
    # buffers are never part of a unit
    assert all("running" not in p for u in select_units(model, include_norm=True) for p in u.params)


def test_resnet_labels_and_blocks():
    model = TinyResNet()
    labels = {la.name: la.label for la in list_layers(model)}
    assert labels["conv1"] == "[0.0] conv"
    assert labels["layer1.0.conv1"] == "[1.0] conv1"
    assert labels["layer2.0.downsample.0"] == "[2.0] downsample"
    assert labels["fc"] == "[Head] fc"
    blocks = select_units(model, granularity="block")
    assert [u.label for u in blocks] == ["stage0", "stage1.resblk1", "stage1.resblk2", "stage2.resblk1", "stage2.resblk2", "final_linear"]
    # the block reset covers every conv in the block, not its BN (unless asked)
    b = {u.label: u for u in blocks}["stage2.resblk1"]
    assert set(b.layers) == {"layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"}
    bn = {u.label: u for u in select_units(model, granularity="block", include_norm=True)}
    assert "bn1.weight" in bn["stage0"].params and "layer2.0.bn1.weight" in bn["stage2.resblk1"].params
    zhang = {la.name: la.label for la in list_layers(model, label_style="zhang")}
    assert zhang["layer1.1.conv2"] == "stage1.resblk2.conv2"


def test_transformer_like_module():
    model = TinyTransformer()
    layers = {la.name: la for la in list_layers(model)}
    assert layers[""].params == ("cls_token", "pos")  # root owns its own parameters
    assert layers["encoder.layers.0.attn"].kind == "MultiheadAttention"
    assert layers["encoder.layers.0.norm1"].is_norm
    blocks = [u.name for u in select_units(model, granularity="block")]
    assert blocks == ["", "patch", "encoder.layers.0", "encoder.layers.1", "head"]


def test_subclasses_and_custom_parameters_are_layers():
    class MyLinear(nn.Linear):
        pass

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(nn.init.ones_(nn.Parameter(nn.Linear(1, 1).weight.new_empty(3))))

    model = nn.Sequential(MyLinear(3, 3), Scale())
    layers = list_layers(model)
    assert [(la.name, la.kind) for la in layers] == [("0", "MyLinear"), ("1", "Scale")]
    assert [u.name for u in select_units(model, types=["Linear"])] == ["0"]  # subclasses match their base


def test_tied_parameters_counted_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    layers = list_layers(model)
    assert [la.name for la in layers] == ["0"]
    assert layers[0].n_params == 40


def test_selection_globs_groups_and_errors():
    model = create_model("fcn-3x256")
    assert [u.name for u in select_units(model, layers=["fc*"])] == ["fc1", "fc2", "fc3"]
    groups = select_units(model, groups={"hidden": ["fc2", "fc3"], "head": ["classifier"]})
    assert [(g.name, g.layers) for g in groups] == [("hidden", ("fc2", "fc3")), ("head", ("classifier",))]
    assert groups[0].n_params == 2 * (256 * 256 + 256)
    with pytest.raises(LayercritError, match="matches none of the 4 layers; available: fc1"):
        select_units(model, layers=["conv*"])
    with pytest.raises(LayercritError, match="group 'x' .* matches no probe-able layer"):
        select_units(model, groups={"x": ["nope"]})
    with pytest.raises(LayercritError, match="Expected `granularity`"):
        select_units(model, granularity="neuron")
    with pytest.raises(LayercritError, match="no layer of type Conv2d"):
        select_units(model, types=["Conv2d"])


def test_wrapped_resnet_keeps_paper_labels():
    """A normalization wrapper (`model.` prefix) does not hide the ResNet layout."""
    from layercrit.data import wrap_normalized
    from layercrit.robustness import builtin_groups

    model = wrap_normalized(TinyResNet(), [0.5], [0.25])
    labels = {la.name: la.label for la in list_layers(model)}
    assert labels["model.conv1"] == "[0.0] conv" and labels["model.fc"] == "[Head] fc"
    blocks = select_units(model, granularity="block")
    assert [u.label for u in blocks][:2] == ["stage0", "stage1.resblk1"]
    assert blocks[1].layers == ("model.layer1.0.conv1", "model.layer1.0.conv2")
    assert builtin_groups(model, "every-second-block")["every-second-block"] == ["model.layer1.1.*", "model.layer2.1.*"]
