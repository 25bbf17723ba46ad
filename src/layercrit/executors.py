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
(`executor="incremental"`) they raise a `LayercritError` saying why.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import operator
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from .engine import EXECUTORS, Executor, FullForward, compiled, eval_mode
from .errors import LayercritError, check_int
from .inputs import call_model, concat, take
from .probes import substitute

__all__ = ["DEFAULT_MEMORY_BUDGET", "IncrementalExecutor", "auto_executor"]

log = logging.getLogger("layercrit")

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of kept frontier values (and stacked trials) per batch: 1 GiB
_MAX_STACK = 64  # most perturbations vmapped together, whatever the budget allows
_SKIP = "\0skip:"  # marks a module a `probes.Change` skips in a plan's key (never a parameter name)

Values = Mapping[str, torch.Tensor]

# Ops whose output may share memory with their first input: an in-place op on such an output
# would write into a value that other nodes read.
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "transpose", "permute", "t", "squeeze",
    "unsqueeze", "expand", "expand_as", "narrow", "select", "split", "chunk", "unbind", "as_strided", "contiguous",
    "detach", "movedim", "swapaxes", "diagonal", "unfold", "__getitem__", "real", "imag", "type_as", "to", "float",
}
_VIEW_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.transpose, torch.permute, torch.squeeze,
                   torch.unsqueeze, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind, torch.movedim,
                   torch.swapaxes, torch.t, torch.diagonal, torch.detach}
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                  nn.AlphaDropout)
_INPLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}
# The identity in evaluation mode (the only mode the executor runs in): removed from the trace.
_EVAL_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
# What fx adds to check a forward argument specialized to its default: removed with its placeholder.
_SPECIALIZATION_CHECKS = {torch._assert, operator.eq, fx._symbolic_trace._assert_is_none}
_FP64_CHECK_BYTES = 2 << 30  # most bytes of float64 parameters the trace check makes (else: the model's dtype)

_untraceable: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # model -> why; logged once
_traces: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, _Trace]] = weakref.WeakKeyDictionary()  # model -> trace


class _NotIncremental(Exception):
    """The model's graph cannot be run incrementally (the message says why)."""


def _storage_bytes(values: Iterable) -> int:
    """Bytes of the distinct storages behind the tensors in `values` (nested tuples/lists/dicts too)."""
    seen: dict[int, int] = {}

    def visit(v) -> None:
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif isinstance(v, (tuple, list)):
            for u in v:
                visit(u)
        elif isinstance(v, dict):
            for u in v.values():
                visit(u)

    for v in values:
        visit(v)
    return sum(seen.values())


def _numel_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_numel_bytes(u) for u in v)
    return 0


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op} {target}"


def _fingerprint(model: nn.Module) -> tuple:
    """What a cached trace depends on besides Python state (which the trace check covers): the
    module objects and the parameter/buffer tensors with their dtypes and devices."""
    modules = tuple((n, id(m)) for n, m in model.named_modules(remove_duplicate=False))
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return modules, tuple((n, id(t), t.dtype, t.device) for n, t in tensors)


