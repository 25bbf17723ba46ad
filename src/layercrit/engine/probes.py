"""Probes: temporary, bit-exactly undone changes of one unit's parameters.

Every probe answers `values(model, unit, seed)` with the new values of the unit's parameters
(a dict, so an executor can substitute them without touching the model) and, as a context manager,
`apply(model, unit, seed)`, which writes them into the model and restores the originals on exit,
also when the block raises. A structural probe (`skip`) answers a `Change`: a dict of values that
also names modules to bypass, which `substitute` does with forward hooks removed on exit.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn as nn

from .._utils.registry import Registry
from ..errors import LayercritError
from ..seeding import derive_seed, generator
from ..units.blocks import BlockStack, find_block_stack
from ..units.layers import Unit, is_norm_layer

__all__ = [
    "PROBES",
    "Change",
    "Interpolate",
    "Probe",
    "Reinit",
    "Rerandomize",
    "Skip",
    "Zero",
    "create_probe",
    "gaussian_noise",
    "list_probes",
    "skip_mode",
    "substitute",
]

Values = dict[str, torch.Tensor]

PROBES: Registry[Probe] = Registry("probe")


def create_probe(name: str, **kwargs) -> Probe:
    """Build a registered probe: `create_probe("reinit", reference=state_dict)`."""
    return PROBES.create(name, **kwargs)


def list_probes(pattern: str = "*") -> list[str]:
    return PROBES.list(pattern)


class Change(dict):
    """New parameter values by full name, plus modules whose forward is bypassed.

    A plain dict of values is a `Change` without skips. Copying it with `dict(change)` drops the skips.

    Attributes:
        skip: module paths that become the identity on their residual stream (see `skip_mode`).
        modes: optional `skip_mode` of each skipped path, worked out by `substitute` when absent.
    """

    def __init__(self, values: Mapping[str, torch.Tensor] | None = None, skip=(), modes: Mapping[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.skip: frozenset[str] = frozenset(skip)
        self.modes: dict[str, str] = dict(modes or {})


def skip_mode(model: nn.Module, path: str, stack: BlockStack | None = None) -> str:
    """How module `path` is bypassed so that it adds nothing to the residual stream.

    - "input": a block of the model's block stack returns its first input, the hidden states.
    - "residual": a module that holds a normalization layer holds its own residual connection (a
      post-norm sub-layer: BERT's `attention` = LayerNorm(x + attn(x)), BERT's `output`, T5's
      `layer_ff`); it returns the residual input, the last input of the output's shape.
    - "zero": any other module (the attention or MLP of a pre-norm block, whose output the block adds
      to the residual: GPT-2, Llama, ViT, Mixer; a single layer) returns zeros of its output's shape.

    Args:
        model: the model.
        path: module path.
        stack: `find_block_stack(model)`, if already known.
    """
    stack = find_block_stack(model) if stack is None else stack
    if stack is not None and path in stack.names:
        return "input"
    if any(is_norm_layer(m) for m in model.get_submodule(path).modules()):
        return "residual"
    return "zero"


def _skip_hook(path: str, mode: str) -> Callable:
    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        if isinstance(output, torch.Tensor):
            first = output
        elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            first = output[0]
        else:
            raise LayercritError(f"cannot skip {path!r}: it returns {type(output).__name__}, not a tensor or a tuple starting with one")
        if mode == "zero":
            new = torch.zeros_like(first)
        else:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if mode == "input":
                new = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states", tensors[0] if tensors else None)
            else:
                new = next((a for a in reversed(tensors) if a.shape == first.shape), None)
            if new is None or new.shape != first.shape:
                got = "no tensor input" if new is None else f"input shape {tuple(new.shape)}"
                raise LayercritError(
                    f"cannot skip {path!r}: its output has shape {tuple(first.shape)} and {got}; "
                    "a module that changes the shape has no identity"
                )
            new = new.to(first.dtype)
        if isinstance(output, torch.Tensor):
            return new
        return type(output)((new, *output[1:])) if type(output) in (tuple, list) else (new, *output[1:])

    return hook


@contextlib.contextmanager
def substitute(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Write `values` into the named parameters (or buffers) of `model`; restore them bit-exactly on exit.

    A parameter that owns its storage alone and whose value has its dtype, device, shape and strides
    is pointed at the value (`param.data = value`) and back at its own storage on exit: no copy, and
    the parameter is restored to the very tensor it held. Any other (a buffer, a parameter sharing
    its storage with another tensor of the model, a value to convert) is saved with
    `detach().clone()`, overwritten with `copy_` and copied back. Inside the context the model reads
    the values themselves: a forward that wrote into its own parameters would write into them. The
    modules a `Change` skips get a forward hook (see `skip_mode`) for the duration; every hook is
    removed in `finally`.
    """
    skip = getattr(values, "skip", frozenset())
    modules = dict(model.named_modules()) if skip else {}
    unknown = sorted(p for p in skip if p not in modules)
    if unknown:
        raise LayercritError(f"model has no module(s) {', '.join(unknown)} to skip")
    modes = dict(getattr(values, "modes", None) or {})
    if any(p not in modes for p in skip):
        stack = find_block_stack(model)
        modes |= {p: skip_mode(model, p, stack) for p in skip if p not in modes}
    params = dict(model.named_parameters())
    if any(n not in params for n in values):  # buffers too, for whole-checkpoint evaluations
        params |= dict(model.named_buffers())
    missing = [n for n in values if n not in params]
    if missing:
        raise LayercritError(f"model has no parameter(s) {', '.join(missing)}")
    for n, v in values.items():
        if v.shape != params[n].shape:
            raise LayercritError(f"new value for {n} has shape {tuple(v.shape)}; expected {tuple(params[n].shape)}")
    shared = _shared_storages(model) if values else set()
    pointed: dict[str, torch.Tensor] = {}  # name: the tensor the parameter held
    saved: dict[str, torch.Tensor] = {}  # name: a copy of its value
    handles = []
    try:
        with torch.no_grad():
            for n, v in values.items():
                p = params[n]
                if _can_point(p, v, shared):
                    pointed[n] = p.data
                    p.data = v
                else:
                    saved[n] = p.detach().clone()
                    p.copy_(v)
        for m in sorted(skip):
            handles.append(modules[m].register_forward_hook(_skip_hook(m, modes[m]), with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, data in pointed.items():
                params[n].data = data
            for n, v in saved.items():
                params[n].copy_(v)


def _shared_storages(model: nn.Module) -> set[int] | None:
    """Storages (by data pointer) that more than one parameter or buffer object of `model` uses; None
    when a tensor's storage cannot be read (a wrapper subclass): then every value is copied."""
    seen: dict[int, int] = {}
    tensors = {id(t): t for _, t in model.named_parameters(remove_duplicate=False)}
    tensors |= {id(t): t for _, t in model.named_buffers(remove_duplicate=False)}
    for t in tensors.values():
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            return None
        seen[ptr] = seen.get(ptr, 0) + 1
    return {ptr for ptr, count in seen.items() if count > 1}


def _can_point(p: torch.Tensor, v: torch.Tensor, shared: set[int] | None) -> bool:
    """Whether parameter `p` can be pointed at `v` instead of overwritten: a dense parameter alone on
    its storage, `v` a dense tensor laid out as it is, at the same alignment to 64 bytes (BLAS
    libraries may take another path for another alignment; then every kernel computes as with a copy)."""
    return (shared is not None and isinstance(p, nn.Parameter) and type(p.data) is torch.Tensor and type(v) in (torch.Tensor, nn.Parameter)
            and p.layout == v.layout == torch.strided and v.dtype == p.dtype and v.device == p.device
            and v.stride() == p.stride() and p.device.type != "meta" and v.data_ptr() % 64 == p.data_ptr() % 64
            and p.untyped_storage().data_ptr() not in shared and v.untyped_storage().data_ptr() != p.untyped_storage().data_ptr())


def gaussian_noise(like: torch.Tensor, seed: int, name: str) -> torch.Tensor:
    """Standard-normal noise shaped like `like`, drawn on the CPU from its own generator seeded by
    (seed, parameter name): the same draw on every device and whatever else is selected."""
    g = generator(derive_seed(seed, name))
    return torch.randn(like.shape, generator=g, dtype=like.dtype).to(like.device)


class Probe:
    """Base class: subclasses set `name` and implement `values`.

    Attributes:
        name: registry name, used in result rows.
        random: whether trials draw different values (deterministic probes run one trial).
    """

    name: ClassVar[str] = ""
    random: ClassVar[bool] = False

    def values(self, model: nn.Module, unit: Unit, seed: int) -> Values:
        """New values for `unit.params`, on the parameters' device and dtype."""
        raise NotImplementedError

    def check(self, model: nn.Module, units: list[Unit]) -> None:
        """Validate against the model and units before any compute (raises `LayercritError`)."""

    @contextlib.contextmanager
    def apply(self, model: nn.Module, unit: Unit, seed: int = 0) -> Iterator[nn.Module]:
        """Change `unit` in place for the duration of the block."""
        with substitute(model, self.values(model, unit, seed)):
            yield model

    def describe(self) -> dict:
        """What the probe is, for result metadata; `target` names what the unit is reset to."""
        return {"probe": self.name, "target": self.name}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    # Buffers too: a unit may hold running statistics (`include_norm="stats"`).
    return dict(model.named_buffers()) | dict(model.named_parameters())


@PROBES.register("rerandomize")
class Rerandomize(Probe):
    """A fresh draw from each layer's own initialization distribution.

    With a `factory` (the model's untrained constructor) the model is built under the trial's seed
    and the unit's parameters are taken from it: the faithful init, also for models whose
    constructor re-initializes layers (torchvision ResNets use Kaiming-normal, not PyTorch's
    default). A factory that returns the model's own values whatever the seed (one that calls
    `from_pretrained`) is refused. Models are built once per seed.

    Without a factory, a layer of a Hugging Face model (under a `PreTrainedModel`) is drawn by the
    model's own `_init_weights` (std `initializer_range`, GPT-2's scaled `c_proj`, …): the enclosing
    block (or, outside the blocks, the layer's highest ancestor that holds no block) is copied to the
    CPU and `_init_weights` applied to each of its modules, children first, as `post_init` does. Other
    layers are copied and their `reset_parameters()` called, with a warning. Either way the draw
    comes from a CPU generator seeded by the trial seed and the copied module's name, never from the
    global RNG.

    Args:
        factory: zero-argument callable returning an untrained model of the same architecture.
    """

    name = "rerandomize"
    random = True

    def __init__(self, factory: Callable[[], nn.Module] | None = None) -> None:
        self.factory = factory
        self._fresh: dict[int, dict[str, torch.Tensor]] = {}
        self._warned = False
        self._source = "factory" if factory is not None else "reset_parameters"
        self._stack: tuple[int, BlockStack | None] | None = None

    def _fresh_params(self, seed: int) -> dict[str, torch.Tensor]:
        if seed not in self._fresh:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fresh = self.factory()
            self._fresh[seed] = {n: p.detach() for n, p in [*fresh.named_buffers(), *fresh.named_parameters()]}
        return self._fresh[seed]

    def _stack_of(self, model: nn.Module) -> BlockStack | None:
        if self._stack is None or self._stack[0] != id(model):
            self._stack = (id(model), find_block_stack(model))
        return self._stack[1]

    def check(self, model: nn.Module, units: list[Unit]) -> None:
        params = _params(model)
        if self.factory is not None:
            fresh = self._fresh_params(0)
            for u in units:
                for n in u.params:
                    if n not in fresh:
                        raise LayercritError(
                            f"the model factory builds no parameter {n!r}: it is not the model's architecture"
                        )
                    if fresh[n].shape != params[n].shape:
                        raise LayercritError(
                            f"the model factory builds {n!r} with shape {tuple(fresh[n].shape)}, the model has "
                            f"{tuple(params[n].shape)}: factory arguments differ from the weights'"
                        )
            # An untrained model built under seed 0 equals the seed-0 draw; a second seed tells it from a
            # factory that loads the model's weights. Constant tensors (a norm's ones) prove nothing.
            probed = [n for u in units for n in u.params if not _constant(params[n])]
            if probed and all(_same(self._fresh_params(s)[n], params[n]) for s in (0, 1) for n in probed):
                raise LayercritError(
                    "the model factory returns the model's own weights whatever the seed (does it call "
                    "from_pretrained or load a checkpoint?): re-randomizing would change nothing; give the "
                    "untrained constructor instead (e.g. AutoModelFor….from_config(config))"
                )
            self._fresh.clear()
            return
        plain = []
        for u in units:
            for lname in u.layers:
                if _hf_owner(model, lname) is not None:
                    continue
                module = model.get_submodule(lname)
                if _reset_fn(module) is None:
                    raise LayercritError(
                        f"cannot re-randomize layer {lname!r} ({type(module).__name__}): it has no "
                        "reset_parameters() and no model factory was given; pass the model's constructor as factory"
                    )
                plain.append(lname)
        hf = any(_hf_owner(model, lname) is not None for u in units for lname in u.layers)
        self._source = "+".join(s for s, used in (("_init_weights", hf), ("reset_parameters", plain or not hf)) if used)
        if plain and not self._warned:
            self._warned = True
            warnings.warn(
                "re-randomizing with each layer's reset_parameters(): this may differ from the model's real init "
                "(torchvision ResNets, for example, use Kaiming-normal); give a model factory for a faithful init",
                stacklevel=3,
            )

    def values(self, model: nn.Module, unit: Unit, seed: int) -> Values:
        params = _params(model)
        if self.factory is not None:
            fresh = self._fresh_params(seed)
            return {n: fresh[n].to(params[n].device, params[n].dtype) for n in unit.params}
        out: Values = {}
        wanted = set(unit.params)
        prefix_of = {n: n.rsplit(".", 1)[0] if "." in n else "" for n in unit.params}
        scopes: dict[str, nn.Module] = {}  # fresh copies of the modules `_init_weights` ran on, by path
        for lname in unit.layers:
            owner = _hf_owner(model, lname)
            clone = None
            if owner is not None:
                scope = _init_scope(model, lname, owner[0], self._stack_of(model))
                if scope not in scopes:
                    stack = self._stack_of(model)
                    own_only = stack is not None and any(_under(st, scope) for st in stack.stages)
                    scopes[scope] = _hf_fresh(model, scope, owner[1], derive_seed(seed, scope), own_only)
                rel = lname[len(scope) + 1 :] if lname != scope else ""
                clone = scopes[scope].get_submodule(rel)
                untouched = [n for n, p in clone.named_parameters(recurse=False) if p.is_floating_point() and p.isnan().any()]
                if untouched:  # `_init_weights` does not know this layer: its own reset, if it has one
                    if _reset_fn(clone) is None:
                        raise LayercritError(
                            f"cannot re-randomize layer {lname!r} ({type(clone).__name__}): the model's _init_weights "
                            f"does not initialize {', '.join(untouched)} and the layer has no reset_parameters(); "
                            "pass the model's constructor as factory"
                        )
                    clone = None
            if clone is None:
                module = model.get_submodule(lname)
                reset = _reset_fn(module)
                if reset is None:
                    raise LayercritError(f"cannot re-randomize layer {lname!r} ({type(module).__name__}): no reset_parameters()")
                clone = copy.deepcopy(module).cpu()  # drawn on the CPU: the same values on every device
                with torch.random.fork_rng(devices=[]), torch.no_grad():
                    torch.manual_seed(derive_seed(seed, lname))
                    _reset_fn(clone)()
            for pname, p in [*clone.named_parameters(recurse=False), *clone.named_buffers(recurse=False)]:
                full = f"{lname}.{pname}" if lname else pname
                if full in wanted and prefix_of[full] == lname:
                    out[full] = p.detach().to(params[full].device, params[full].dtype)
        return out

    def describe(self) -> dict:
        return {"probe": self.name, "target": self.name, "init_source": self._source}


def _under(name: str, prefix: str) -> bool:
    return not prefix or name == prefix or name.startswith(prefix + ".")


def _constant(t: torch.Tensor) -> bool:
    flat = t.detach().flatten()
    return bool((flat == flat[0]).all()) if flat.numel() else True


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.device, b.dtype), b.detach())


