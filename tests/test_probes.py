import warnings

import pytest
import torch
import torch.nn as nn

from conftest import assert_no_hooks, assert_same_state, snapshot
from layercrit import LayercritError, create_model, list_probes, select_units, substitute
from layercrit.models import resolve_factory
from layercrit.probes import PROBES, Interpolate, Reinit, Rerandomize, Zero
from layercrit.seeding import derive_seed
from layercrit.testing import TinyCNN, TinyMLP, TinyResNet, TinyTransformer


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


@pytest.mark.parametrize("probe_name", list_probes())
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


@pytest.mark.parametrize("probe_name", list_probes())
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
