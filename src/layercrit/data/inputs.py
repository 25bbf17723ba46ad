"""Model inputs: one tensor, or several named tensors passed as keyword arguments.

A batch of inputs is either a `Tensor` (N, ...) — an image batch, say — or a `dict[str, Tensor]`
whose values share the first dimension N, such as `{"input_ids": int64 (N, T), "attention_mask":
(N, T)}` for a Hugging Face model. Integer dtypes are kept everywhere: token ids must reach the
embedding as integers. The functions here are what the engine, the executors and the data loaders
use instead of `len(x)`, `x[i:j]`, `x.to(device)` and `model(x)`, so that both forms work alike.
`take` and `concat` also walk model outputs (tuples, dicts, Hugging Face `ModelOutput`s).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..errors import LayercritError

__all__ = [
    "Inputs",
    "as_inputs",
    "attention_mask",
    "call_model",
    "concat",
    "describe",
    "main_tensor",
    "nbytes",
    "num_samples",
    "sample_shape",
    "take",
    "to_device",
    "token_ids",
]

Inputs = torch.Tensor | dict[str, torch.Tensor]

# The keyword names Hugging Face models take their main input under, most specific first.
_MAIN_KEYS = ("input_ids", "pixel_values", "input_values", "input_features", "inputs_embeds")


def as_inputs(x: object, what: str = "inputs") -> Inputs:
    """`x` checked to be a tensor with a sample dimension, or a non-empty mapping of such tensors
    with the same number of samples (returned as a plain dict)."""
    if isinstance(x, torch.Tensor):
        if x.ndim == 0:
            raise LayercritError(f"{what} are a 0-d tensor; expected a batch of shape (N, ...)")
        return x
    if isinstance(x, Mapping):
        if not x:
            raise LayercritError(f"{what} are an empty dict; expected named tensors such as {{'input_ids': ...}}")
        bad = [str(k) for k, v in x.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.ndim == 0]
        if bad:
            raise LayercritError(f"{what}: entries {', '.join(bad)} are not named tensors of shape (N, ...)")
        sizes = {k: len(v) for k, v in x.items()}
        if len(set(sizes.values())) > 1:
            raise LayercritError(f"{what} have different numbers of samples: {sizes}")
        return dict(x)
    raise LayercritError(f"Expected {what} as a tensor or a dict of tensors, got {type(x).__name__}")


def num_samples(x: Inputs) -> int:
    """N, the number of samples (the first dimension)."""
    return len(next(iter(x.values()))) if isinstance(x, Mapping) else len(x)


def _rebuild(like: object, items: dict | list) -> object:
    """A container of `like`'s type holding `items` (dicts, Hugging Face `ModelOutput`s, tuples, named tuples)."""
    if isinstance(like, Mapping):
        return items if type(like) is dict else type(like)(**items)
    if isinstance(like, tuple) and hasattr(like, "_fields"):
        return type(like)(*items)
    return type(like)(items)


def take(x: object, index: slice | torch.Tensor | np.ndarray | Sequence[int], n: int | None = None) -> object:
    """The samples `index` of `x`: a tensor, a dict of tensors, or a model output (nested tuples,
    dicts, `ModelOutput`s). Tensors whose first dimension is not the sample count `n` (default: that
    of the first tensor met) and non-tensor leaves are passed through unchanged."""
    if isinstance(index, np.ndarray) or (isinstance(index, Sequence) and not isinstance(index, slice)):
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
    if n is None:
        first = _first_tensor(x)
        n = len(first) if first is not None and first.ndim else -1

    def visit(v):
        if isinstance(v, torch.Tensor):
            if v.ndim == 0 or len(v) != n:
                return v
            return v[index if not isinstance(index, torch.Tensor) else index.to(v.device)]
        if isinstance(v, Mapping):
            return _rebuild(v, {k: visit(u) for k, u in v.items()})
        if isinstance(v, (tuple, list)):
            return _rebuild(v, [visit(u) for u in v])
        return v

    return visit(x)


def concat(parts: Sequence[object]) -> object:
    """The inverse of splitting by `take`: tensors of the same place in each part concatenated along
    the sample dimension (0-d tensors and other leaves come from the first part)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, torch.Tensor):
        return torch.cat(list(parts)) if first.ndim else first
    if isinstance(first, Mapping):
        return _rebuild(first, {k: concat([p[k] for p in parts]) for k in first.keys()})
    if isinstance(first, (tuple, list)):
        return _rebuild(first, [concat([p[i] for p in parts]) for i in range(len(first))])
    return first


def _first_tensor(x: object) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    values = x.values() if isinstance(x, Mapping) else x if isinstance(x, (tuple, list)) else ()
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def to_device(x: Inputs, device: torch.device | str, non_blocking: bool = False) -> Inputs:
    """`x` on `device` (every tensor of a dict)."""
    if isinstance(x, Mapping):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in x.items()}
    return x.to(device, non_blocking=non_blocking)


def nbytes(x: Inputs) -> int:
    """Bytes of the tensor(s)."""
    tensors = x.values() if isinstance(x, Mapping) else [x]
    return sum(t.numel() * t.element_size() for t in tensors)


def main_tensor(x: Inputs) -> torch.Tensor:
    """The tensor that defines a sample's shape: `x` itself, or of a dict `input_ids` (or
    `pixel_values`, …; else the first entry)."""
    if not isinstance(x, Mapping):
        return x
    for key in _MAIN_KEYS:
        if key in x:
            return x[key]
    return next(iter(x.values()))


def sample_shape(x: Inputs) -> tuple[int, ...]:
    """The shape of one sample of the main tensor (see `main_tensor`)."""
    return tuple(main_tensor(x).shape[1:])


def token_ids(x: Inputs) -> torch.Tensor | None:
    """The token ids in `x`: `input_ids` of a dict, or `x` itself when it is an integer tensor."""
    t = x.get("input_ids") if isinstance(x, Mapping) else x
    if t is None or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        return None
    return t


def attention_mask(x: Inputs) -> torch.Tensor | None:
    """`attention_mask` of a dict of inputs (1 = a real token, 0 = padding), else None."""
    return x.get("attention_mask") if isinstance(x, Mapping) else None


def describe(x: Inputs) -> str:
    """Per-sample shapes and dtypes, for messages: `(3, 32, 32) float32` or
    `input_ids (16,) int64, attention_mask (16,) int64`."""

    def one(t: torch.Tensor) -> str:
        return f"{tuple(t.shape[1:])} {str(t.dtype).removeprefix('torch.')}"

    if isinstance(x, Mapping):
        return ", ".join(f"{k} {one(v)}" for k, v in x.items())
    return one(x)


@functools.cache
def _takes_use_cache(cls: type) -> bool:
    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def call_model(model: nn.Module, x: Inputs, forward=None):
    """`model(**x)` for a dict of inputs, `model(x)` otherwise; models whose `forward` takes
    `use_cache` (Hugging Face decoders) get `use_cache=False`: the engine never generates, and a
    key/value cache would only cost memory. `forward` replaces the call (e.g. a compiled model)."""
    fn = forward if forward is not None else model
    extra = {"use_cache": False} if _takes_use_cache(type(model)) else {}
    if isinstance(x, Mapping):
        return fn(**x, **extra)
    return fn(x, **extra)