def _is_hf(module: nn.Module) -> bool:
    """A Hugging Face `PreTrainedModel` (duck-typed: transformers need not be installed)."""
    return callable(getattr(module, "_init_weights", None)) and hasattr(module, "config") and hasattr(module, "post_init")


def _hf_owner(model: nn.Module, lname: str) -> tuple[str, nn.Module] | None:
    """(path, module) of the innermost `PreTrainedModel` at or above layer `lname`, else None."""
    parts = lname.split(".") if lname else []
    found = None
    module = model
    for i in range(len(parts) + 1):
        if i:
            module = getattr(module, parts[i - 1])
        if _is_hf(module):
            found = (".".join(parts[:i]), module)
    return found


def _init_scope(model: nn.Module, lname: str, owner: str, stack: BlockStack | None) -> str:
    """The module `_init_weights` runs on for layer `lname`: its block, else its highest ancestor below
    the owning `PreTrainedModel` that holds no block (`bert.embeddings`, `lm_head`)."""
    i = stack.block_of(lname) if stack is not None else None
    if i is not None:
        return stack.names[i]
    parts = lname.split(".") if lname else []
    for k in range(1, len(parts) + 1):
        path = ".".join(parts[:k])
        if (owner and not path.startswith(owner + ".")) or path == owner:
            continue
        if stack is not None and any(_under(s, path) for s in stack.stages):
            continue
        return path
    return lname


