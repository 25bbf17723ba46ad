import math

import numpy as np
import pandas as pd
import pytest
import torch

from layercrit import LayercritError, load_data, measure
from layercrit.models import factory_for_data
from layercrit.results import UNMODIFIED, CriticalityResult
from layercrit.testing import TinyCNN, assert_no_hooks, assert_same_state, snapshot

COLUMNS = ["model", "layer", "label", "probe", "trial", "seed", "n", "criticality", "accuracy", "top5",
           "accuracy_drop", "agreement", "l1", "l2", "kl"]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def fcn(digits):
    factory = factory_for_data("fcn-3x64", {}, digits.num_classes, digits.input_shape)
    torch.manual_seed(0)
    return factory(), factory


def test_table_shape_columns_and_determinism(fcn, digits):
    model, factory = fcn
    before = snapshot(model)
    model.train()
    a = measure(model, digits, factory=factory, probes=["rerandomize", "zero"], trials=3, images=100, data_seed=1)
    b = measure(model, digits, factory=factory, probes=["rerandomize", "zero"], trials=3, images=100, data_seed=1)
    assert_same_state(model, before)
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert_no_hooks(model)
    t = a.table
    assert set(COLUMNS) <= set(t.columns)
    assert len(t) == 1 + 4 * 3 + 4  # unmodified + rerandomize 4 layers x 3 trials + zero 4 layers x 1
    assert (t["n"] == 100).all()
    pd.testing.assert_frame_equal(a.table, b.table)
    base = t[t["layer"] == UNMODIFIED].iloc[0]
    assert base["probe"] == "none" and base["criticality"] == pytest.approx(0, abs=1e-7)
    rr = t[t["probe"] == "rerandomize"]
    assert rr.groupby("layer")["seed"].nunique().eq(3).all()  # a different seed per trial...
    assert rr.groupby("trial")["seed"].nunique().eq(1).all()  # ...shared by the layers of a trial
    assert rr.groupby("layer")["criticality"].nunique().eq(3).all()  # different draws
    assert np.allclose(t["accuracy_drop"], base["accuracy"] - t["accuracy"])


def test_other_seed_other_values_same_data_seed_same_subset(fcn, digits):
    model, factory = fcn
    a = measure(model, digits, factory=factory, trials=1, seed=0, images=50, layers=["fc1"])
    b = measure(model, digits, factory=factory, trials=1, seed=1, images=50, layers=["fc1"])
    assert a.config["data_identity"] == b.config["data_identity"]
    assert a.table["criticality"].iloc[1] != b.table["criticality"].iloc[1]
    c = measure(model, digits, factory=factory, trials=1, seed=0, images=50, data_seed=5, layers=["fc1"])
    assert c.config["data_identity"] != a.config["data_identity"]


def test_summary_statistics(fcn, digits):
    model, factory = fcn
    r = measure(model, digits, factory=factory, trials=4, layers=["fc2"])
    s = r.summary()
    row = s[s["layer"] == "fc2"].iloc[0]
    v = r.table[r.table["layer"] == "fc2"]["criticality"].to_numpy()
    assert row["trials"] == 4
    assert row["criticality_mean"] == pytest.approx(v.mean())
    assert row["criticality_std"] == pytest.approx(v.std(ddof=1))
    assert row["criticality_sem"] == pytest.approx(v.std(ddof=1) / 2)
    half = 3.182446305284263 * v.std(ddof=1) / 2  # t(0.975, 3 dof)
    assert row["criticality_ci_low"] == pytest.approx(v.mean() - half)
    assert row["criticality_ci_high"] == pytest.approx(v.mean() + half)


def test_batch_size_does_not_change_results(fcn, digits):
    model, factory = fcn
    a = measure(model, digits, factory=factory, trials=1, batch_size=7)
    b = measure(model, digits, factory=factory, trials=1, batch_size=1000)
    np.testing.assert_allclose(a.table["criticality"], b.table["criticality"], atol=1e-10)


def test_unlabelled_data_gives_nan_accuracy(fcn, digits):
    model, factory = fcn
    r = measure(model, digits.x[:20], factory=factory, trials=1)
    assert r.table["accuracy"].isna().all() and r.table["criticality"].notna().all()


def test_block_granularity_and_norm(digits):
    model = TinyCNN()
    r = measure(model, digits, factory=TinyCNN, trials=1, include_norm=True, images=40)
    assert list(r.table["layer"][1:]) == ["conv", "bn", "fc"]
    assert r.table["n_params"].tolist()[1:] == [40, 8, 650]


def test_save_and_load(tmp_path, fcn, digits):
    model, factory = fcn
    r = measure(model, digits, factory=factory, trials=2, images=30)
    r.save(tmp_path / "r.csv")
    r.save(tmp_path / "r.json")
    assert (tmp_path / "r.config.json").is_file()
    for name in ("r.csv", "r.json"):
        back = CriticalityResult.load(tmp_path / name)
        np.testing.assert_allclose(back.table["criticality"], r.table["criticality"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.config.json", "r.csv", "r.json"]  # no temp files


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"trials": 0}, "Expected `trials` to be a positive integer, got 0"),
        ({"images": 100000, "strict_images": True}, "asked for 100000 images but data 'digits:test' has only 360"),
        ({"images": 0}, "Expected `images` to be a positive integer, got 0"),
        ({"seed": -1}, "Expected `seed` to be a non-negative integer"),
        ({"probes": "reinit"}, "probe 'reinit' needs a reference state dict"),
        ({"probes": "nope"}, "unknown probe 'nope'"),
        ({"layers": ["conv*"]}, "matches none"),
    ],
)
def test_bad_arguments(fcn, digits, kwargs, message):
    model, factory = fcn
    with pytest.raises(LayercritError, match=message):
        measure(model, digits, factory=factory, **kwargs)


def test_bad_data_for_model(fcn, digits):
    model, factory = fcn
    with pytest.raises(LayercritError, match=r"cannot take inputs of shape \(3, 5\)"):
        measure(model, torch.zeros(4, 3, 5), factory=factory)
    with pytest.raises(LayercritError, match=r"labels range over 0..12 but the model has 10 outputs"):
        measure(model, (digits.x[:3], torch.tensor([0, 12, 1])), factory=factory)
    assert math.isfinite(measure(model, digits.x[:2], factory=factory, trials=1).table["criticality"].iloc[1])
