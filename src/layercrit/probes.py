"""Probes: temporary, bit-exactly undone changes of one unit's parameters.

Every probe answers `values(model, unit, seed)` with the new values of the unit's parameters
(a dict, so an executor can substitute them without touching the model) and, as a context manager,
`apply(model, unit, seed)`, which writes them into the model and restores the originals on exit,
also when the block raises.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import torch
import torch.nn as nn

from .errors import LayercritError
from .layers import Unit
from .registry import Registry
from .seeding import derive_seed, generator

__all__ = [
    "PROBES",
    "Interpolate",
    "Probe",
    "Reinit",
    "Rerandomize",
    "Zero",
    "create_probe",
    "gaussian_noise",
    "list_probes",
    "substitute",
]

Values = dict[str, torch.Tensor]

PROBES: Registry[Probe] = Registry("probe")


def create_probe(name: str, **kwargs) -> Probe:
    """Build a registered probe: `create_probe("reinit", reference=state_dict)`."""
    return PROBES.create(name, **kwargs)


def list_probes(pattern: str = "*") -> list[str]:
    return PROBES.list(pattern)


@contextlib.contextmanager
def substitute(model: nn.Module, values: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
    """Write `values` into the named parameters (or buffers) of `model`; restore them bit-exactly on exit.

    The originals are saved with `detach().clone()` (a state_dict copy would share storage) and
    copied back in `finally`.
    """
    params = dict(model.named_parameters())
    if any(n not in params for n in values):  # buffers too, for whole-checkpoint evaluations
        params |= dict(model.named_buffers())
    missing = [n for n in values if n not in params]
    if missing:
        raise LayercritError(f"model has no parameter(s) {', '.join(missing)}")
    for n, v in values.items():
        if v.shape != params[n].shape:
            raise LayercritError(f"new value for {n} has shape {tuple(v.shape)}; expected {tuple(params[n].shape)}")
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


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


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


@PROBES.register("rerandomize")
class Rerandomize(Probe):
    """A fresh draw from each layer's own initialization distribution.

    With a `factory` (the model's untrained constructor) the model is built under the trial's seed
    and the unit's parameters are taken from it: the faithful init, also for models whose
    constructor re-initializes layers (torchvision ResNets use Kaiming-normal, not PyTorch's
    default). Without one, each layer is copied and its `reset_parameters()` called under a seed
    derived from the trial seed and the layer name, with a warning. Models are built once per seed.

    Args:
        factory: zero-argument callable returning an untrained model of the same architecture.
    """

    name = "rerandomize"
    random = True

    def __init__(self, factory: Callable[[], nn.Module] | None = None) -> None:
        self.factory = factory
        self._fresh: dict[int, dict[str, torch.Tensor]] = {}
        self._warned = False

    def _fresh_params(self, seed: int) -> dict[str, torch.Tensor]:
        if seed not in self._fresh:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                fresh = self.factory()
            self._fresh[seed] = {n: p.detach() for n, p in fresh.named_parameters()}
        return self._fresh[seed]

    def check(self, model: nn.Module, units: list[Unit]) -> None:
        params = _params(model)
        if self.factory is not None:
            fresh = self._fresh_params(0)
            self._fresh.clear()
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
            return
        for u in units:
            for lname in u.layers:
                module = model.get_submodule(lname)
                if _reset_fn(module) is None:
                    raise LayercritError(
                        f"cannot re-randomize layer {lname!r} ({type(module).__name__}): it has no "
                        "reset_parameters() and no model factory was given; pass the model's constructor as factory"
                    )
        if not self._warned:
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
        for lname in unit.layers:
            module = model.get_submodule(lname)
            reset = _reset_fn(module)
            if reset is None:
                raise LayercritError(f"cannot re-randomize layer {lname!r} ({type(module).__name__}): no reset_parameters()")
            clone = copy.deepcopy(module)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(derive_seed(seed, lname))
                _reset_fn(clone)()
            for pname, p in clone.named_parameters(recurse=False):
                full = f"{lname}.{pname}" if lname else pname
                if full in wanted and prefix_of[full] == lname:
                    out[full] = p.detach()
        return out

    def describe(self) -> dict:
        return {"probe": self.name, "target": self.name, "init_source": "factory" if self.factory else "reset_parameters"}


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
