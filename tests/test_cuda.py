"""The CUDA branches of the engine and executors, and what they share with the CPU.

Tests marked `cuda` run only where `torch.cuda.is_available()` (skipped elsewhere with "needs CUDA";
`benchmarks/gpu_check.py` runs them with `pytest -m cuda`): autocast bf16/fp16, `compile`, inputs
resident on the device, cuDNN autotuning, the trial concatenation timed on CUDA, bf16 boundaries of
the prefix executor, the incremental executor's CUDA defaults (BatchNorm folding, vmapped trials).
The unmarked tests run everywhere and check the decisions those branches take (`autocast_dtype`,
`fits_resident`, the prefix executor's timing decision with its clock scripted) and the dtype
handling they rely on (measures in float64 from low-precision logits; bf16 boundaries on the CPU).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import layercrit
from layercrit.engine import engine as engine_module
from layercrit.engine.engine import Engine, Perturbation, autocast_dtype, fits_resident
from layercrit.engine.executors import prefix as prefix_module
from layercrit.engine.executors.prefix import PrefixExecutor
from layercrit.engine.measures import sample_measures
from layercrit.errors import LayercritError
from layercrit.testing import TinyMLP, TinyResNet, assert_same_measures

CUDA = torch.cuda.is_available()
cuda = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda)]
pytestmark = pytest.mark.filterwarnings("ignore:re-randomizing with each layer's reset_parameters")


class CastInputs(nn.Module):
    """A model held in another dtype, fed the float32 batches the data loader makes."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x):
        return self.net(x.to(self.dtype))


def _vit(dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    net = layercrit.create_model("vit-tiny", input_shape=(3, 16, 16)).eval().to(device, dtype)
    return CastInputs(net, dtype)


def _images(n=6):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def _mlp_data():
    torch.manual_seed(0)
    model = TinyMLP(d_in=4, hidden=8, classes=3)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 4, generator=g)


def _zero_perturbations(model):
    return [Perturbation(name, {name: torch.zeros_like(p)}) for name, p in model.named_parameters() if name.endswith("weight")]


# -- shared decisions, on any device ----------------------------------------------------------------


def test_autocast_dtype_is_bf16_or_fp16_on_cuda_only():
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    assert autocast_dtype("fp16", torch.device("cuda:1")) is torch.float16
    assert autocast_dtype(None, "cuda") is None
    assert autocast_dtype("bf16", "cpu") is None  # ignored off CUDA: the results are unchanged
    with pytest.raises(LayercritError, match="Expected `autocast` to be None, 'bf16' or 'fp16', got 'int8'"):
        autocast_dtype("int8", "cuda")


def test_measures_are_float64_from_bfloat16_logits():
    """p = (0, 0) → softmax (1/2, 1/2); q = (ln 3, 0) held in bf16 is (a, 0) with a = 1.1015625 (ln 3 =
    1.0986 rounded to bf16's 8-bit mantissa), softmax (s, 1 − s) with s = 1/(1 + e^−a). Then
    criticality = 1 − cos = 1 − ½ / (√½ · √(s² + (1 − s)²)), computed in float64 from the bf16 value:
    equal to 1e-12, where a bf16 result would be off by up to 2^-11 ≈ 5e-4."""
    p = torch.zeros(1, 2, dtype=torch.bfloat16)
    q = torch.tensor([[math.log(3), 0.0]]).bfloat16()
    a = float(q[0, 0])
    assert a == 1.1015625
    s = 1 / (1 + math.exp(-a))
    expected = 1 - 0.5 / (math.sqrt(0.5) * math.sqrt(s * s + (1 - s) ** 2))
    got = sample_measures(p, q)
    assert got["criticality"].dtype == torch.float64
    assert abs(float(got["criticality"][0]) - expected) < 1e-12
    assert abs(expected - (1 - 2 / math.sqrt(5))) > 1e-4  # ln 3 in full precision gives another number


def test_fits_resident_takes_at_most_the_fraction_of_free_memory():
    assert fits_resident(100, 400, 0.25)
    assert not fits_resident(101, 400, 0.25)
    assert not fits_resident(1, 0, 0.25)
    assert Engine.RESIDENT_FRACTION == 0.25


