"""The incremental executor: each perturbation recomputes only what its changed parameters affect.

The model is traced once with `torch.fx`. For a set of changed parameters, the *region* is every
graph node downstream of the nodes that read them; the *frontier* is the values the region reads
from upstream. Per batch the unmodified model runs once and keeps the frontier values of every
region of the engine pass (announced by `prepare`); each perturbation then runs only its region,
as a small generated `GraphModule`, with the new values passed through
`torch.func.functional_call`, so the model is never written to. Perturbations of the same
parameters can run together, vmapped over their stacked values.

Kept values are per batch and bounded by `memory_budget`: when a batch's frontier would not fit,
the batch is processed in sub-batches (same numbers).

What the trace may contain. Forward arguments after the first that have defaults are traced at
their defaults (timm's ViT takes `attn_mask=None, is_causal=False`). The graph is simplified
for evaluation mode, exactly: `nn.Identity` and dropout modules (the identity in eval mode) are
removed, and an in-place activation module (`ReLU(inplace=True)`, …) runs as an out-of-place copy
of itself, its later readers rewired to its result. Other in-place ops are followed through the
data flow; an in-place write that a view or an input would observe is not supported.

The trace check tells a wrong trace from round-off. On the first batch, the traced graph's output
(with BatchNorm folded into the convolutions, its float32 round-off differs from the model's) is
compared with the model's own on two samples of it. Outputs that agree to 1e-5 of their magnitude (max |output|) pass at once. A
larger difference is decided in float64 (parameters, buffers and inputs cast through
`functional_call`; the model is not touched), where round-off is around 1e-13 of the outputs: a
correct trace agrees to 1e-7 of their magnitude there, a wrong one (Python control flow or state
that the trace baked in) differs at the outputs' own scale. Where float64 cannot be used (a float32
constant, no float64 kernel, an output not in float64, or more than `_FP64_CHECK_BYTES` of
parameters), 1e-3 of the outputs' magnitude decides. The check costs one forward pass of the model
over two samples (rarely two more in float64); the trace itself is made once per model.

Models that cannot be traced, or whose trace fails the check, run with the full forward under
"auto" (one warning line per model; `fallback_reason` says why); asked for explicitly
(`executor="incremental"`) they raise a `LayercritError` saying why."""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.fx as fx
import torch.nn as nn

from ...data.inputs import call_model, concat, take
from ...errors import LayercritError, check_int
from ..probes import substitute
from .base import DEFAULT_MEMORY_BUDGET, EXECUTORS, Executor, compiled, first_line, numel_bytes, storage_bytes
from .full import FullForward
from .fx_check import _check_trace
from .fx_graph import _MAX_STACK, _SKIP, Values, _Keep, _NotIncremental, _Plan, _Region, _Trace

log = logging.getLogger("layercrit")


_untraceable: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # model -> why; logged once