def _hf_fresh(model: nn.Module, scope: str, owner: nn.Module, seed: int, own_only: bool = False) -> nn.Module:
    """A CPU copy of module `scope` with every parameter drawn anew by `owner._init_weights` (NaN where
    it drew none). `own_only`: copy only the module's own parameters (it holds the block stack)."""
    module = model.get_submodule(scope)
    clone = _own_copy(module) if own_only else copy.deepcopy(module).cpu()
    for m in clone.modules():  # a loaded model marks its tensors initialized; the copy must be drawn
        m.__dict__.pop("_is_hf_initialized", None)
    with torch.no_grad():
        for t in (*clone.parameters(), *clone.buffers()):
            t.__dict__.pop("_is_hf_initialized", None)
        for p in clone.parameters():
            if p.is_floating_point():
                p.fill_(math.nan)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        try:
            _hf_apply(clone, owner)
        except Exception:  # noqa: BLE001  (an init that needs what a partial copy lacks: its values stay NaN)
            if not own_only:
                raise
    return clone


def _own_copy(module: nn.Module) -> nn.Module:
    """A shallow CPU copy of `module` with copies of its own parameters and buffers and no children."""
    clone = copy.copy(module)
    clone.__dict__ = dict(module.__dict__)
    clone._modules = {}
    clone._parameters = {n: None if p is None else nn.Parameter(p.detach().cpu().clone(), p.requires_grad)
                         for n, p in module._parameters.items()}
    clone._buffers = {n: None if b is None else b.detach().cpu().clone() for n, b in module._buffers.items()}
    return clone


