import warnings

import pytest
import torch
import torch.nn as nn

from layercrit import LayercritError, create_model, list_probes, select_units, substitute
from layercrit.engine.probes import PROBES, Interpolate, Reinit, Rerandomize, Zero
from layercrit.models import resolve_factory
from layercrit.seeding import derive_seed
from layercrit.testing import (
    TinyCNN,
    TinyMLP,
    TinyResNet,
    TinyTransformer,
    assert_no_hooks,
    assert_same_state,
    snapshot,
)


def make_probe(name, model):
    """Every registered probe, constructed for `model`."""
    reference = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    kwargs = {
        "rerandomize": {"factory": lambda: type(model)()},
        "reinit": {"reference": reference},
        "zero": {},
        "interpolate": {"reference": reference, "alpha": 0.3, "sigma": 0.1},
    }[name]
    return PROBES.create(name, **kwargs)


MODELS = [TinyMLP, TinyCNN, TinyResNet, TinyTransformer]
VALUE_PROBES = [p for p in list_probes() if p != "skip"]  # probes that write parameter values (skip: below)


@pytest.mark.parametrize("probe_name", VALUE_PROBES)
@pytest.mark.parametrize("model_cls", MODELS)
def test_probe_changes_only_its_unit_and_restores_bit_exactly(probe_name, model_cls):
    torch.manual_seed(0)
    model = model_cls()
    model(torch.randn(2, *((4,) if model_cls is TinyMLP else (1, 8, 8))))  # touch BN buffers
    model.train()
    before = snapshot(model)
    probe = make_probe(probe_name, model)
    for unit in select_units(model):
        probe.check(model, [unit])
        with probe.apply(model, unit, seed=7):
            now = snapshot(model)
            changed = {n for n, v in now.items() if not torch.equal(v, before[n])}
            assert changed, f"{probe_name} changed nothing in {unit.name}"
            assert changed <= set(unit.params), f"{probe_name} on {unit.name} changed {changed - set(unit.params)}"
        assert_same_state(model, before)
    assert_no_hooks(model)


@pytest.mark.parametrize("probe_name", VALUE_PROBES)
def test_restores_after_exception(probe_name):
    model = TinyCNN()
    before = snapshot(model)
    probe = make_probe(probe_name, model)
    unit = select_units(model, layers=["conv"])[0]
    with pytest.raises(RuntimeError, match="boom"):
        with probe.apply(model, unit, seed=1):
            raise RuntimeError("boom")
    assert_same_state(model, before)


def test_substitute_restores_after_exception_and_rejects_bad_shapes():
    model = TinyMLP()
    before = snapshot(model)
    with pytest.raises(ValueError):
        with substitute(model, {"fc1.weight": torch.zeros(3, 4)}):
            raise ValueError
    assert_same_state(model, before)
    with pytest.raises(LayercritError, match=r"shape \(2, 2\); expected \(3, 4\)"):
        with substitute(model, {"fc1.weight": torch.zeros(2, 2)}):
            pass
    with pytest.raises(LayercritError, match="no parameter"):
        with substitute(model, {"nope": torch.zeros(1)}):
            pass
    assert_same_state(model, before)


def test_substitute_points_parameters_at_the_values_and_copies_the_rest():
    """A parameter alone on its storage reads the value itself and gets its own tensor back; one
    sharing its storage with another parameter, a value to convert and a buffer are copied, and
    everything is restored bit-exactly."""
    model = TinyMLP()
    model.register_buffer("scale", torch.ones(3))
    model.fc2.bias = nn.Parameter(model.fc2.bias.data)  # a second Parameter object on the same storage
    tied = nn.Parameter(model.fc2.bias.data)
    model.extra = nn.Module()
    model.extra.b = tied
    before = snapshot(model)
    own = {n: p.data for n, p in model.named_parameters()}
    values = {"fc1.weight": torch.randn(3, 4), "fc2.bias": torch.randn_like(model.fc2.bias),
              "fc1.bias": torch.randn(3, dtype=torch.float64), "scale": torch.full((3,), 2.0)}
    kept = {n: v.clone() for n, v in values.items()}
    with substitute(model, values):
        assert model.fc1.weight.data_ptr() == values["fc1.weight"].data_ptr()  # pointed, not copied
        assert model.fc2.bias.data_ptr() == own["fc2.bias"].data_ptr()  # shared storage: copied in place
        assert torch.equal(tied, values["fc2.bias"])  # and the other parameter on it sees the value
        assert torch.equal(model.fc1.bias, values["fc1.bias"].float()) and model.fc1.bias.dtype == torch.float32
        assert torch.equal(model.scale, values["scale"])
    assert_same_state(model, before)
    assert all(p.data_ptr() == own[n].data_ptr() for n, p in model.named_parameters())  # their own tensors back
    assert all(torch.equal(values[n], kept[n]) for n in values)  # the values untouched


