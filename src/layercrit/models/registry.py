"""Model registry and factory specs: `create_model("fcn-3x256")`, `module:callable`, `file.py:callable`,
the libraries' own constructors, `torchvision:NAME` and `timm:NAME`, and pretrained Hugging Face
models, `hf:PATH` (a local folder or a .gguf file; see `models.hf`)."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.nn as nn

from .._utils.registry import Registry
from ..errors import LayercritError

__all__ = ["MODELS", "ModelFactory", "create_model", "factory_for_data", "list_models", "register_model", "resolve_factory"]

MODELS: Registry[nn.Module] = Registry("model")


def register_model(name: str | None = None):
    """Register a model constructor; its keyword arguments are the model's configuration."""
    return MODELS.register(name)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the built-in models, optionally filtered by a glob."""
    return MODELS.list(pattern)


@dataclass
class ModelFactory:
    """A callable that builds an untrained model: the model's own init source.

    Attributes:
        spec: the spec it was made from (a registry name, `module:callable` or `file.py:callable`).
        fn: the constructor.
        kwargs: keyword arguments it is called with.
        builtin: whether `spec` names a registered model.
        pretrained: builds the model with its own trained weights, where the spec names them
            (`hf:PATH`); calling the factory still builds it untrained.
    """

    spec: str
    fn: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    builtin: bool = False
    pretrained: Callable[[], nn.Module] | None = None

    def __call__(self) -> nn.Module:
        try:
            model = self.fn(**self.kwargs)
        except TypeError as e:
            raise LayercritError(f"model factory {self.spec!r} rejected its arguments {self.kwargs}: {e}") from None
        except LayercritError:
            raise
        except Exception as e:  # the user's constructor failed: say so, without our traceback
            raise LayercritError(f"model factory {self.spec!r} raised {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise LayercritError(
                f"model factory {self.spec!r} returned {type(model).__name__}; expected a torch.nn.Module"
            )
        return model

    def accepts(self, name: str) -> bool:
        """Whether the constructor takes keyword `name` (used to fill in data-derived sizes)."""
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return False
        return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _load_file_module(path: Path):
    # One module object per file: importing twice would create two distinct classes.
    key = "layercrit_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise LayercritError(f"cannot import {str(path)!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[key]
        raise LayercritError(f"importing {str(path)!r} failed: {type(e).__name__}: {e}") from None
    return module


def _torchvision(name: str) -> Callable[..., nn.Module]:
    import torchvision.models

    if name not in torchvision.models.list_models():
        raise _unknown("torchvision", name, torchvision.models.list_models())

    def build(**kwargs: Any) -> nn.Module:
        # No `weights`: the untrained model, initialized as torchvision initializes it.
        return torchvision.models.get_model(name, **kwargs)

    return build


def _timm(name: str) -> Callable[..., nn.Module]:
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())

    def build(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, **({"pretrained": False} | kwargs))

    return build


_LIBRARIES: dict[str, Callable[[str], Callable[..., nn.Module]]] = {"torchvision": _torchvision, "timm": _timm}


def _unknown(library: str, name: str, names: list[str]) -> LayercritError:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return LayercritError(f"{library} has no model {name!r}{hint} (see {library}'s list_models())")


def _library_factory(spec: str, kwargs: dict[str, Any]) -> ModelFactory:
    """`torchvision:NAME` / `timm:NAME`: the library's constructor without pretrained weights, so
    that `rerandomize` draws from the library's own initialization."""
    library, _, name = spec.partition(":")
    if not name:
        raise LayercritError(f"model spec {spec!r} names no model; expected '{library}:NAME', e.g. '{library}:resnet50'")
    try:
        fn = _LIBRARIES[library](name)
    except ImportError as e:
        raise LayercritError(f"model spec {spec!r} needs {library}, which cannot be imported ({e}); "
                             "install it with `pip install layercrit[vision]`") from None
    return ModelFactory(spec, fn, kwargs)


def _hf_factory(spec: str, kwargs: dict[str, Any]) -> ModelFactory:
    """`hf:PATH`: the untrained architecture from PATH's config; `pretrained` loads its weights."""
    from .hf import hf_source

    path = spec[len("hf:"):]
    if not path:
        raise LayercritError(f"model spec {spec!r} names no path; expected 'hf:PATH' (a Hugging Face model folder or a .gguf file)")
    source = hf_source(path, **kwargs)

    def build(**options: Any) -> nn.Module:
        return hf_source(path, **options).build()

    return ModelFactory(spec, build, kwargs, pretrained=source.load)


def resolve_factory(spec: str, **kwargs: Any) -> ModelFactory:
    """Turn a model spec into a factory.

    Args:
        spec: a registered name (see `list_models()`), `torchvision:NAME` or `timm:NAME` (the
            library's constructor, untrained), `hf:PATH` (a local Hugging Face folder or .gguf file:
            the factory builds its architecture from the config, `.pretrained()` loads its weights),
            `package.module:callable`, or `path/to/file.py:callable`.
        **kwargs: keyword arguments for the constructor (e.g. `num_classes`; for `hf:`, `task`).
    """
    if spec.startswith("hf:"):
        return _hf_factory(spec, dict(kwargs))
    if spec in MODELS:
        return ModelFactory(spec, MODELS.get(spec), dict(kwargs), builtin=True)
    if spec.partition(":")[0] in _LIBRARIES:
        return _library_factory(spec, dict(kwargs))
    if ":" not in spec:
        raise LayercritError(
            f"unknown model {spec!r}; expected a built-in name ({', '.join(list_models())}), 'torchvision:NAME', "
            "'timm:NAME', 'hf:PATH', 'package.module:callable' or 'path/to/file.py:callable'"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise LayercritError(f"model spec {spec!r} is incomplete; expected 'module:callable' or 'file.py:callable'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise LayercritError(f"model file {target!r} does not exist (from model spec {spec!r})")
        module = _load_file_module(path)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise LayercritError(f"cannot import module {target!r} for model spec {spec!r}: {e}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise LayercritError(f"{target!r} has no callable {attr!r} (from model spec {spec!r})")
    return ModelFactory(spec, fn, dict(kwargs))


def create_model(spec: str, **kwargs: Any) -> nn.Module:
    """Build a model from a registry name or a factory spec: untrained, except for a spec that names
    trained weights (`hf:PATH`), which it has."""
    factory = resolve_factory(spec, **kwargs)
    return factory.pretrained() if factory.pretrained is not None else factory()


def factory_for_data(spec: str, kwargs: dict[str, Any] | None, num_classes: int | None, input_shape: tuple[int, ...] | None) -> ModelFactory:
    """Factory for `spec`; built-in models get `num_classes`/`input_shape` from the data unless given.

    User factories receive only the keyword arguments given explicitly.
    """
    factory = resolve_factory(spec, **(kwargs or {}))
    if factory.builtin:
        if num_classes is not None and "num_classes" not in factory.kwargs and factory.accepts("num_classes"):
            factory.kwargs["num_classes"] = int(num_classes)
        if input_shape is not None and "input_shape" not in factory.kwargs and factory.accepts("input_shape"):
            factory.kwargs["input_shape"] = tuple(int(s) for s in input_shape)
    return factory
