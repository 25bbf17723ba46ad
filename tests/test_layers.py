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
    blocks = [(u.name, u.label) for u in select_units(model, granularity="block")]
    # the embeddings (the patch conv and the root's own cls_token and pos) and the head are one unit each;
    # the final norm is part of the head but not probed (include_norm=False)
    assert blocks == [("patch+cls_token+pos", "embed"), ("encoder.layers.0", "L00"), ("encoder.layers.1", "L01"), ("norm+head", "head")]
    head = select_units(model, granularity="block", include_norm=True)[-1]
    assert head.layers == ("norm", "head") and head.modules == ("norm", "head")


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
    from layercrit.analyses.robustness import builtin_groups
    from layercrit.data import wrap_normalized

    model = wrap_normalized(TinyResNet(), [0.5], [0.25])
    labels = {la.name: la.label for la in list_layers(model)}
    assert labels["model.conv1"] == "[0.0] conv" and labels["model.fc"] == "[Head] fc"
    blocks = select_units(model, granularity="block")
    assert [u.label for u in blocks][:2] == ["stage0", "stage1.resblk1"]
    assert blocks[1].layers == ("model.layer1.0.conv1", "model.layer1.0.conv2")
    assert builtin_groups(model, "every-second-block")["every-second-block"] == ["model.layer1.1.*", "model.layer2.1.*"]


def test_transformer_units_and_labels():
    model = create_model("vit-tiny")
    blocks = select_units(model, granularity="block")
    assert [u.label for u in blocks] == ["embed", "L00", "L01", "L02", "L03", "head"]
    assert [u.name for u in blocks] == ["patch_embed+cls_token+pos_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "norm+head"]
    assert blocks[0].params == ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")
    assert "blocks.1.norm1.weight" not in blocks[2].params  # norms follow include_norm
    assert "blocks.1.norm1.weight" in select_units(model, granularity="block", include_norm=True)[2].params
    attn = select_units(model, granularity="attn")
    assert [(u.name, u.label) for u in attn][:2] == [("blocks.0.attn", "L00.attn"), ("blocks.1.attn", "L01.attn")]
    assert attn[0].params == ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias")
    mlp = select_units(model, granularity="mlp", layers=["L03*"])
    assert [(u.name, u.label, u.modules) for u in mlp] == [("blocks.3.mlp", "L03.mlp", ("blocks.3.mlp",))]
    labels = {la.name: la.label for la in list_layers(model)}
    assert labels[""] == "embed.cls_token+pos_embed" and labels["patch_embed.proj"] == "embed.patch_embed.proj"
    assert labels["blocks.2.attn.qkv"] == "L02.attn.qkv" and labels["blocks.2.mlp.fc2"] == "L02.mlp.fc2"
    assert labels["blocks.2.norm1"] == "L02.norm1" and labels["norm"] == "head.norm" and labels["head"] == "head"
    # globs match names and labels alike
    assert [u.name for u in select_units(model, granularity="block", layers=["blocks.[12]"])] == ["blocks.1", "blocks.2"]
    assert [u.name for u in select_units(model, layers=["L01.mlp.*"])] == ["blocks.1.mlp.fc1", "blocks.1.mlp.fc2"]
    # label style "name" keeps module names
    assert [u.label for u in select_units(model, granularity="block", label_style="name")][1] == "blocks.0"
    assert list_layers(model, label_style="name")[0].label == "(root)"


def test_tied_parameters_are_named_in_the_label():
    from layercrit.testing import _EncoderBlock

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.layers = nn.ModuleList([_EncoderBlock(8, 2) for _ in range(2)])
            self.lm_head = nn.Linear(8, 10, bias=False)
            self.lm_head.weight = self.embed.weight

    model = LM()
    units = select_units(model, granularity="block")
    assert [u.label for u in units] == ["embed (tied: lm_head)", "L00", "L01"]  # lm_head owns nothing of its own
    assert list_layers(model)[0].label == "embed (tied: lm_head)"


def test_sublayer_granularity_needs_a_transformer():
    with pytest.raises(LayercritError, match="granularity 'attn' needs a stack of transformer blocks"):
        select_units(TinyResNet(), granularity="attn")
    with pytest.raises(LayercritError, match="Expected `granularity` to be one of layer, block, attn, mlp"):
        select_units(TinyResNet(), granularity="head")
