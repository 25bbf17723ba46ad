"""A small name -> constructor registry, the shape shared by probes, measures and models."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable
from typing import Generic, TypeVar

from ..errors import LayercritError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors, with a `create`/`list` pair (timm's `create_model` shape).

    Args:
        kind: what is registered ("probe", "model", ...), used in messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a constructor under `name` (default: its `__name__`)."""

        def deco(fn: Callable[..., T]) -> Callable[..., T]:
            key = name or fn.__name__
            if key in self._entries:
                warnings.warn(f"{self.kind} {key!r} registered twice; the later one wins", stacklevel=2)
            self._entries[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            raise LayercritError(
                f"unknown {self.kind} {name!r}; expected one of: {', '.join(self.list())}"
            ) from None

    def create(self, name: str, **kwargs) -> T:
        return self.get(name)(**kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatchcase(n, pattern))

    def __contains__(self, name: object) -> bool:
        return name in self._entries
