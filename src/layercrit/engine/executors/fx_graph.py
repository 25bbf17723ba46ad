"""The torch.fx side of the incremental executor: tracing (evaluation-mode identities removed, in-place
ops made safe), BatchNorm folding, and the plan of regions (downstream parts) and kept values."""

from __future__ import annotations

import copy
import inspect
import operator
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from .base import eval_mode
from .fx_check import _SPECIALIZATION_CHECKS

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


_traces: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, _Trace]] = weakref.WeakKeyDictionary()  # model -> trace


class _NotIncremental(Exception):
    """The model's graph cannot be run incrementally (the message says why)."""


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