def _hf_apply(module: nn.Module, owner: nn.Module) -> None:
    """`_init_weights` on every module of `module`, children first (as `PreTrainedModel.post_init`); a
    nested `PreTrainedModel` initializes its own subtree."""
    for child in module.children():
        _hf_apply(child, child if _is_hf(child) else owner)
    owner._init_weights(module)


def _reset_fn(module: nn.Module) -> Callable[[], None] | None:
    for attr in ("reset_parameters", "_reset_parameters"):
        fn = getattr(module, attr, None)
        if callable(fn):
            return fn
    return None


def _check_reference(model: nn.Module, units: list[Unit], reference: Mapping[str, torch.Tensor], what: str) -> None:
    params = _params(model)
    for u in units:
        for n in u.params:
            if n not in reference:
                raise LayercritError(f"the {what} has no parameter {n!r}; is it a state dict of this model?")
            if tuple(reference[n].shape) != tuple(params[n].shape):
                raise LayercritError(
                    f"the {what} has {n!r} with shape {tuple(reference[n].shape)}; the model has {tuple(params[n].shape)}"
                )


@PROBES.register("reinit")
class Reinit(Probe):
    """The unit's values from a reference state dict, e.g. checkpoint 0 (Zhang's re-initialization).

    Args:
        reference: a state dict of the same architecture.
        target: name of the reference in result rows (e.g. "E0").
    """

    name = "reinit"

    def __init__(self, reference: Mapping[str, torch.Tensor], target: str = "reference") -> None:
        self.reference = reference
        self.target = target

    def check(self, model: nn.Module, units: list[Unit]) -> None:
        _check_reference(model, units, self.reference, "reference state dict")

    def values(self, model: nn.Module, unit: Unit, seed: int) -> Values:
        params = _params(model)
        return {n: self.reference[n].to(params[n].device, params[n].dtype) for n in unit.params}

    def describe(self) -> dict:
        return {"probe": self.name, "target": self.target}