def _symbolic_trace(model: nn.Module) -> fx.GraphModule:
    """`fx.symbolic_trace(model)` taking one input: forward arguments after the first that have
    defaults are traced at them, and their placeholders (with the checks fx adds on them) removed."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    concrete = {p.name: p.default for p in params if p.default is not p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders[1:]:
        down, stack = [], [ph]
        while stack:
            node = stack.pop()
            if node not in down:
                down.append(node)
                stack += list(node.users)
        if any(n is not ph and not (n.op == "call_function" and n.target in _SPECIALIZATION_CHECKS) for n in down):
            required = [n.target for n in placeholders if not n.args]
            raise _NotIncremental(f"forward takes {len(placeholders)} inputs ({', '.join(map(str, required))} without "
                                  "a default); expected one")
        for node in reversed([n for n in graph.nodes if n in down]):  # users before what they use
            graph.erase_node(node)
    if len(placeholders) > 1:
        graph.lint()
        gm.recompile()
    return gm


def _remove_eval_identities(gm: fx.GraphModule) -> None:
    """Remove `nn.Identity` and dropout modules from the trace: the identity in evaluation mode, the
    only mode the executor runs in (an in-place dropout writes nothing there either)."""
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and isinstance(gm.get_submodule(node.target), _EVAL_IDENTITIES)
                and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()


def _out_of_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Make the in-place activation module called by `node` (torch.nn's, e.g. `ReLU(inplace=True)`)
    an out-of-place copy of itself, installed in `gm` beside the model's module, which is left as it
    is; False if `node` calls no such module."""
    if node.op != "call_module":
        return False
    module = gm.get_submodule(node.target)
    if not (getattr(module, "inplace", False) is True and type(module).__module__.startswith("torch.nn")
            and next(module.parameters(), None) is None):
        return False
    name = f"{node.target.replace('.', '_')}_out_of_place"
    if not hasattr(gm, name):
        twin = copy.copy(module)
        twin.inplace = False  # the module reads it on every call: the same values, in a new tensor
        gm.add_submodule(name, twin)
    node.target = name
    return True