def test_resident_inputs_are_moved_only_when_they_fit(monkeypatch):
    """32 × 4 float32 inputs (512 B) and 32 int64 labels (256 B) take 768 B: moved once with 3072 B
    free (a quarter is 768), left where they are with 3071 B free."""
    model, x = _mlp_data()
    y = torch.zeros(32, dtype=torch.long)
    engine = Engine(model, x, y)
    moved = []
    monkeypatch.setattr(engine_module, "to_device", lambda v, device, **kw: moved.append(device) or v)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3072, 1 << 40))
    inputs, labels = engine._resident(x, y)
    assert moved == [engine.device] and inputs is x and labels is not None
    moved.clear()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3071, 1 << 40))
    inputs, labels = engine._resident(x, y)
    assert moved == [] and inputs is x and labels is y


@pytest.mark.parametrize("faster", [True, False], ids=["concatenated-faster", "one-by-one-faster"])
def test_trial_concatenation_follows_the_timing(monkeypatch, faster):
    """The automatic decision taken on CUDA (`batch_trials=None`), here on the CPU with the device check
    and the clock scripted: the first draw of the first block alone takes 1 s, the other two
    concatenated 0.5 s (or 2 s) per draw; concatenation is used exactly when it is faster, and the
    numbers equal the full forward's either way."""
    monkeypatch.setattr(PrefixExecutor, "_on_cuda", lambda self: True)
    per_draw = 0.5 if faster else 2.0
    ticks = [0.0, 1.0, 10.0, 10.0 + 2 * per_draw]  # one alone: 1 s; two concatenated: 2 × per_draw

    def clock():
        assert ticks, "timed more than once"
        return ticks.pop(0)

    monkeypatch.setattr(prefix_module, "time", SimpleNamespace(perf_counter=clock))
    kw = dict(probes=["rerandomize"], trials=3, granularity="block", layers=["L*"], batch_size=4)
    prefix = layercrit.measure(_vit(), _images(), executor="prefix", **kw)
    assert not ticks
    assert prefix.config["batch_trials_used"] is faster
    assert_same_measures(prefix, layercrit.measure(_vit(), _images(), executor="full", **kw))


def test_trial_concatenation_is_off_on_the_cpu_by_default():
    r = layercrit.measure(_vit(), _images(), probes=["rerandomize"], trials=3, granularity="block", layers=["L*"],
                          executor="prefix", batch_size=4)
    assert r.config["batch_trials_used"] is False


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_model_keeps_bfloat16_boundaries(device):
    """A ViT held in bf16 (as a 7B model on one GPU would be): the prefix executor's kept boundaries take
    half the bytes of the fp32 model's, its numbers equal the full forward's, and they are finite."""
    kw = dict(probes=["zero", "skip"], granularity="block", layers=["L*"], batch_size=4, device=device)
    p16 = layercrit.measure(_vit(torch.bfloat16, device), _images(), executor="prefix", **kw)
    f16 = layercrit.measure(_vit(torch.bfloat16, device), _images(), executor="full", **kw)
    p32 = layercrit.measure(_vit(torch.float32, device), _images(), executor="prefix", **kw)
    assert p16.config["kept_peak_bytes"] * 2 == p32.config["kept_peak_bytes"]
    assert p16.table["criticality"].notna().all()
    assert_same_measures(p16, f16, atol=1e-5 if device == "cpu" else 1e-3)