def test_rerandomize_with_factory_is_the_factory_under_the_trial_seed():
    factory = resolve_factory("fcn-3x256")
    model = factory()
    probe = Rerandomize(factory)
    unit = select_units(model, layers=["fc2"])[0]
    seed = derive_seed(0, 1)
    torch.manual_seed(seed)
    expected = factory()
    values = probe.values(model, unit, seed)
    assert torch.equal(values["fc2.weight"], expected.fc2.weight)
    assert torch.equal(values["fc2.bias"], expected.fc2.bias)


def test_seeds_same_and_different():
    model = TinyMLP()
    probe = Rerandomize(TinyMLP)
    unit = select_units(model, layers=["fc1"])[0]
    a = probe.values(model, unit, derive_seed(0, 0))
    b = Rerandomize(TinyMLP).values(model, unit, derive_seed(0, 0))
    c = probe.values(model, unit, derive_seed(0, 1))
    assert torch.equal(a["fc1.weight"], b["fc1.weight"])
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])
    assert derive_seed(0, 0) != derive_seed(1, 0)


def test_rerandomize_does_not_touch_global_rng():
    model = TinyMLP()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    Rerandomize(TinyMLP).values(model, select_units(model)[0], 5)
    Rerandomize().values(model, select_units(model)[0], 5)
    assert torch.equal(torch.get_rng_state(), state)


def test_reset_parameters_fallback_warns_and_is_deterministic():
    model = TinyMLP()
    unit = select_units(model, layers=["fc1"])[0]
    probe = Rerandomize()
    with pytest.warns(UserWarning, match="reset_parameters"):
        probe.check(model, [unit])
    a = probe.values(model, unit, 3)
    b = probe.values(model, unit, 3)
    assert torch.equal(a["fc1.weight"], b["fc1.weight"])
    # the draw depends on the layer name, not on what else was selected
    both = select_units(model, groups=[["fc*"]])[0]
    assert torch.equal(probe.values(model, both, 3)["fc1.weight"], a["fc1.weight"])


def test_rerandomize_without_init_source_fails_clearly():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = Custom()
    units = select_units(model)
    with pytest.raises(LayercritError, match="cannot re-randomize layer .*no reset_parameters"):
        Rerandomize().check(model, units)


def test_factory_of_another_architecture_fails_clearly():
    model = create_model("fcn-3x256")
    with pytest.raises(LayercritError, match="factory builds 'fc1.weight' with shape"):
        Rerandomize(lambda: create_model("fcn-3x128")).check(model, select_units(model))
    with pytest.raises(LayercritError, match="builds no parameter"):
        Rerandomize(lambda: nn.Sequential(nn.Linear(64, 10))).check(model, select_units(model))