@PROBES.register("zero")
class Zero(Probe):
    """All of the unit's parameters set to zero."""

    name = "zero"

    def values(self, model: nn.Module, unit: Unit, seed: int) -> Values:
        params = _params(model)
        return {n: torch.zeros_like(params[n]) for n in unit.params}


@PROBES.register("skip")
class Skip(Probe):
    """The unit bypassed: a block becomes the identity on its residual stream (it returns the hidden
    states it was given), an attention or MLP sub-layer adds nothing to it, as when ShortGPT, Gromov et
    al. and SLEB remove blocks. See `skip_mode` for how each module is bypassed; nothing is written into
    the parameters. Deterministic (one trial). Applies to blocks of the model's block stack and to
    modules inside them, not to the embeddings or the head (they have no identity).
    """

    name = "skip"

    def __init__(self) -> None:
        self._stack: tuple[int, BlockStack | None] | None = None

    def _stack_of(self, model: nn.Module) -> BlockStack | None:
        if self._stack is None or self._stack[0] != id(model):
            self._stack = (id(model), find_block_stack(model))
        return self._stack[1]

    def check(self, model: nn.Module, units: list[Unit]) -> None:
        stack = self._stack_of(model)
        if stack is None:
            raise LayercritError("probe 'skip' needs a stack of repeated blocks (transformer layers, residual blocks); this model has none")
        for u in units:
            outside = [m for m in u.modules if stack.block_of(m) is None]
            if outside or not u.modules:
                raise LayercritError(
                    f"probe 'skip' bypasses blocks and their sub-layers; unit {u.label!r} "
                    f"({', '.join(m or '(root)' for m in outside) or 'no module'}) "
                    f"is not in the block stack ({', '.join(stack.stages)}); select blocks (e.g. --layers 'L*') "
                    "or use --granularity attn/mlp"
                )

    def values(self, model: nn.Module, unit: Unit, seed: int) -> Change:
        stack = self._stack_of(model)
        return Change({}, skip=unit.modules, modes={m: skip_mode(model, m, stack) for m in unit.modules})

    def describe(self) -> dict:
        return {"probe": self.name, "target": "identity"}


