import pytest
import torch


@pytest.fixture(autouse=True)
def _fixed_threads():
    torch.set_num_threads(2)
    yield


def assert_same_state(model, before):
    """Every parameter and buffer equal bit for bit to the saved `before` (a dict of clones)."""
    after = dict(model.named_parameters()) | dict(model.named_buffers())
    assert after.keys() == before.keys()
    for name, value in after.items():
        assert torch.equal(value, before[name]), name


def snapshot(model):
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def assert_no_hooks(model):
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks


MEASURES = ["criticality", "agreement", "l1", "l2", "kl", "accuracy", "loss"]


def assert_same_measures(got, expected, measures=MEASURES, atol=1e-5, keys=("layer", "probe", "trial")):
    """Two results (or tables) hold the same rows and every measure agrees to `atol` (NaN where NaN)."""
    a, b = (getattr(t, "table", t) for t in (got, expected))
    keys = [k for k in keys if k in a.columns]
    a, b = a.set_index(keys), b.set_index(keys)
    assert a.index.equals(b.index)
    for m in measures:
        if m in a and a[m].notna().any():
            torch.testing.assert_close(torch.tensor(a[m].to_numpy(float)), torch.tensor(b[m].to_numpy(float)),
                                       rtol=0, atol=atol, equal_nan=True, msg=lambda msg, m=m: f"{m}: {msg}")
