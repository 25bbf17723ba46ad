"""The incremental executor gives the full forward's results: every built-in model, every probe kind."""

import logging

import numpy as np
import pytest
import torch
import torch.nn as nn

from layercrit import EXECUTORS, Engine, FullForward, LayercritError, Perturbation, create_model, list_models, measure
from layercrit.engine.executors.incremental import IncrementalExecutor
from layercrit.engine.probes import Interpolate, Reinit, Rerandomize, Zero
from layercrit.results import VALUE_COLUMNS
from layercrit.testing import TinyMLP, TinyResNet, TinyTransformer, assert_no_hooks, assert_same_state, snapshot
from layercrit.units.layers import select_units

TOL = 1e-5
MODELS = list_models()  # every built-in architecture, the B/16 ViT and Mixer included (small inputs)


def _spec(name: str) -> tuple[tuple[int, ...], dict]:
    """Small inputs (and widths) that keep every model quick on two cores."""
    if name.startswith("fcn"):
        return (1, 8, 8), {}
    if name.startswith("vgg"):
        return (3, 32, 32), {}  # five 2×2 max-pools
    kwargs = {"width": 8} if name.startswith(("resnet", "preact-resnet")) and "-w" not in name else {}
    return (3, 16, 16), kwargs


def _data(shape, n=3, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Normalization statistics of `x`, as a trained model has for its data: keeps deep untrained
    networks' activations O(1) instead of growing with depth (logits of 1e5 would make fp32 round-off,
    not the executor, decide the comparison)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    with torch.no_grad():
        model.train()(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def _assert_same(a, b, tol=TOL):
    """Equal to `tol`, relative for the unbounded measures (a loss of 2 may differ by 2e-5 where the
    two round differently: BatchNorm folded, or convolutions on one thread instead of two)."""
    cols = [c for c in VALUE_COLUMNS if c in a.table.columns]
    assert list(a.table["layer"]) == list(b.table["layer"])
    np.testing.assert_allclose(a.table[cols].to_numpy(float), b.table[cols].to_numpy(float), atol=tol, rtol=tol)


def _assert_close(a, b, tol=TOL):
    """Two `Engine.evaluate` results agree: base measures and every perturbation's."""
    assert a[0] == pytest.approx(b[0], abs=tol, nan_ok=True)
    assert a[1].keys() == b[1].keys()
    for key, values in a[1].items():
        assert b[1][key] == pytest.approx(values, abs=tol, nan_ok=True), key


@pytest.mark.parametrize("name", MODELS)
def test_incremental_equals_full_on_every_model(name):
    # One thread: with two, the regions run on two workers of one intra-op thread each, whose
    # convolutions round differently from two-thread ones; an untrained ResNet-152 amplifies that to
    # 1e-4 of its outputs (chaotic), while here the numbers are the full forward's. The threaded path:
    # `test_regions_on_worker_threads_equal_one_at_a_time`.
    torch.set_num_threads(1)
    shape, kwargs = _spec(name)
    built: dict[int, nn.Module] = {}

    def factory():
        # Rerandomize builds under `torch.manual_seed(seed)`: one build per seed, however often it asks.
        seed = torch.initial_seed()
        if seed not in built:
            built[seed] = create_model(name, num_classes=10, input_shape=shape, **kwargs)
        return built[seed]

    torch.manual_seed(1)
    reference = factory().state_dict()
    data = _data(shape)
    model = _calibrate(create_model(name, num_classes=10, input_shape=shape, **kwargs), data[0])
    # Probe objects shared by the calls below, so the factory builds each fresh model once.
    probes = [Rerandomize(factory), Reinit(reference), Zero(), Interpolate(reference, alpha=0.5, sigma=0.1)]
    layers = [u.name for u in select_units(model)]
    blocks = [u.name for u in select_units(model, granularity="block")]
    settings = [
        {"layers": [layers[0], layers[len(layers) // 2], layers[-1]]},  # first, a middle and the last unit
        {"granularity": "block", "layers": [blocks[len(blocks) // 2]]},
        {"groups": {"joint": [layers[1 % len(layers)], layers[-1]]}},
    ]
    before = snapshot(model)
    for s in settings:
        common = dict(probes=probes, trials=1, batch_size=2, **s)  # batches of 2 and 1
        full = measure(model, data, executor="full", **common)
        inc = measure(model, data, executor="incremental", **common)
        _assert_same(full, inc)
    assert_same_state(model, before)
    assert_no_hooks(model)


def test_auto_is_incremental_for_traceable_models():
    assert isinstance(EXECUTORS.get("auto")(TinyResNet()), IncrementalExecutor)
    assert EXECUTORS.get("incremental") is IncrementalExecutor


class Branchy(nn.Module):
    """Data-dependent control flow: not traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum() > 0:
            h = h.relu()
        return self.fc2(h)


def test_untraceable_model_falls_back_with_one_line(caplog):
    """Data-dependent control flow cannot be traced: "auto" falls back (one warning line, the reason
    in the result), "incremental" asked for explicitly refuses with the reason."""
    torch.manual_seed(0)
    model, x = Branchy(), torch.randn(10, 4)
    with caplog.at_level(logging.WARNING, logger="layercrit"):
        auto = EXECUTORS.get("auto")(model)
        inc = measure(model, x, factory=Branchy, probes=["rerandomize", "zero"], trials=2)
        IncrementalExecutor(model, fallback=True)  # the same model again: no second line
    lines = [r.getMessage() for r in caplog.records if r.name == "layercrit"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "Branchy runs with the full forward" in lines[0] and "torch.fx cannot trace it" in lines[0]
    assert not auto.incremental and "cannot trace" in auto.fallback_reason
    assert inc.config["executor_used"] == "full" and "cannot trace" in inc.config["executor_reason"]
    assert "kept_peak_bytes" not in inc.config  # no values kept: no figure
    full = measure(model, x, factory=Branchy, probes=["rerandomize", "zero"], trials=2, executor="full")
    assert full.config["executor_used"] == "full" and full.config["executor_reason"] == "requested"
    _assert_same(full, inc, tol=0)
    with pytest.raises(LayercritError, match=r"the incremental executor cannot run Branchy: torch.fx cannot trace it: "
                                             r"TraceError: .*; use executor 'auto' .* or 'full'"):
        measure(model, x, factory=Branchy, executor="incremental")


class Scaled(nn.Module):
    """Traceable, but the trace bakes in `scale`: changing it afterwards makes the trace wrong."""

    scale = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * self.scale


@pytest.mark.parametrize("scale", [2.0, 1.0001])
def test_a_trace_that_disagrees_with_the_model_falls_back(caplog, scale):
    """A wrong trace is refused even when it is only 1e-4 off: far above round-off in float64."""
    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(8, 4)
    executor = IncrementalExecutor(model, fallback=True)
    model.scale = scale
    perts = [Perturbation("zero", Zero().values(model, select_units(model)[0], 0))]
    with caplog.at_level(logging.WARNING, logger="layercrit"):
        base, out = Engine(model, x, executor=executor).evaluate(perts)
    assert not executor.incremental and "differs from the model's" in executor.fallback_reason
    assert "in float64" in executor.fallback_reason  # beyond float32 round-off: float64 decides
    assert len([r for r in caplog.records if r.name == "layercrit"]) == 1
    base_full, out_full = Engine(model, x, executor="full").evaluate(perts)
    assert base == base_full and out == out_full
    strict = IncrementalExecutor(Scaled())
    strict.model.scale = scale
    with pytest.raises(LayercritError, match="the incremental executor cannot run Scaled: the traced graph's output "
                                             "differs from the model's by"):
        Engine(strict.model, x, executor=strict).evaluate(perts)


class Cancelling(nn.Module):
    """Conv → BatchNorm subtracting a large mean: the folded and the unfolded float32 computations
    round differently by far more than 1e-5 of the outputs, yet the trace is right."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 6 * 6, 3)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 9)  # the local mean: about 1000 for the inputs below
            self.bn.running_mean.fill_(1000.0)
            self.bn.running_var.fill_(1e-4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).flatten(1))


def test_round_off_is_not_mistaken_for_a_wrong_trace():
    torch.manual_seed(0)
    model, x = Cancelling().eval(), 1000 + 0.01 * torch.randn(6, 1, 8, 8)
    executor = IncrementalExecutor(model, fold_batchnorm=True)
    with torch.no_grad():
        traced, direct = executor._trace.gm(x), model(x)
    off = float((traced - direct).abs().max() / direct.abs().max())
    assert off > 1e-5  # the old element-wise float32 check refused this trace
    perts = _perturbations(model, 2)
    engine = Engine(model, x, executor=executor)
    got = engine.evaluate(perts)
    assert executor.incremental and "in float64" in executor.reason
    stats = engine.stats()
    assert stats["executor_used"] == "incremental" and "in float64" in stats["executor_reason"]
    assert stats["kept_peak_bytes"] > 0
    _assert_close(Engine(model, x, executor="full").evaluate(perts), got, tol=1e-3)  # the round-off above


class InPlace(nn.Module):
    """In-place residual add and ReLUs, as in torchvision's ResNets."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 4)
        self.mid = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)
        self.dec = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.enc(x)
        out = self.mid(h)
        out.add_(h)  # overwrites mid's output, which nothing else reads; a kept value when only `enc` changes
        out = self.act(out)
        return self.head(self.dec(out).relu_())


class TiedShared(nn.Module):
    """Two layers sharing one weight: changing it must change both uses."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.b(torch.tanh(self.a(x))))


@pytest.mark.parametrize("cls", [InPlace, TiedShared, TinyResNet])
def test_tied_weights_and_inplace_ops(cls):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(9, 1, 8, 8) if cls is TinyResNet else torch.randn(9, 6 if cls is InPlace else 5)
    executor = IncrementalExecutor(model)
    assert executor.incremental, executor.fallback_reason
    settings = dict(factory=cls, probes=["rerandomize", "zero"], trials=2, batch_size=4, include_norm=True)
    _assert_same(measure(model, x, executor="full", **settings), measure(model, x, executor="incremental", **settings))


class ReadWriteRead(nn.Module):
    """`h` is read before and after an in-place write to it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x):
        h = self.fc1(x)
        y = self.fc2(h)  # before the write
        h.relu_()
        return y + self.fc3(h)  # after it


def test_reads_before_and_after_an_inplace_write():
    torch.manual_seed(0)
    model, x = ReadWriteRead(), torch.randn(7, 4)
    assert IncrementalExecutor(model).incremental
    settings = dict(factory=ReadWriteRead, probes=["rerandomize", "zero"], trials=2, batch_size=3)
    _assert_same(measure(model, x, executor="full", **settings), measure(model, x, executor="incremental", **settings))


def test_inplace_writes_through_views_or_to_the_input_fall_back():
    class ViewWrite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            flat = h.view(-1)
            h.relu_()  # `flat` sees the write
            return h + flat.sum()

    class InputWrite(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x.mul_(2))

    for cls in (ViewWrite, InputWrite):
        executor = IncrementalExecutor(cls(), fallback=True)
        assert not executor.incremental and "in-place" in executor.fallback_reason
        with pytest.raises(LayercritError, match="in-place .* writes to a value that views or inputs share"):
            IncrementalExecutor(cls())


class EvalModeInPlace(nn.Module):
    """What timm and torchvision models do: an in-place activation after an identity (timm's
    `drop_block`), in-place dropout on a view (torchvision's EfficientNet head), an in-place
    activation whose input is read again later, one on a view, optional forward arguments (timm's ViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.drop_block, self.act1 = nn.Identity(), nn.ReLU(inplace=True)
        self.act2, self.act3 = nn.Hardswish(inplace=True), nn.LeakyReLU(0.1, inplace=True)
        self.drop = nn.Dropout(0.5, inplace=True)

    def forward(self, x, attn_mask=None, is_causal: bool = False):
        h = self.act1(self.drop_block(self.fc1(x)))
        y = self.fc2(h)
        z = self.act2(y)  # y is read again below: it reads the activated values, as in the model
        out = self.act3((z + y).view(-1, 2, 4)).flatten(1)  # in-place on a view
        return self.head(self.drop(out))


def test_inplace_activations_dropout_and_optional_arguments_run_incrementally():
    torch.manual_seed(0)
    model, x = EvalModeInPlace(), torch.randn(7, 6)
    executor = IncrementalExecutor(model)
    assert executor.incremental
    gm = executor._trace.gm
    called = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    assert not any(isinstance(m, (nn.Identity, nn.Dropout)) for m in called.values())  # evaluation mode: removed
    assert called["act1"].inplace and called["act2"].inplace  # in-place writes the data flow follows
    assert "act3" not in called and not called["act3_out_of_place"].inplace  # on a view: out-of-place
    assert model.act3.inplace and model.drop.inplace  # the model's own modules are untouched
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    settings = dict(factory=EvalModeInPlace, probes=["rerandomize", "zero"], trials=2, batch_size=4)
    inc = measure(model, x, executor="incremental", **settings)
    _assert_same(measure(model, x, executor="full", **settings), inc)
    assert inc.config["executor_used"] == "incremental"


def test_the_trace_is_made_once_per_model():
    from layercrit.engine.executors.fx_graph import _Trace

    model = TinyResNet()
    assert _Trace.of(model) is _Trace.of(model)
    assert IncrementalExecutor(model)._trace is _Trace.of(model)
    model.fc = nn.Linear(model.fc.in_features, 3)  # a module replaced: traced again
    assert _Trace.of(model).gm.get_submodule("fc") is model.fc


def _perturbations(model, probe_trials=3):
    probe = Rerandomize(lambda: type(model)())
    return [Perturbation((u.name, t), probe.values(model, u, t)) for u in select_units(model) for t in range(probe_trials)]


def test_memory_budget_splits_batches_with_identical_numbers():
    torch.manual_seed(0)
    model = TinyResNet()
    x, y = _data((1, 8, 8), n=24)
    perts = _perturbations(model)
    full = Engine(model, x, y, batch_size=12, executor="full").evaluate(perts)
    roomy = IncrementalExecutor(model)
    free = Engine(model, x, y, batch_size=12, executor=roomy).evaluate(perts)
    per_batch = roomy.peak_bytes
    assert per_batch > 0
    budget = per_batch // 4  # about three samples at a time
    tight = IncrementalExecutor(model, memory_budget=budget)
    split = Engine(model, x, y, batch_size=12, executor=tight).evaluate(perts)
    assert 0 < tight.peak_bytes <= budget
    for other in (free, split):
        _assert_close(full, other)


def test_without_prepare_the_executor_computes_what_it_needs():
    torch.manual_seed(0)
    model = TinyResNet().eval()
    x = torch.randn(5, 1, 8, 8)
    values = [p.values for p in _perturbations(model, 1)]
    full, inc = FullForward(model), IncrementalExecutor(model)
    with torch.no_grad():
        torch.testing.assert_close(full.start_batch(x), inc.start_batch(x), rtol=0, atol=1e-6)
        for a, b in zip(full.run_many(values), inc.run_many(values)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(full.run(values[3]), inc.run(values[3]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("cls", [TinyResNet, TinyMLP])
def test_batched_trials_on_and_off_agree(cls):
    torch.manual_seed(0)
    model = cls()
    x = torch.randn(10, 1, 8, 8) if cls is TinyResNet else torch.randn(10, 4)
    perts = _perturbations(model, 4)
    results = []
    for batch_trials in (False, True, None):
        executor = IncrementalExecutor(model, batch_trials=batch_trials)
        results.append(Engine(model, x, batch_size=4, executor=executor).evaluate(perts))
        if batch_trials:
            assert all(r.stacked is not False for r in executor._regions.values())  # vmap ran
    for other in results[1:]:
        _assert_close(results[0], other)


def test_model_unchanged_and_no_hooks_also_after_an_error():
    torch.manual_seed(0)
    model = TinyResNet()
    before = snapshot(model)
    x = torch.randn(6, 1, 8, 8)
    engine = Engine(model, x, executor="incremental")
    engine.evaluate(_perturbations(model, 1))
    bad = [Perturbation("bad", {"fc.weight": torch.zeros(3, 3)})]
    with pytest.raises(LayercritError, match=r"new value for fc.weight has shape \(3, 3\)"):
        engine.evaluate(bad)
    with pytest.raises(LayercritError, match="model has no parameter"):
        engine.evaluate([Perturbation("none", {"nope": torch.zeros(1)})])
    assert_same_state(model, before)
    assert_no_hooks(model)


def test_whole_state_dicts_and_untraced_models():
    """Every parameter and buffer replaced at once (checkpoint evaluations); a non-traceable user model."""
    torch.manual_seed(0)
    model, other = TinyResNet(), TinyResNet()
    for m in other.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.fill_(2.0)
    x = torch.randn(6, 1, 8, 8)
    perts = [Perturbation("other", other.state_dict())]
    _assert_close(Engine(model, x, executor="full").evaluate(perts), Engine(model, x, executor="incremental").evaluate(perts))
    tt = TinyTransformer()
    x = torch.randn(4, 1, 8, 8)
    _assert_same(measure(tt, x, factory=TinyTransformer, trials=1, executor="full"),
                 measure(tt, x, factory=TinyTransformer, trials=1), tol=0)


def test_device_options_are_noops_on_cpu():
    torch.manual_seed(0)
    model = TinyResNet()
    x = torch.randn(6, 1, 8, 8)
    perts = _perturbations(model, 1)
    plain = Engine(model, x).evaluate(perts)
    assert Engine(model, x, autocast="bf16").evaluate(perts) == plain
    with pytest.raises(LayercritError, match="Expected `autocast` to be None, 'bf16' or 'fp16', got 'int8'"):
        Engine(model, x, autocast="int8")


def test_batchnorm_is_folded_into_the_convolutions_on_request():
    torch.manual_seed(0)
    model = TinyResNet()
    executor = IncrementalExecutor(model, fold_batchnorm=True)
    convs_with_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(executor._trace.folded) == convs_with_bn  # every conv → bn pair became one convolution
    assert not any(n.op == "call_module" and isinstance(model.get_submodule(n.target), nn.BatchNorm2d)
                   for n in executor._trace.gm.graph.nodes)
    x = torch.randn(8, 1, 8, 8)
    perts = [Perturbation(u.name, Zero().values(model, u, 0)) for u in select_units(model, include_norm=True)]
    _assert_close(Engine(model, x, executor="full").evaluate(perts), Engine(model, x, executor=executor).evaluate(perts))
    assert executor.incremental  # BN probes: the folded values change
    # Not on the CPU by default: there the incremental executor's numbers are the full forward's, bit for bit.
    assert not IncrementalExecutor(model)._trace.folded
    result = measure(model, x, factory=TinyResNet, trials=1, include_norm=True)
    assert result.config["executor_used"] == "incremental" and result.config["kept_peak_bytes"] > 0
    _assert_same(measure(model, x, factory=TinyResNet, trials=1, include_norm=True, executor="full"), result, tol=0)


def test_run_settings_are_validated():
    model, x = TinyMLP(), torch.randn(4, 4)
    for bad, message in (({"executor": "fast"}, "Expected `executor` to be one of auto, full, incremental, .*got 'fast'"),
                         ({"memory_budget": 0}, "Expected `memory_budget` to be a positive number of bytes, got 0"),
                         ({"autocast": "int8"}, "Expected `autocast` to be None, 'bf16' or 'fp16', got 'int8'")):
        with pytest.raises(LayercritError, match=message):
            measure(model, x, factory=TinyMLP, **bad)


@pytest.mark.parametrize("executor", ["full", "incremental"])
def test_compile_flag_runs_the_same_numbers(executor):
    """The torch.compile path, with the "eager" backend (graph capture without code generation: quick, no compiler)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = TinyResNet(), torch.randn(6, 1, 8, 8)
    settings = dict(factory=TinyResNet, trials=1, layers=["conv1", "fc"], executor=executor)
    _assert_same(measure(model, x, **settings), measure(model, x, compile="eager", **settings))


class Deep(nn.Module):
    """Linear layers are called modules (not folded): every region's graph calls the same objects."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(256, 256), nn.ReLU())])
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.layers(x))


@pytest.mark.parametrize("cls", [Deep, TinyResNet])
def test_regions_on_worker_threads_equal_one_at_a_time(cls):
    """Regions run concurrently on the CPU; a probed module that other regions' graphs also call
    must not leak its new values into the regions running beside it."""
    torch.manual_seed(0)
    model = cls()
    before = snapshot(model)
    x, y = _data((256,) if cls is Deep else (1, 8, 8), n=512)
    perts = _perturbations(model, 2)
    serial = Engine(model, x, y, batch_size=256, executor=IncrementalExecutor(model, workers=1)).evaluate(perts)
    for _ in range(2):  # a race shows as a difference in some run
        threaded = Engine(model, x, y, batch_size=256, executor=IncrementalExecutor(model, workers=2)).evaluate(perts)
        _assert_close(serial, threaded)
    _assert_close(Engine(model, x, y, batch_size=256, executor="full").evaluate(perts), serial)
    assert torch.get_num_threads() == 2  # restored after the workers
    assert_same_state(model, before)
    with pytest.raises(LayercritError, match="Expected `workers` to be a positive integer, got 0"):
        IncrementalExecutor(model, workers=0)
