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


class _DenseSkip(torch.nn.Module):
    """Four blocks whose head also reads the first block's output: not a plain chain."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()) for _ in range(4))
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = first = self.blocks[0](x)
        for block in self.blocks[1:]:
            h = block(h)
        return self.head(h + first)


def test_blocks_read_elsewhere_are_refused_and_auto_falls_back():
    """Checked on the first batch from the last kept boundary, where the most blocks answer with a
    kept output: the head's read of the first block's output shows."""
    from layercrit.engine import Engine, Perturbation

    model, x = _DenseSkip(), torch.randn(6, 8)
    values = [{f"blocks.{k}.0.weight": torch.zeros(8, 8)} for k in range(4)]
    ex = PrefixExecutor(model)
    ex.prepare(values)
    with pytest.raises(LayercritError, match="not a plain chain"):
        ex.start_batch(x)
    probes = [Perturbation(k, v) for k, v in enumerate(values)]
    fallback = PrefixExecutor(model, fallback=True)
    base, got = Engine(model, x, executor=fallback).evaluate(probes)
    assert "not a plain chain" in fallback.fallback_reason
    _, want = Engine(model, x, executor="full").evaluate(probes)
    assert got == want
    assert_no_hooks(model)


def test_probed_outputs_are_asked_for_one_at_a_time_on_the_cpu(monkeypatch):
    """Without concatenated trials `run_many` gains nothing: the engine asks for one probed output at
    a time and holds one (a language model's logits are large), with the full forward's numbers over
    several batches, the last one smaller."""
    from layercrit.engine import Engine, Perturbation

    model = layercrit.create_model("vit-tiny", input_shape=(3, 16, 16)).eval()
    x, _ = _data()
    probes = [Perturbation(name, {name: torch.zeros_like(p)}) for name, p in model.named_parameters()
              if name.startswith("blocks.") and name.endswith("fc1.weight")]
    assert len(probes) > 1
    ex = PrefixExecutor(model)
    monkeypatch.setattr(ex, "run_many", lambda values: pytest.fail("asked for several outputs at once"))
    _, got = Engine(model, x, executor=ex, batch_size=4).evaluate(probes)
    assert not ex.batches_outputs
    _, want = Engine(model, x, executor="full", batch_size=4).evaluate(probes)
    for key in want:
        for m, v in want[key].items():
            assert got[key][m] == pytest.approx(v, rel=1e-6, abs=1e-12, nan_ok=True), (key, m)