def test_reinit_and_interpolate_values():
    model = TinyMLP()
    ref = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    unit = select_units(model, layers=["fc2"])[0]
    assert torch.equal(Reinit(ref).values(model, unit, 0)["fc2.weight"], ref["fc2.weight"])
    assert torch.equal(Zero().values(model, unit, 0)["fc2.bias"], torch.zeros(2))
    mid = Interpolate(ref, alpha=0.25).values(model, unit, 0)["fc2.weight"]
    assert torch.allclose(mid, 0.75 * 2.0 + 0.25 * model.fc2.weight)
    assert torch.equal(Interpolate(ref, alpha=1.0).values(model, unit, 0)["fc2.weight"], model.fc2.weight)
    assert torch.equal(Interpolate(ref, alpha=0.0).values(model, unit, 0)["fc2.weight"], ref["fc2.weight"])
    noisy = [Interpolate(ref, alpha=1.0, sigma=0.5).values(model, unit, s)["fc2.weight"] for s in (1, 1, 2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    with pytest.raises(LayercritError, match="has no parameter 'fc1.weight'"):
        Reinit({}).check(model, select_units(model))
    with pytest.raises(LayercritError, match="Expected `alpha` to be in"):
        Interpolate(ref, alpha=2.0)


def test_registering_twice_warns():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        PROBES.register("zero")(Zero)
    assert any("registered twice" in str(x.message) for x in w)


# -- skip: a block (or sub-layer) becomes the identity on its residual stream --------------------------------


def _without_block(model, k):
    """A copy of TinyTransformer with encoder block `k` removed by hand."""
    import copy

    cut = copy.deepcopy(model)
    cut.encoder.layers = nn.ModuleList([b for i, b in enumerate(cut.encoder.layers) if i != k])
    return cut


def test_skip_block_equals_the_model_without_it_and_restores():
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(3, 1, 8, 8)
    before = snapshot(model)
    probe = PROBES.create("skip")
    blocks = select_units(model, granularity="block", layers=["L*"])
    probe.check(model, blocks)
    assert not probe.random and probe.describe() == {"probe": "skip", "target": "identity"}
    with torch.no_grad():
        base = model(x)
        for k, unit in enumerate(blocks):
            change = probe.values(model, unit, seed=0)
            assert dict(change) == {} and change.skip == {f"encoder.layers.{k}"}
            with probe.apply(model, unit):
                skipped = model(x)
                assert_same_state(model, before)  # nothing is written
            assert torch.equal(skipped, _without_block(model, k)(x))
            assert not torch.equal(skipped, base)
    assert_same_state(model, before)
    assert_no_hooks(model)
    with torch.no_grad():  # (MultiheadAttention's fast path runs only without grad: compare like with like)
        assert torch.equal(model(x), base)


def test_skip_sublayer_adds_nothing_to_the_residual():
    """In a pre-norm block x + attn(norm1(x)), skipping `attn` means attn(·) = 0: the same as zeroing its
    output projection (weight and bias); skipping the MLP the same as zeroing its last Linear."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    x = torch.randn(2, 1, 8, 8)
    skip, zero = PROBES.create("skip"), Zero()
    for granularity, last in (("attn", "attn.out_proj"), ("mlp", "mlp.2")):
        unit = select_units(model, granularity=granularity)[1]
        assert unit.label == f"L01.{granularity}"
        with torch.no_grad(), skip.apply(model, unit):
            q = model(x)
        layer = select_units(model, layers=[f"encoder.layers.1.{last}"])[0]
        with torch.no_grad(), zero.apply(model, layer):
            r = model(x)
        torch.testing.assert_close(q, r, rtol=0, atol=1e-6)
    assert_no_hooks(model)


def test_skip_modes_and_bad_units():
    from layercrit.engine.probes import Change, skip_mode

    model = TinyTransformer()
    assert skip_mode(model, "encoder.layers.0") == "input"
    assert skip_mode(model, "encoder.layers.0.attn") == "zero"
    assert skip_mode(model, "encoder.layers.0.norm1") == "residual"  # a norm is skipped as the identity
    probe = PROBES.create("skip")
    with pytest.raises(LayercritError, match=r"unit 'embed' .* is not in the block stack \(encoder.layers\); select blocks"):
        probe.check(model, select_units(model, granularity="block"))
    with pytest.raises(LayercritError, match="needs a stack of repeated blocks"):
        probe.check(TinyMLP(), select_units(TinyMLP()))
    with pytest.raises(LayercritError, match="no module.*nope"):
        with substitute(model, Change(skip=["nope"])):
            pass
    assert Change({"a": torch.zeros(1)}).skip == frozenset()
    assert_no_hooks(model)


def test_skip_of_a_shape_changing_block_fails_clearly_and_removes_hooks():
    """A ResNet's blocks form one stack across its stages; the first block of a downsampling stage
    changes the shape, so it has no identity."""
    model = TinyResNet().eval()
    before = snapshot(model)
    probe = PROBES.create("skip")
    units = select_units(model, granularity="block", layers=["stage*.resblk*"])
    probe.check(model, units)
    ok = {u.label: u for u in units}["stage2.resblk2"]
    with torch.no_grad(), probe.apply(model, ok):
        model(torch.randn(2, 1, 8, 8))
    bad = {u.label: u for u in units}["stage2.resblk1"]
    with pytest.raises(LayercritError, match=r"cannot skip 'layer2.0': its output has shape .* no identity"):
        with torch.no_grad(), probe.apply(model, bad):
            model(torch.randn(2, 1, 8, 8))
    assert_no_hooks(model)
    assert_same_state(model, before)


def test_skip_restores_after_exception():
    model = TinyTransformer()
    before = snapshot(model)
    unit = select_units(model, granularity="block", layers=["L00"])[0]
    with pytest.raises(RuntimeError, match="boom"):
        with PROBES.create("skip").apply(model, unit):
            raise RuntimeError("boom")
    assert_no_hooks(model)
    assert_same_state(model, before)


@pytest.mark.parametrize("executor", ["full", "incremental"])
def test_skip_in_measure_equals_the_model_without_the_block(executor):
    """Through the engine (the incremental executor runs a skip as a full forward with hooks)."""
    from layercrit import measure
    from layercrit.engine.measures import sample_measures

    torch.manual_seed(0)
    model = create_model("vit-tiny", num_classes=3, input_shape=(1, 8, 8), patch_size=4).eval()
    x = torch.randn(6, 1, 8, 8)
    r = measure(model, x, probes=["skip", "rerandomize"], granularity="block", layers=["L01", "L02"], trials=1,
                executor=executor, factory=lambda: create_model("vit-tiny", num_classes=3, input_shape=(1, 8, 8)))
    rows = r.table[r.table["probe"] == "skip"].set_index("label")
    assert list(rows.index) == ["L01", "L02"] and (rows["trial"] == 0).all()
    import copy

    with torch.no_grad():
        p = model(x)
        cut = copy.deepcopy(model)
        cut.blocks = nn.Sequential(*[b for i, b in enumerate(cut.blocks) if i != 2])
        expected = sample_measures(p, cut(x), None)["criticality"].mean()
    assert rows.loc["L02", "criticality"] == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    assert_no_hooks(model)


# -- re-randomization: a Hugging Face-style `_init_weights`, factories that load weights --------------------


class _Config:
    initializer_range = 0.02


class _FakePreTrained(nn.Module):
    """Duck-types a transformers `PreTrainedModel`: `config`, `post_init`, `_init_weights` (std 0.02 for
    every Linear, a scaled `proj` in each block as GPT-2 does for `c_proj`, and no rule for `Odd`)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 64)
            self.proj = nn.Linear(64, 8)

        def forward(self, x):
            return x + self.proj(torch.relu(self.fc(self.norm(x))))

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(8))

    def __init__(self):
        super().__init__()
        self.config = _Config()
        self.embed = nn.Embedding(50, 8)
        self.blocks = nn.ModuleList([self.Block() for _ in range(3)])
        self.odd = self.Odd()
        self.head = nn.Linear(8, 5)
        self.post_init()

    def post_init(self):
        for m in self.modules():
            self._init_weights(m)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        if isinstance(module, self.Block):
            nn.init.normal_(module.proj.weight, std=self.config.initializer_range / 10)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(1))