class _Trace:
    """The fx graph of a model and what each graph node reads of the model's parameters and buffers."""

    @classmethod
    def of(cls, model: nn.Module, fold: bool = False) -> _Trace:
        """The trace of `model`, made once per model (and again if its modules or tensors changed)."""
        key = (_fingerprint(model), fold)
        cached = _traces.get(model)
        if cached is None or cached[0] != key:
            _traces[model] = (key, cls(model, fold))
        return _traces[model][1]

    def __init__(self, model: nn.Module, fold: bool = False) -> None:
        with eval_mode(model):  # Python branches on `self.training` take the evaluation path
            self.gm = _symbolic_trace(model)
        _remove_eval_identities(self.gm)
        self.folded = _fold_batchnorm(self.gm) if fold else {}
        self.nodes = list(self.gm.graph.nodes)
        self.output = self.nodes[-1]
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(self.placeholders) != 1:
            raise _NotIncremental(f"forward takes {len(self.placeholders)} inputs; expected one")
        tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
        self.shapes = {n: (t.shape, t.dtype, t.device) for n, t in tensors.items()}
        by_id: dict[int, list[str]] = {}
        for n, t in tensors.items():
            by_id.setdefault(id(t), []).append(n)
        self.aliases = {n: by_id[id(t)] for n, t in tensors.items()}  # tied parameters share a list
        self.readers: dict[str, list[fx.Node]] = {n: [] for n in tensors}
        for node in self.nodes:
            if node.op == "get_attr" and node.target in self.readers:
                self.readers[node.target].append(node)
            elif node.op == "call_module" or node in self.folded:
                prefixes = tuple(m + "." for m in self.folded.get(node, (node.target,)))
                for n in tensors:
                    if n.startswith(prefixes):
                        self.readers[n].append(node)
        self.mutated = self._link_mutations()

    def _inplace_target(self, node: fx.Node) -> fx.Node | None:
        """The node whose value `node` overwrites in place, if any."""
        if node.op == "call_module":
            inplace = getattr(self.gm.get_submodule(node.target), "inplace", False) is True
        elif node.op == "call_method":
            inplace = node.target.endswith("_") and not node.target.startswith("_") or node.kwargs.get("inplace") is True
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            inplace = (node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_"))
                       or _bound_inplace(node))
        else:
            return None
        return node.args[0] if inplace and node.args and isinstance(node.args[0], fx.Node) else None

    def _aliases_input(self, node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in _VIEW_METHODS
        if node.op == "call_function":
            return node.target in _VIEW_FUNCTIONS
        if node.op == "call_module":
            return isinstance(self.gm.get_submodule(node.target), _ALIAS_MODULES)
        return True  # placeholders and parameters must never be written to

    def _link_mutations(self) -> dict[fx.Node, fx.Node]:
        """Make in-place writes visible in the graph's data flow; return {value: the node writing it}.

        `out.add_(h); relu(out)` traces as two readers of `out`; the reader after the write really
        reads the write's result, so it is rewired to it. Then a region that contains the write but
        not `out` gets `out` as a kept value, which it copies before writing (`_region_module`), and
        the kept value is copied before the unmodified run writes to it (`keeper`). Writes that
        views could observe, or writes to inputs or parameters, are not supported as such; where
        such a write is an in-place activation module, it runs out-of-place instead (`_out_of_place`,
        exact): it then writes nothing, its later readers are rewired the same way, and only a read
        of the model's write through another alias (or a write to an input) is refused.
        """
        order = {n: i for i, n in enumerate(self.nodes)}
        mutated: dict[fx.Node, fx.Node] = {}
        changed = False
        for node in self.nodes:
            target = self._inplace_target(node)
            if target is None:
                continue
            readers = [u for u in target.users if u is not node]
            converted = False
            if (node.target is operator.setitem or self._aliases_input(target)
                    or any(self._aliases_input(u) for u in readers)):
                converted = not self._observed_elsewhere(target, node, order) and _out_of_place(self.gm, node)
                if not converted:
                    raise _NotIncremental(f"in-place {_describe(node)} writes to a value that views or inputs share")
            for u in readers:
                if order[u] > order[node]:
                    u.replace_input_with(target, node)
            if not converted:
                mutated[target] = node
            changed = True
        if changed:
            self.gm.recompile()
        return mutated

    def _observed_elsewhere(self, target: fx.Node, write: fx.Node, order: dict[fx.Node, int]) -> bool:
        """Whether the model's in-place `write` to `target` would be read later through another alias
        (a view of `target`, or what `target` is a view of), or writes to an input or a parameter."""
        root = target
        while root.op.startswith("call_") and self._aliases_input(root) and root.args and isinstance(root.args[0], fx.Node):
            root = root.args[0]
        if root.op in ("placeholder", "get_attr"):
            return True
        group, stack = set(), [root]  # the views of `root` made before the write
        while stack:
            node = stack.pop()
            if node not in group:
                group.add(node)
                stack += [u for u in node.users if order[u] < order[write] and u.op.startswith("call_")
                          and self._aliases_input(u) and u.args and u.args[0] is node]
        return any(order[u] > order[write] for m in group if m is not target for u in m.users)

    def expand(self, names: Iterable[str]) -> frozenset[str]:
        """`names` with the other names of tied parameters."""
        return frozenset(a for n in names for a in self.aliases[n])

    def region(self, names: frozenset[str]) -> _Region:
        """The part of the graph downstream of the (alias-expanded) parameter `names`."""
        seeds = {node for n in names for node in self.readers[n]}
        if any(not self.readers[n] for n in names):
            return _Region(names, full=True)  # a parameter the trace does not see: only the full forward is safe
        down: set[fx.Node] = set()
        for node in self.nodes:  # topological order: one pass propagates
            if node in seeds or any(a in down for a in node.all_input_nodes):
                down.add(node)
        if self.output not in down:
            return _Region(names, unaffected=True)
        ordered = [n for n in self.nodes if n in down]
        frontier = [n for n in self.nodes if n not in down and n.op != "get_attr" and any(u in down for u in n.users)]
        return _Region(names, nodes=ordered, frontier=frontier, gm=self._region_module(ordered, frontier, names))

    def _region_module(self, nodes: list[fx.Node], frontier: list[fx.Node], names: frozenset[str]) -> fx.GraphModule:
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inside = set(nodes)
        for f in frontier:
            p = g.placeholder(f.name)
            # A kept value that the region overwrites in place is copied first: it serves every perturbation.
            env[f] = g.call_method("clone", (p,)) if self.mutated.get(f) in inside else p

        def arg(a: fx.Node) -> fx.Node:
            if a not in env:  # an unchanged parameter or constant read by the region: read it again
                env[a] = g.get_attr(a.target)
            return env[a]

        for node in nodes:
            env[node] = g.node_copy(node, arg)
        gm = fx.GraphModule(self.gm, g)
        # `functional_call` swaps the new values into the region's modules for the call. Parameters
        # read by `get_attr` sit on modules of the region's own; a called module owning a changed
        # parameter is shared with the model (and other regions), so the region gets its own shallow
        # copy of it (same tensors): regions can then run concurrently without seeing each other's values.
        for node in g.nodes:
            if node.op == "call_module" and any(n.startswith(node.target + ".") for n in names):
                parent, _, leaf = node.target.rpartition(".")
                setattr(gm.get_submodule(parent), leaf, _shallow_copy(gm.get_submodule(node.target)))
        return gm

    def keeper(self, kept: Sequence[fx.Node], with_output: bool) -> fx.GraphModule:
        """The unmodified graph returning `(output, kept values)` (or only the kept values, with
        everything they do not need removed)."""
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        copies: dict[fx.Node, fx.Node] = {}
        wanted = set(kept)
        for node in self.nodes:
            if node.op == "output":
                continue
            env[node] = g.node_copy(node, lambda a: env[a])
            if node in wanted and node in self.mutated:  # copy before a later op overwrites it
                copies[node] = g.call_method("clone", (env[node],))
        values = tuple(copies.get(k, env[k]) for k in kept)
        g.output((map_arg(self.output.args[0], lambda a: env[a]), values) if with_output else values)
        gm = fx.GraphModule(self.gm, g)
        if not with_output:
            gm.graph.eliminate_dead_code()  # needs the owning module to judge call_module nodes
            gm.recompile()
        return gm


def conv_bn(x, weight, bias, gamma, beta, mean, var, eps, stride, padding, dilation, groups):
    """An evaluation-mode `BatchNorm2d(Conv2d(x))` as one convolution with the normalization folded
    into its weight and bias (computed on every call, so substituted values of either take effect)."""
    scale = torch.rsqrt(var + eps)
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale if bias is None else (bias - mean) * scale
    if beta is not None:
        shift = shift + beta
    return F.conv2d(x, weight * scale.reshape(-1, 1, 1, 1), shift, stride, padding, dilation, groups)


def _fold_batchnorm(gm: fx.GraphModule) -> dict[fx.Node, tuple[str, str]]:
    """Replace every `bn(conv(x))` whose convolution output nothing else reads by one `conv_bn` call
    reading both modules' tensors; return {new node: (conv name, bn name)}. Saves a pass over the activations (and a
    temporary) per pair; evaluation mode only (the engine always evaluates in it)."""
    modules = dict(gm.named_modules())
    folded = {}
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if (type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or len(src.users) != 1
                or len(src.args) != 1 or src.kwargs or isinstance(conv.padding, str)):
            continue
        with gm.graph.inserting_before(node):
            def attr(module_name: str, name: str, present: bool):
                return gm.graph.get_attr(f"{module_name}.{name}") if present else None
            args = (src.args[0], attr(src.target, "weight", True), attr(src.target, "bias", conv.bias is not None),
                    attr(node.target, "weight", bn.weight is not None), attr(node.target, "bias", bn.bias is not None),
                    attr(node.target, "running_mean", True), attr(node.target, "running_var", True),
                    bn.eps, conv.stride, conv.padding, conv.dilation, conv.groups)
            fused = gm.graph.call_function(conv_bn, args)
        node.replace_all_uses_with(fused)
        folded[fused] = (src.target, node.target)
        gm.graph.erase_node(node)
        gm.graph.erase_node(src)
    if folded:
        gm.graph.lint()
        gm.recompile()
    return folded


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (and its children) with its own parameter/buffer tables, sharing the tensors."""
    twin = copy.copy(module)
    twin._parameters, twin._buffers = dict(module._parameters), dict(module._buffers)
    twin._modules = {k: None if m is None else _shallow_copy(m) for k, m in module._modules.items()}
    return twin


def _bound_inplace(node: fx.Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return bound.arguments.get("inplace") is True


@dataclass(eq=False)
class _Region:
    """What one set of changed parameters needs recomputed.

    Attributes:
        names: the changed parameter/buffer names (tied names included).
        full: the trace does not see one of them: run the full forward.
        unaffected: the output does not depend on them: the unmodified logits.
        nodes: the downstream nodes, in graph order.
        frontier: upstream nodes the region reads (the kept values; the input placeholder too).
        gm: the region as a module taking the frontier values.
        peak_per_sample: estimated bytes per sample alive at once while the region runs (0: unknown).
    """

    names: frozenset[str]
    full: bool = False
    unaffected: bool = False
    nodes: list[fx.Node] = field(default_factory=list)
    frontier: list[fx.Node] = field(default_factory=list)
    gm: fx.GraphModule | None = None
    runner: Callable[[dict, tuple], torch.Tensor] | None = None  # (values, frontier values) -> logits
    peak_per_sample: float = 0.0
    stacked: bool | None = None  # False once vmap failed on this region


@dataclass(eq=False)
class _Keep:
    """What the unmodified run keeps for a set of regions, and the graphs that compute it."""

    nodes: tuple[fx.Node, ...]  # computed frontier nodes (placeholders excluded: the batch itself)
    keeper: Callable  # x -> (output, kept values)
    prefix: Callable  # x -> kept values, computing nothing else (for sub-batches)
    per_sample: float | None = None  # estimated bytes of kept values per sample


@dataclass(eq=False)
class _Plan:
    """The regions of one engine pass (one per perturbation, shared by equal parameter sets)."""

    key: tuple[frozenset[str], ...]
    regions: list[_Region]
    keep: _Keep


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
            self._fall_back(f"torch.fx cannot trace it: {_first_line(e)}")

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
        keep.per_sample = _storage_bytes(keep.prefix(probe)) / len(probe) if keep.nodes else 0.0
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
        self.peak_bytes = max(self.peak_bytes, _storage_bytes(values))

    def _estimate_peaks(self, probe: torch.Tensor) -> None:
        """Per-sample bytes alive at once in each region, from the node outputs on `probe`."""
        sizes: dict[fx.Node, float] = {}

        class Sizes(fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                sizes[n] = _numel_bytes(out) / len(probe)
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
        kept_bytes = _storage_bytes(kept.values())
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
                      sorted(region.names), _first_line(e))
            region.stacked = False
            return [one(v) for v in values]
        return out


def _runner(gm: fx.GraphModule, compile: bool | str) -> Callable[[dict, tuple], torch.Tensor]:
    def run(params: dict[str, torch.Tensor], args: tuple) -> torch.Tensor:
        # The values replace the region module's own parameters for this call only: nothing is written.
        return torch.func.functional_call(gm, params, args)  # the raw output

    return compiled(run, compile)


def _check_trace(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, ours: object = None) -> tuple[bool, str]:
    """Whether the traced graph `gm` computes what `model` does on the samples `x` (see the module
    docstring); `ours`: `gm`'s output on `x` if already computed. (True, how it was checked) or (False, why not)."""
    with torch.no_grad():
        ours, theirs = gm(x) if ours is None else ours, call_model(model, x)
        if _same_output(ours, theirs, rtol=1e-5, atol=1e-6)[0]:
            return True, f"its trace matches the model to 1e-5 of the outputs' magnitude on {len(x)} samples"
        wide = _check_in_float64(model, gm, x)
        if wide is not None:
            ok, why = _same_output(*wide, rtol=1e-7, atol=1e-12, how="in float64")
            return ok, why or f"its trace matches the model in float64 on {len(x)} samples"
        ok, why = _same_output(ours, theirs, rtol=1e-3, atol=1e-5, how="relative to the outputs' magnitude")
        return ok, why or f"its trace matches the model to 1e-3 of the outputs' magnitude on {len(x)} samples"


def _check_in_float64(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> tuple[object, object] | None:
    """The outputs of `gm` and `model` on `x` with every floating-point parameter, buffer and input
    cast to float64 through `functional_call` (the model is not touched); None where float64 cannot
    be used (too large, a float32 constant, no float64 kernel, an output not in float64)."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    floating = {n: t for n, t in tensors.items() if t.is_floating_point()}
    if sum(t.numel() for t in floating.values()) * 8 > _FP64_CHECK_BYTES:
        return None
    wide, by_id = {}, {}
    for n, t in floating.items():  # tied tensors stay tied: one float64 copy each
        if id(t) not in by_id:
            by_id[id(t)] = t.detach().double()
        wide[n] = by_id[id(t)]
    known = {n for n, _ in gm.named_parameters(remove_duplicate=False)} | {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    xd = x.double() if x.is_floating_point() else x
    try:
        ours = torch.func.functional_call(gm, {n: v for n, v in wide.items() if n in known}, (xd,))
        theirs = torch.func.functional_call(model, wide, (xd,))
    except Exception:  # noqa: BLE001  (float64 is not possible here)
        return None
    leaves = _tensor_leaves(ours) + _tensor_leaves(theirs)
    if not leaves or any(t.dtype != torch.float64 for t in leaves if t.is_floating_point()):
        return None
    return ours, theirs


def _same_output(a: object, b: object, **tolerance) -> tuple[bool, str]:
    """`_same` on every tensor of two raw outputs (tensors, tuples, dicts, `ModelOutput`s)."""
    ours, theirs = _tensor_leaves(a), _tensor_leaves(b)
    if len(ours) != len(theirs):
        return False, f"the traced graph returns {len(ours)} tensors, the model {len(theirs)}"
    for u, v in zip(ours, theirs):
        ok, why = _same(u, v, **tolerance)
        if not ok:
            return ok, why
    return True, ""


def _tensor_leaves(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [t for v in values for t in _tensor_leaves(v)]


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3, atol: float = 1e-5, how: str = "") -> tuple[bool, str]:
    """Whether `a` (the trace's) equals `b` (the model's) up to `rtol` × max |b| + `atol`: round-off
    is relative to the outputs' magnitude, a wrong trace differs at that magnitude."""
    if a.shape != b.shape:
        return False, f"the traced graph returns shape {tuple(a.shape)}, the model {tuple(b.shape)}"
    if torch.equal(a, b):
        return True, ""
    if not (a.is_floating_point() or a.is_complex()):
        return False, "the traced graph's output differs from the model's (integer values)"
    a, b = a.double(), b.double()
    diff = (a - b).abs().masked_fill(a.isnan() & b.isnan(), 0).nan_to_num(math.inf).max()
    scale = b.abs().nan_to_num(0, 0, 0).max()
    tol = rtol * float(scale) + atol
    if float(diff) <= tol:
        return True, ""
    return False, (f"the traced graph's output differs from the model's by {float(diff):.3g} {how} (outputs up to "
                   f"{float(scale):.3g}; round-off stays below {tol:.2g}): Python control flow or state the trace cannot see?")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _fallback(model: nn.Module, memory_budget: int, batch_trials: bool | None, compile: bool | str) -> Executor:
    """What "auto" runs when the fx trace cannot be used: the block-prefix executor when the model has
    a stack of repeated blocks (transformers), else the full forward."""
    from .blocks import find_block_stack
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