@PROBES.register("interpolate")
class Interpolate(Probe):
    """(1−α)·θ⁰ + α·θᶠ + u with u ~ N(0, σ²I) (Chatterji et al., Def. 3.1).

    θᶠ is the model's current value, θ⁰ the `reference` (checkpoint 0). σ = 0 gives the plain
    interpolation; the noise is drawn from a generator seeded per (seed, parameter name).

    Args:
        reference: initial state dict θ⁰.
        alpha: position on the path, 0 = θ⁰, 1 = θᶠ.
        sigma: standard deviation of the Gaussian noise.
    """

    name = "interpolate"

    def __init__(self, reference: Mapping[str, torch.Tensor], alpha: float = 0.0, sigma: float = 0.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise LayercritError(f"Expected `alpha` to be in [0, 1], got {alpha}")
        if sigma < 0:
            raise LayercritError(f"Expected `sigma` to be non-negative, got {sigma}")
        self.reference, self.alpha, self.sigma = reference, float(alpha), float(sigma)

    @property
    def random(self) -> bool:  # type: ignore[override]
        return self.sigma > 0

    def check(self, model: nn.Module, units: list[Unit]) -> None:
        _check_reference(model, units, self.reference, "initial state dict")

    def values(self, model: nn.Module, unit: Unit, seed: int) -> Values:
        params = _params(model)
        out: Values = {}
        for n in unit.params:
            theta_f = params[n].detach()
            theta_0 = self.reference[n].to(theta_f.device, theta_f.dtype)
            v = torch.lerp(theta_0, theta_f, self.alpha)
            out[n] = v + self.sigma * gaussian_noise(v, seed, n) if self.sigma > 0 else v
        return out

    def describe(self) -> dict:
        return {"probe": self.name, "target": f"alpha={self.alpha:g},sigma={self.sigma:g}", "alpha": self.alpha, "sigma": self.sigma}


def build_probes(
    names: Sequence[str | Probe],
    factory: Callable[[], nn.Module] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    reference_name: str = "reference",
) -> list[Probe]:
    """Probe objects for names, wiring the init source (`factory`) and `reference` state dict."""
    probes = []
    for p in names:
        if isinstance(p, Probe):
            probes.append(p)
        elif p == "rerandomize":
            probes.append(Rerandomize(factory))
        elif p == "reinit":
            if reference is None:
                raise LayercritError("probe 'reinit' needs a reference state dict (--reference FILE), e.g. checkpoint 0")
            probes.append(Reinit(reference, reference_name))
        elif p == "interpolate":
            if reference is None:
                raise LayercritError("probe 'interpolate' needs the initial state dict θ⁰ (--reference FILE), e.g. checkpoint 0")
            probes.append(Interpolate(reference))
        else:
            probes.append(PROBES.create(p))
    return probes
