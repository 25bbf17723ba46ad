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