# -- the CUDA branches ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_autocast_runs_the_model_in_low_precision_and_measures_in_float64(name):
    """Under autocast the logits come out of the Linear head in bf16/fp16; the engine's criticality
    equals 1 − cos of their softmax computed in float64 here (and is near the fp32 run's)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
    model, x = _mlp_data()
    model = model.cuda().eval()
    perts = _zero_perturbations(model)
    engine = Engine(model, x, device="cuda", batch_size=64, autocast=name)
    assert engine.autocast is dtype
    _, got = engine.evaluate(perts)
    xc = x.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        p = model(xc)
        assert p.dtype == dtype
        for pt in perts:
            q = torch.func.functional_call(model, dict(model.named_parameters()) | dict(pt.values), (xc,))
            pp, qq = F.softmax(p.double(), 1), F.softmax(q.double(), 1)
            expected = float((1 - F.cosine_similarity(pp, qq, dim=1, eps=0)).mean())
            assert got[pt.key]["criticality"] == pytest.approx(expected, abs=1e-6)
    _, fp32 = Engine(model, x, device="cuda", batch_size=64).evaluate(perts)
    for pt in perts:
        assert abs(got[pt.key]["criticality"] - fp32[pt.key]["criticality"]) < 2e-2


@pytest.mark.parametrize("executor", ["full", "incremental"])
@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_compile_on_cuda_gives_the_eager_numbers(executor):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyResNet(), torch.randn(8, 1, 8, 8)
    kw = dict(factory=TinyResNet, trials=1, layers=["conv1", "fc"], executor=executor, device="cuda")
    assert_same_measures(layercrit.measure(model, x, **kw), layercrit.measure(model, x, compile=True, **kw), atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_inputs_resident_on_cuda_when_they_fit(monkeypatch):
    model, x = _mlp_data()
    y = torch.zeros(len(x), dtype=torch.long)
    perts = _zero_perturbations(model)
    resident = Engine(model, x, y, device="cuda", batch_size=8)
    assert resident.inputs.device.type == "cuda" and resident.labels.device.type == "cuda"
    monkeypatch.setattr(Engine, "RESIDENT_FRACTION", 0.0)
    streamed = Engine(model, x, y, device="cuda", batch_size=8)
    assert streamed.inputs.device.type == "cpu" and streamed.labels.device.type == "cpu"
    a, b = resident.evaluate(perts), streamed.evaluate(perts)
    assert a[0] == pytest.approx(b[0], nan_ok=True)
    for key in a[1]:
        assert a[1][key] == pytest.approx(b[1][key], abs=1e-7, nan_ok=True)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cudnn_autotuning_is_switched_on_on_cuda():
    saved = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        model, x = _mlp_data()
        Engine(model, x, device="cpu")
        assert torch.backends.cudnn.benchmark is False  # the CPU leaves it alone
        Engine(model, x, device="cuda")
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_trial_concatenation_is_timed_on_cuda():
    """On CUDA the prefix executor decides by timing (`batch_trials_used` a bool, not None or the CPU's
    False by default) and the numbers equal the full forward's whichever way it went."""
    kw = dict(probes=["rerandomize"], trials=3, granularity="block", layers=["L*"], batch_size=4, device="cuda")
    model = _vit(device="cuda")
    executor = PrefixExecutor(model)
    assert executor._on_cuda()
    prefix = layercrit.measure(model, _images(), executor="prefix", **kw)
    assert isinstance(prefix.config["batch_trials_used"], bool)
    assert_same_measures(prefix, layercrit.measure(_vit(device="cuda"), _images(), executor="full", **kw), atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_incremental_executor_on_cuda_folds_batchnorm_and_stacks_trials():
    """The incremental executor's CUDA defaults: BatchNorm folded into the convolutions, the trials of
    a layer vmapped together; the numbers equal the full forward's to round-off."""
    from layercrit.engine.executors.incremental import IncrementalExecutor

    torch.manual_seed(0)
    model = TinyResNet().cuda().eval()
    executor = IncrementalExecutor(model)
    assert executor._trace.folded and executor._stacking()
    x = torch.randn(16, 1, 8, 8)
    kw = dict(factory=TinyResNet, trials=3, device="cuda")
    assert_same_measures(layercrit.measure(model, x, executor="incremental", **kw),
                         layercrit.measure(model, x, executor="full", **kw), atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_training_defaults_to_cuda(tmp_path):
    """`train` without a device trains on CUDA where there is one (one epoch of digits: seconds)."""
    from layercrit.training.trainer import TrainConfig, train

    run = train(TrainConfig(model="fcn-3x64", data="digits", epochs=1, seed=0), tmp_path / "run")
    assert next(run.model.parameters()).device.type == "cuda"
