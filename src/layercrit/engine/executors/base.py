"""The executor interface (`Executor`: prepare, start_batch, run_many, end_batch), its registry
`EXECUTORS`, and what every executor shares: evaluation mode, compilation, memory accounting."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ..._utils.registry import Registry
from ...data.inputs import (
    Inputs,
)

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of kept frontier values (and stacked trials) per batch: 1 GiB


def storage_bytes(values: Iterable) -> int:
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


def numel_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(numel_bytes(u) for u in v)
    return 0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and restore each one's own training flag afterwards."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


class Executor:
    """How the model is run on one batch, unmodified and with substituted parameters.

    Subclasses may keep per-batch state between `start_batch` and `end_batch` (never per data set).
    """

    name = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def prepare(self, perturbations: Sequence[Mapping[str, torch.Tensor]]) -> None:
        """Announce the substitutions that `run_many` will get for every batch of the coming pass
        (so an executor can keep what they need while running the unmodified model)."""

    def start_batch(self, x: Inputs) -> object:
        """Run the unmodified model on `x` (a tensor or a dict of tensors, see `inputs`); return its
        raw output (a tensor, tuple or `ModelOutput`: the engine's output adapter reads it)."""
        raise NotImplementedError

    def run(self, values: Mapping[str, torch.Tensor]) -> object:
        """The raw output on the current batch with `values` substituted."""
        raise NotImplementedError

    def run_many(self, perturbations: Sequence[Mapping[str, torch.Tensor]]) -> list:
        """Raw outputs for several substitutions (override to batch them)."""
        return [self.run(v) for v in perturbations]

    def end_batch(self) -> None:
        """Drop per-batch state."""


EXECUTORS: Registry[Executor] = Registry("executor")


def compiled(fn: Callable, compile: bool | str) -> Callable:
    """`fn` itself, or `torch.compile(fn)` (True: the default backend; a string: that backend)."""
    if compile is False:
        return fn
    return torch.compile(fn) if compile is True else torch.compile(fn, backend=compile)


def first_line(e: BaseException, with_type: bool = False) -> str:
    """The first line of an exception's message for a one-line report (`with_type`: prefixed by
    the exception's class name, for errors raised by other libraries); the class name if empty."""
    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    return f"{type(e).__name__}: {text[0]}" if with_type else text[0]
