"""Block stacks: found wherever they sit, with their embeddings, head and sub-layers."""

from __future__ import annotations

import torch.nn as nn

from layercrit.models import create_model
from layercrit.testing import TinyMLP, TinyResNet, TinyTransformer
from layercrit.units.blocks import find_block_stack


def test_builtin_vit_and_mixer():
    vit = find_block_stack(create_model("vit-tiny"))
    assert vit.path == "blocks" and vit.stages == ("blocks",) and vit.kind == "TransformerBlock"
    assert vit.names == ("blocks.0", "blocks.1", "blocks.2", "blocks.3") and len(vit) == 4
    assert vit.embed == ("patch_embed", "")  # the root's own cls_token and pos_embed are embeddings
    assert vit.head == ("norm", "head")
    assert vit.attn[2] == ("blocks.2.attn",) and vit.mlp[2] == ("blocks.2.mlp",)
    mixer = find_block_stack(create_model("mixer-tiny"))
    assert mixer.embed == ("stem",) and mixer.head == ("norm", "head")
    assert mixer.attn[0] == ("blocks.0.mlp_tokens",) and mixer.mlp[0] == ("blocks.0.mlp_channels",)


def test_resnet_stages_are_one_stack():
    stack = find_block_stack(TinyResNet())
    assert stack.path == "" and stack.stages == ("layer1", "layer2")
    assert stack.names == ("layer1.0", "layer1.1", "layer2.0", "layer2.1")
    assert stack.embed == ("conv1", "bn1") and stack.head == ("fc",)
    assert stack.attn == ((),) * 4 and stack.block_of("layer2.0.downsample.0") == 2 and stack.block_of("fc") is None


def test_wrapped_and_nested():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = TinyTransformer()

    stack = find_block_stack(Wrapper())
    assert stack.path == "net.encoder.layers" and stack.names == ("net.encoder.layers.0", "net.encoder.layers.1")
    assert stack.embed == ("net.patch", "net") and stack.head == ("net.norm", "net.head")
    assert stack.ancestors == ("", "net", "net.encoder", "net.encoder.layers")


def test_no_stack():
    assert find_block_stack(TinyMLP()) is None
    assert find_block_stack(create_model("fcn-3x256")) is None
    # a list of single layers (heads, experts without submodules) is not a stack of blocks
    assert find_block_stack(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))) is None


def test_the_stack_with_most_parameters_wins():
    class EncDec(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Module()
            self.encoder.layers = nn.ModuleList([TinyMLP(4, 3, 4) for _ in range(4)])
            self.decoder = nn.Module()
            self.decoder.layers = nn.ModuleList([TinyMLP(4, 30, 4) for _ in range(2)])

    assert find_block_stack(EncDec()).path == "decoder.layers"
