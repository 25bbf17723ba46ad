"""The block-prefix executor on the built-in ViT and Mixer: equal to the full forward for every probe
kind, the model restored and no hook left; refused, with the reason, where it cannot run."""

from __future__ import annotations

import pytest
import torch

import layercrit
from layercrit.engine.executors.prefix import PrefixExecutor
from layercrit.errors import LayercritError
from layercrit.testing import assert_no_hooks, assert_same_measures, assert_same_state, snapshot

pytestmark = pytest.mark.filterwarnings("ignore:re-randomizing with each layer's reset_parameters")
THIN = 2 * 4 * 17 * 64 * 4  # bytes: two block outputs of a batch (4 images, 17 tokens, width 64, fp32)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 10, (6,), generator=g)


def _run(name: str, executor: str, **kw):
    torch.manual_seed(0)
    model = layercrit.create_model(name, input_shape=(3, 16, 16)).eval()
    torch.manual_seed(1)
    reference = layercrit.create_model(name, input_shape=(3, 16, 16)).state_dict()
    before = snapshot(model)
    r = layercrit.measure(model, _data(), probes=["rerandomize", "reinit", "zero", "skip"], reference=reference,
                          trials=2, granularity="block", layers=["L*"], executor=executor, batch_size=4, **kw)
    assert_same_state(model, before)
    assert_no_hooks(model)
    return r


@pytest.mark.parametrize("name", ["vit-tiny", "mixer-tiny"])
@pytest.mark.parametrize("settings", [{}, {"batch_trials": True}, {"memory_budget": THIN},
                                      {"memory_budget": THIN, "batch_trials": True}],
                         ids=["plain", "concatenated", "thinned", "thinned-concatenated"])
def test_prefix_equals_full_on_builtin_models(name, settings):
    prefix, full = _run(name, "prefix", **settings), _run(name, "full")
    assert prefix.config["executor_used"] == "prefix"
    assert prefix.config["kept_peak_bytes"] <= settings.get("memory_budget", 1 << 30)
    assert_same_measures(prefix, full)


def test_prefix_refused_with_the_reason():
    with pytest.raises(LayercritError, match="executor 'prefix' needs a stack of repeated blocks; found none in"):
        PrefixExecutor(layercrit.create_model("fcn-3x64"))
    with pytest.raises(LayercritError, match="runs the model eagerly"):
        PrefixExecutor(layercrit.create_model("vit-tiny"), compile=True)