def test_rerandomize_uses_the_models_own_init_weights():
    torch.manual_seed(0)
    model = _FakePreTrained()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "trained" values, far from the init
    units = select_units(model, layers=["embed", "L01.fc", "L01.proj", "head"])
    probe = Rerandomize()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reset_parameters warning: the model's own init is used
        probe.check(model, units)
    assert probe.describe()["init_source"] == "_init_weights"
    v = {n: t for u in units for n, t in probe.values(model, u, 4).items()}
    assert v["embed.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert v["blocks.1.fc.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    assert v["blocks.1.proj.weight"].std().item() == pytest.approx(0.002, rel=0.1)  # the block's rule, children first
    assert torch.equal(v["head.bias"], torch.zeros(5))
    # one draw of the block per seed, whichever of its layers is asked for
    block = select_units(model, granularity="block", layers=["L01"])[0]
    assert torch.equal(probe.values(model, block, 4)["blocks.1.proj.weight"], v["blocks.1.proj.weight"])
    assert not torch.equal(probe.values(model, units[2], 5)["blocks.1.proj.weight"], v["blocks.1.proj.weight"])
    # a layer `_init_weights` does not know and without reset_parameters() is refused, not left as is
    odd = select_units(model, layers=["odd"])
    probe.check(model, odd)
    with pytest.raises(LayercritError, match=r"_init_weights does not initialize gain .*no reset_parameters"):
        probe.values(model, odd[0], 0)


def test_factory_that_returns_the_trained_weights_is_refused():
    model = create_model("fcn-3x256")
    trained = {n: p.detach().clone() for n, p in model.state_dict().items()}

    def loads_weights():
        fresh = create_model("fcn-3x256")
        fresh.load_state_dict(trained)
        return fresh

    with pytest.raises(LayercritError, match="returns the model's own weights whatever the seed .*from_pretrained"):
        Rerandomize(loads_weights).check(model, select_units(model))
    # an untrained model built under seed 0 equals the factory's seed-0 draw: not an error
    factory = resolve_factory("fcn-3x256")
    torch.manual_seed(0)
    untrained = factory()
    Rerandomize(factory).check(untrained, select_units(untrained))
    # nor are units whose values are constant whatever the seed (an untrained norm's ones and zeros)
    norm = TinyCNN()
    Rerandomize(TinyCNN).check(norm, select_units(norm, layers=["bn"], include_norm=True))