class IncrementalExecutor(Executor):
    """Runs each perturbation from kept intermediate values, recomputing only its downstream part.

    Args:
        model: the model; traced once with `torch.fx.symbolic_trace` (in eval mode).
        memory_budget: bytes of intermediate values kept per batch (default 1 GiB). A batch whose
            kept values would exceed it is processed in sub-batches; stacked trials are limited so
            that their estimated activations fit beside the kept values. `peak_bytes` reports the
            most kept at once.
        batch_trials: run perturbations of the same parameters together, vmapped over their stacked
            values: True, False, or None (automatic: on CUDA, where larger kernels pay; not on the
            CPU, where it measured no faster here and one at a time keeps results bitwise equal to
            the full forward's).
        compile: `torch.compile` each region (and the unmodified graph): True or a backend name.
        workers: regions (the perturbations of different layers) computed at once, each on one
            thread; None: as many as torch's intra-op threads on the CPU, one on other devices.
        fallback: when the model does not trace or its trace fails the check (see the module
            docstring): True runs the full forward instead, after one warning per model (what
            "auto" does); False raises a `LayercritError` saying why.
        fold_batchnorm: run each evaluation-mode `BatchNorm2d(Conv2d(x))` as one convolution with
            folded weights (saves a pass over the activations; a different float32 round-off). None:
            on CUDA only; on the CPU it measured no faster here (torchvision's and timm's ResNet-50),
            and without it the numbers are the full forward's (bitwise in the runs here).

    Attributes:
        fallback_reason: why the model runs with the full forward instead (None if it does not).
        reason: why the incremental executor runs (once the trace check passed).
        peak_bytes: the largest number of bytes of kept values held at once so far.

    Raises:
        LayercritError: without `fallback`, when the model cannot run incrementally.
    """

    name = "incremental"

    def __init__(
        self,
        model: nn.Module,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        batch_trials: bool | None = None,
        compile: bool | str = False,
        workers: int | None = None,
        fallback: bool = False,
        fold_batchnorm: bool | None = None,
    ) -> None:
        super().__init__(model)
        check_int("memory_budget", memory_budget)
        self.memory_budget = memory_budget
        self.batch_trials = batch_trials
        self.compile = compile
        if workers is not None:
            check_int("workers", workers)
        self.workers = workers
        self.peak_bytes = 0
        self.fallback = fallback
        self.fallback_reason: str | None = None
        self._prepared: Sequence[Values] | None = None
        self.reason = ""
        self._full: FullForward | None = None
        self._trace: _Trace | None = None
        self._regions: dict[frozenset[str], _Region] = {}
        self._keeps: dict[tuple[fx.Node, ...], _Keep] = {}
        self._plan: _Plan | None = None
        self._validated = False
        self._budget_warned = False
        self._batch: dict | None = None
        if model in _untraceable:
            self._fall_back(_untraceable[model])
            return
        try:
            if fold_batchnorm is None:  # see the class docstring
                first = next(model.parameters(), None)
                fold_batchnorm = first is not None and first.device.type == "cuda"
            self._trace = _Trace.of(model, fold_batchnorm)
        except _NotIncremental as e:
            self._fall_back(str(e))
        except Exception as e:  # noqa: BLE001  (any tracing failure means: not traceable)
            self._fall_back(f"torch.fx cannot trace it: {first_line(e, with_type=True)}")

    @property
    def incremental(self) -> bool:
        """Whether perturbations run incrementally (False after a fallback to the full forward)."""
        return self._full is None

    def _fall_back(self, reason: str) -> None:
        """Run the full forward from now on (one warning per model), or raise without `fallback`."""
        if not self.fallback:
            raise LayercritError(f"the incremental executor cannot run {type(self.model).__name__}: {reason}; "
                                 "use executor 'auto' (which falls back to the full forward) or 'full'")
        self._full = _fallback(self.model, self.memory_budget, self.batch_trials, self.compile)
        self.fallback_reason = reason
        self._trace = None
        if self._prepared is not None:
            self._full.prepare(self._prepared)
        if self.model not in _untraceable:
            _untraceable[self.model] = reason
            how = ("the block-prefix executor (blocks re-run from the probed one)" if self._full.name == "prefix"
                   else "the full forward")
            log.warning("layercrit: %s runs with %s, not incrementally: %s", type(self.model).__name__, how, reason)

    # -- planning ---------------------------------------------------------------------------------

    def _region(self, names: frozenset[str]) -> _Region:
        if names not in self._regions:
            if any(n.startswith(_SKIP) for n in names):  # a skipped module: hooks on the model, full forward
                region = _Region(names, full=True)
            else:
                region = self._trace.region(self._trace.expand(names))
            region.names = names
            if region.gm is not None:
                region.runner = _runner(region.gm, self.compile)
            self._regions[names] = region
        return self._regions[names]

    def _check(self, values: Values) -> frozenset[str]:
        shapes = self._trace.shapes
        missing = [n for n in values if n not in shapes]
        if missing:
            raise LayercritError(f"model has no parameter(s) {', '.join(missing)}")
        for n, v in values.items():
            if v.shape != shapes[n][0]:
                raise LayercritError(f"new value for {n} has shape {tuple(v.shape)}; expected {tuple(shapes[n][0])}")
        return frozenset(values) | frozenset(_SKIP + m for m in getattr(values, "skip", ()))

    def _make_plan(self, perturbations: Sequence[Values]) -> _Plan:
        key = tuple(self._check(v) for v in perturbations)
        if self._plan is not None and self._plan.key == key:
            return self._plan
        regions = [self._region(names) for names in key]
        needed = {f for r in regions for f in r.frontier if f.op != "placeholder"}
        nodes = tuple(n for n in self._trace.nodes if n in needed)
        if nodes not in self._keeps:
            keeper = self._trace.keeper(nodes, with_output=True)
            prefix = self._trace.keeper(nodes, with_output=False)
            keeper, prefix = compiled(keeper, self.compile), compiled(prefix, self.compile)
            self._keeps[nodes] = _Keep(nodes, keeper, prefix)
        return _Plan(key, regions, self._keeps[nodes])

    def prepare(self, perturbations: Sequence[Values]) -> None:
        self._prepared = perturbations  # for the fallback executor, should the first batch need one
        if self._full is not None:
            return self._full.prepare(perturbations)
        self._plan = self._make_plan(perturbations)

    # -- per batch --------------------------------------------------------------------------------

    def start_batch(self, x: torch.Tensor) -> object:
        if self._full is None and isinstance(x, dict):  # the trace takes one tensor; the prefix executor takes dicts
            self._fall_back(f"inputs are a dict of {len(x)} tensors")
        if self._full is not None:
            return self._full.start_batch(x)
        plan, kept = self._plan, None
        if plan is not None and self._sub_batch(plan, x) >= len(x):  # (estimates the plan's sizes first)
            out, values = plan.keep.keeper(x)
            kept = dict(zip(plan.keep.nodes, values))
            self._note_kept(values)
        else:  # no plan yet, or too large: `run_many` recomputes kept values per sub-batch
            out = self._trace.gm(x)
        if not self._validated:
            self._validate(x, out)
            if self._full is not None:
                return self._full.start_batch(x)
        logits = out  # the raw output: the engine's output adapter reads it
        self._batch = {"x": x, "logits": logits, "kept": kept, "plan": plan}
        return logits

    def _validate(self, x: torch.Tensor, out: object) -> None:
        """Check the trace (its output `out` on the first batch `x`) against the model on two samples
        (the module docstring says how); fall back (or raise) if they differ by more than round-off."""
        self._validated = True
        ok, why = _check_trace(self.model, self._trace.gm, take(x, slice(0, 2)), take(out, slice(0, 2), len(x)))
        if ok:
            self.reason = why
        else:
            self._fall_back(why)

    def _estimate(self, plan: _Plan, x: torch.Tensor) -> None:
        """Kept bytes per sample of `plan`, and the regions' activation peaks, from two samples."""
        keep = plan.keep
        if keep.per_sample is not None:
            return
        probe = x[:2]
        keep.per_sample = storage_bytes(keep.prefix(probe)) / len(probe) if keep.nodes else 0.0
        if self._stacking() and any(r.gm is not None and r.peak_per_sample == 0.0 for r in plan.regions):
            self._estimate_peaks(probe)

    def _sub_batch(self, plan: _Plan, x: torch.Tensor) -> int:
        """Samples per sub-batch whose kept values fit the budget."""
        self._estimate(plan, x)
        per = plan.keep.per_sample
        if per == 0:
            return len(x)
        n = int(self.memory_budget // per)
        if n < 1:
            if not self._budget_warned:
                self._budget_warned = True
                log.warning("layercrit: memory_budget %d is smaller than one sample's kept values (%d bytes); "
                            "keeping one sample at a time", self.memory_budget, int(per))
            n = 1
        return min(n, len(x))

    def _note_kept(self, values) -> None:
        self.peak_bytes = max(self.peak_bytes, storage_bytes(values))

    def _estimate_peaks(self, probe: torch.Tensor) -> None:
        """Per-sample bytes alive at once in each region, from the node outputs on `probe`."""
        sizes: dict[fx.Node, float] = {}

        class Sizes(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                sizes[n] = numel_bytes(out) / len(probe)
                return out

        Sizes(self._trace.gm).run(probe)
        for region in self._regions.values():
            if region.gm is None:
                continue
            index = {n: i for i, n in enumerate(region.nodes)}
            last = {n: max((index[u] for u in n.users if u in index), default=index[n]) for n in region.nodes}
            live, peak, ends = 0.0, 0.0, {}
            for i, n in enumerate(region.nodes):
                live += sizes.get(n, 0.0)
                peak = max(peak, live)
                ends.setdefault(last[n], []).append(n)
                live -= sum(sizes.get(m, 0.0) for m in ends.pop(i, []))
            region.peak_per_sample = max(peak, 1.0)

    def run(self, values: Values) -> torch.Tensor:
        return self.run_many([values])[0]

    def run_many(self, perturbations: Sequence[Values]) -> list[torch.Tensor]:
        if self._full is not None:
            return self._full.run_many(perturbations)
        batch = self._batch
        plan = self._plan = self._make_plan(perturbations)  # without `prepare`, the next batch keeps for it
        x = batch["x"]
        if batch["kept"] is not None and plan is batch["plan"]:
            return self._run_plan(plan, perturbations, x, batch["kept"], batch["logits"])
        # Without kept values (no plan announced, or too large for the budget): sub-batches, each
        # recomputing its kept values from the input.
        keep = plan.keep
        step = self._sub_batch(plan, x) if keep.nodes else len(x)
        parts: list[list[torch.Tensor]] = []
        for i in range(0, len(x), step):
            xs = x[i : i + step]
            values = keep.prefix(xs) if keep.nodes else ()
            self._note_kept(values)
            kept = dict(zip(keep.nodes, values))
            parts.append(self._run_plan(plan, perturbations, xs, kept, take(batch["logits"], slice(i, i + step), len(x))))
            del values, kept
        return [concat(qs) for qs in zip(*parts)]

    def end_batch(self) -> None:
        if self._full is not None:
            return self._full.end_batch()
        self._batch = None

    # -- regions ----------------------------------------------------------------------------------

    def _run_plan(self, plan: _Plan, perturbations: Sequence[Values], x: torch.Tensor,
                  kept: dict[fx.Node, object], logits: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(perturbations)
        groups: dict[int, list[int]] = {}
        for i, region in enumerate(plan.regions):
            groups.setdefault(id(region), []).append(i)
        kept_bytes = storage_bytes(kept.values())
        jobs: list[tuple[_Region, list[int]]] = []
        for idx in groups.values():
            region = plan.regions[idx[0]]
            if region.unaffected:
                for i in idx:
                    out[i] = logits
            elif region.full:  # writes into the model: never while regions run
                for i in idx:
                    with substitute(self.model, perturbations[i]):
                        out[i] = call_model(self.model, x)
            else:
                jobs.append((region, idx))

        def job(region: _Region, idx: list[int]) -> tuple[list[int], list[torch.Tensor]]:
            args = tuple(x if f.op == "placeholder" else kept[f] for f in region.frontier)
            values = [self._region_values(region, perturbations[i]) for i in idx]
            return idx, self._run_region(region, args, values, len(x), kept_bytes)

        for idx, qs in self._map(job, jobs, x):
            for i, q in zip(idx, qs):
                out[i] = q
        return out

    def _map(self, job: Callable, jobs: list[tuple[_Region, list[int]]], x: torch.Tensor) -> Iterable:
        """`job(*j)` for each of `jobs`: on the CPU, concurrently on `workers` threads with one
        intra-op thread each (small convolutions use two cores better as two problems than as one),
        biggest regions first; else one after the other."""
        workers = min(len(jobs), self.workers if self.workers is not None else
                      (torch.get_num_threads() if x.device.type == "cpu" else 1))
        if workers < 2 or torch.is_autocast_enabled():
            return [job(*j) for j in jobs]
        grad = torch.is_grad_enabled()  # thread-local: carried into the workers

        def run(j):
            with torch.set_grad_enabled(grad):
                return job(*j)

        ordered = sorted(jobs, key=lambda j: -len(j[0].nodes) * len(j[1]))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="layercrit") as pool:
                return list(pool.map(run, ordered))
        finally:
            torch.set_num_threads(threads)

    def _region_values(self, region: _Region, values: Values) -> dict[str, torch.Tensor]:
        """`values` under every name the region's module knows them by (tied parameters), as the
        model's own dtype and device (as `substitute` would copy them)."""
        shapes, aliases = self._trace.shapes, self._trace.aliases
        out = {}
        for n, v in values.items():
            _, dtype, device = shapes[n]
            v = v.to(device=device, dtype=dtype)
            for a in aliases[n]:
                out[a] = v
        return out

    def _stack_size(self, region: _Region, rows: int, kept_bytes: int, count: int) -> int:
        """Most perturbations of `region` whose activations fit beside the kept values (1: one at a time)."""
        if count < 2 or not self._stacking() or region.stacked is False:
            return 1
        per = region.peak_per_sample * rows
        fit = int((self.memory_budget - kept_bytes) // per) if per > 0 else _MAX_STACK
        return max(1, min(count, _MAX_STACK, fit))

    def _stacking(self) -> bool:
        if self.batch_trials is not None:
            return self.batch_trials
        first = next(self.model.parameters(), None)
        return first is not None and first.device.type == "cuda"

    def _run_region(self, region: _Region, args: tuple, values: list[dict[str, torch.Tensor]], rows: int,
                    kept_bytes: int) -> list[torch.Tensor]:
        def one(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return region.runner(params, args)

        def stacked(chunk: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
            if len(chunk) == 1:
                return [one(chunk[0])]
            with warnings.catch_warnings():  # ops without a batching rule run slower, but correctly
                warnings.filterwarnings("ignore", message="There is a performance drop")
                both = torch.vmap(one, randomness="error")({n: torch.stack([v[n] for v in chunk]) for n in chunk[0]})
                return [take(both, i, len(chunk)) for i in range(len(chunk))]  # unstacked, whatever the output's structure

        k = self._stack_size(region, rows, kept_bytes, len(values))
        if k == 1:
            return [one(v) for v in values]
        out: list[torch.Tensor] = []
        try:
            for i in range(0, len(values), k):
                out += stacked(values[i : i + k])
        except Exception as e:  # noqa: BLE001  (an op without a batching rule: one at a time)
            log.debug("layercrit: vmap over %s failed (%s); running trials one at a time",
                      sorted(region.names), first_line(e, with_type=True))
            region.stacked = False
            return [one(v) for v in values]
        return out


def _runner(gm: fx.GraphModule, compile: bool | str) -> Callable[[dict, tuple], torch.Tensor]:
    def run(params: dict[str, torch.Tensor], args: tuple) -> torch.Tensor:
        # The values replace the region module's own parameters for this call only: nothing is written.
        return torch.func.functional_call(gm, params, args)  # the raw output

    return compiled(run, compile)


def _fallback(model: nn.Module, memory_budget: int, batch_trials: bool | None, compile: bool | str) -> Executor:
    """What "auto" runs when the fx trace cannot be used: the block-prefix executor when the model has
    a stack of repeated blocks (transformers), else the full forward."""
    from ...units.blocks import find_block_stack
    from .prefix import PrefixExecutor

    if not compile and find_block_stack(model) is not None:
        return PrefixExecutor(model, memory_budget, batch_trials, fallback=True)
    return FullForward(model, compile=compile)


@EXECUTORS.register("auto")
def auto_executor(model: nn.Module, **options) -> Executor:
    """The incremental executor, which runs the full forward instead (after one warning line per
    model, its `fallback_reason` saying why) when the model does not trace or its trace fails the check."""
    return IncrementalExecutor(model, fallback=True, **options)


EXECUTORS.register("incremental")(IncrementalExecutor)
