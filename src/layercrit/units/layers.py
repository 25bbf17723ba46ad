"""Layer discovery and selection: which parameters a probe may change, as units.

A *layer* is a module that owns parameters directly. A *unit* is what one probe changes at once:
a layer, a block (granularity="block"), an attention or MLP sub-layer of a transformer block
(granularity="attn"/"mlp"), or an explicit joint group of layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import LayercritError
from .labels import block_units, layer_labels, resnet_root, stack_units

__all__ = ["GRANULARITIES", "Layer", "Unit", "is_norm_layer", "list_layers", "select_units"]

GRANULARITIES = ("layer", "block", "attn", "mlp")

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def is_norm_layer(module: nn.Module) -> bool:
    """Normalization layers (BatchNorm, LayerNorm, GroupNorm, RMSNorm and look-alikes by class name)."""
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


@dataclass(frozen=True)
class Layer:
    """A module owning parameters directly.

    Attributes:
        name: qualified module name (`""` for the root module).
        label: readable label (paper style for known layouts, else the name).
        kind: class name of the module.
        params: full names of its parameters in `model.named_parameters()`.
        n_params: number of scalar parameters.
        is_norm: a normalization layer (not probed unless asked).
    """

    name: str
    label: str
    kind: str
    params: tuple[str, ...]
    n_params: int
    is_norm: bool


@dataclass(frozen=True)
class Unit:
    """What one probe changes at once: one layer, one block, or a joint group.

    Attributes:
        name: the layer or block name, or the group's name.
        label: readable label.
        params: full parameter names changed together.
        layers: names of the layers involved.
        n_params: number of scalar parameters changed.
        modules: module paths the unit stands for (the block, the sub-layer(s), the layer, or a
            group's layers); what the `skip` probe bypasses.
    """

    name: str
    label: str
    params: tuple[str, ...]
    layers: tuple[str, ...]
    n_params: int
    modules: tuple[str, ...] = ()


def list_layers(model: nn.Module, include_norm: bool = True, label_style: str = "auto") -> list[Layer]:
    """Every module that owns parameters directly, in module order.

    Args:
        model: any `nn.Module`.
        include_norm: list normalization layers too (they are listed by default, probed only on request).
        label_style: "auto" (paper style where the layout is known), "name", "gavrikov" or "zhang".
    """
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():  # deduplicates tied parameters: first name wins
        canonical.setdefault(id(p), name)
    layers: list[tuple[str, nn.Module, tuple[str, ...]]] = []
    seen: set[int] = set()
    for mname, module in model.named_modules():
        own = []
        for _pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or id(p) not in canonical:
                continue
            seen.add(id(p))
            own.append(canonical[id(p)])
        if own:
            layers.append((mname, module, tuple(own)))
    labels = layer_labels(model, [n for n, _, _ in layers], label_style)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    out = [
        Layer(n, labels[n], type(m).__name__, ps, sum(sizes[p] for p in ps), is_norm_layer(m))
        for n, m, ps in layers
    ]
    return out if include_norm else [layer for layer in out if not layer.is_norm]


def _matches(layer_or_unit: Layer | Unit, patterns: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(layer_or_unit.name, p) or fnmatch.fnmatchcase(layer_or_unit.label, p) for p in patterns
    )


def _type_matches(model: nn.Module, layer: Layer, types: Sequence[str | type]) -> bool:
    module = model.get_submodule(layer.name)
    for t in types:
        if isinstance(t, type):
            if isinstance(module, t):
                return True
        elif any(c.__name__.lower() == t.lower() for c in type(module).__mro__):
            return True
    return False


def _under(name: str, prefix: str) -> bool:
    return name == prefix or (bool(prefix) and name.startswith(prefix + "."))


def _with_stats(model: nn.Module, layer: Layer) -> Layer:
    """`layer` changing its running statistics (buffers) too: the reference code loads a fresh
    module's whole state, BatchNorm's `running_mean`/`running_var` included."""
    module = model.get_submodule(layer.name)
    stats = tuple(f"{layer.name}.{b}" if layer.name else b for b in ("running_mean", "running_var")
                  if isinstance(getattr(module, b, None), torch.Tensor))
    return dataclasses.replace(layer, params=layer.params + stats)


def _unit_of(name: str, label: str, layers: Iterable[Layer], modules: Sequence[str] | None = None) -> Unit:
    layers = list(layers)
    params = tuple(p for layer in layers for p in layer.params)
    names = tuple(layer.name for layer in layers)
    return Unit(name, label, params, names, sum(la.n_params for la in layers), tuple(modules) if modules is not None else names)


def select_units(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    types: Sequence[str | type] | None = None,
    include_norm: bool | str = False,
    granularity: str = "layer",
    groups: Mapping[str, Sequence[str]] | Sequence[Sequence[str]] | None = None,
    label_style: str = "auto",
) -> list[Unit]:
    """The units to probe.

    Args:
        model: the model.
        layers: name/label globs; a layer (or block) matching any of them is selected. None: all.
        types: module classes or class names (subclasses included). None: all.
        include_norm: also change normalization layers' parameters (True), or their parameters and
            running statistics (`"stats"`: BatchNorm's `running_mean` and `running_var` are in the
            unit's `params` too, as the reference code resets them; the probes draw, copy or zero them
            like parameters, a fresh draw giving the untrained mean 0 and variance 1).
        granularity: "layer" (each layer alone), "block" (each residual or transformer block; a
            transformer's embeddings and head are one unit each; else each top-level child), "attn" or
            "mlp" (the attention / MLP sub-layer of each transformer block).
        groups: explicit joint groups, `{name: [glob, ...]}` or `[[glob, ...], ...]`; each group is
            one unit whose layers are reset together. Replaces `granularity`.
        label_style: see `list_layers`.

    Raises:
        LayercritError: a selector matches nothing, or an argument is invalid.
    """
    if granularity not in GRANULARITIES:
        raise LayercritError(f"Expected `granularity` to be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if include_norm not in (False, True, "stats"):
        raise LayercritError(f"Expected `include_norm` to be true, false or 'stats', got {include_norm!r}")
    all_layers = list_layers(model, include_norm=True, label_style=label_style)
    candidates = [la for la in all_layers if include_norm or not la.is_norm]
    if include_norm == "stats":
        candidates = [_with_stats(model, la) if la.is_norm else la for la in candidates]
    if types:
        candidates = [la for la in candidates if _type_matches(model, la, types)]
        if not candidates:
            raise LayercritError(f"no layer of type {', '.join(map(str, types))}; see `layercrit layers`")
    if groups is not None:
        items = groups.items() if isinstance(groups, Mapping) else ((f"group{i}", g) for i, g in enumerate(groups))
        units = []
        for gname, patterns in items:
            if isinstance(patterns, str):
                patterns = [patterns]
            members = [la for la in candidates if _matches(la, patterns)]
            if not members:
                raise LayercritError(f"group {gname!r} ({', '.join(patterns)}) matches no probe-able layer")
            units.append(_unit_of(gname, gname, members))
        return units
    if granularity == "layer":
        units = [_unit_of(la.name, la.label, [la]) for la in candidates]
    else:
        by_name = {la.name: la for la in candidates}
        specs = None if resnet_root(model) else stack_units(model, granularity, label_style)
        if specs is None:
            if granularity != "block":
                raise LayercritError(
                    f"granularity {granularity!r} needs a stack of transformer blocks with attention and MLP "
                    "sub-layers; this model has none (use 'layer' or 'block')"
                )
            specs = [(n, la, p, ()) for n, la, p in block_units(model, label_style)]
        units = []
        for bname, blabel, prefixes, exact in specs:
            members = [la for n, la in by_name.items() if n in exact or any(_under(n, p) for p in prefixes)]
            if members:
                units.append(_unit_of(bname, blabel, members, prefixes + exact))
        if not units and granularity != "block":
            raise LayercritError(f"no block of this model has a recognisable {granularity} sub-layer; use 'layer' or 'block'")
    if layers:
        selected = [u for u in units if _matches(u, layers)]
        if not selected:
            raise LayercritError(
                f"layer selector {' '.join(layers)!r} matches none of the {len(units)} {granularity}s; "
                f"available: {', '.join(u.name for u in units[:12])}{' …' if len(units) > 12 else ''}"
            )
        units = selected
    if not units:
        raise LayercritError("the model has no probe-able layers (no module owns parameters)")
    return units
