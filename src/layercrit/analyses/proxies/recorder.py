"""Hooks that stream each block's input and output residual stream into float64 sums (never the
whole activations), and the cache of block inputs that lets skip/reset probes re-run only blocks k…L."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from ...errors import LayercritError
from .similarity import EPS, _masked, _tokens, _valid, cosine, last_positions, sample_means


def _stream_in(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The residual stream a block is called with: its first positional tensor, else `hidden_states`
    (or the first tensor) among its keyword arguments."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "hidden_state"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _stream_out(value) -> torch.Tensor | None:
    """The residual stream in a block's output: the tensor itself, or the first element of a tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping) and value:
        return _stream_out(next(iter(value.values())))
    return None


class _Sums:
    """Per-sample values of named quantities, collected batch by batch (concatenated at the end)."""

    def __init__(self) -> None:
        self.parts: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, key: tuple, values: torch.Tensor, weights: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append((values.detach().double().cpu(), weights.detach().double().cpu()))

    def get(self, key: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        if key not in self.parts:
            return None
        v, w = zip(*self.parts[key])
        return torch.cat(v).numpy(), torch.cat(w).numpy()


class _Recorder:
    """Forward (pre-)hooks on the blocks computing the proxies of one unmodified batch as it runs.

    Only the inputs of the last `max_n` blocks are held at once (for the angular distance over n
    blocks); every handle is removed on exit, also after an error.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], max_n: int, sums: _Sums) -> None:
        self.model, self.names, self.max_n, self.sums = model, list(names), max_n, sums
        self.notes: dict[tuple, str] = {}
        self.shapes: dict[str, tuple[tuple, tuple]] = {}
        self.active = False
        self.mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}  # float64 (B, T, D) streams entering the blocks
        self._shapes_in: dict[int, tuple] = {}  # their shapes as the blocks got them
        self._calls: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> _Recorder:
        try:
            for i, name in enumerate(self.names):
                block = self.model.get_submodule(name)
                self._handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._post(i)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()

    def start(self, mask: torch.Tensor | None) -> None:
        self.active, self.mask = True, mask
        self._inputs.clear()
        self._calls.clear()

    def stop(self) -> None:
        self.active = False
        self._inputs.clear()
        missing = [self.names[i] for i in range(len(self.names)) if i not in self._calls]
        if missing:
            raise LayercritError(f"block {missing[0]} did not run in the model's forward; proxies need every block of the stack")

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            self._calls[i] = self._calls.get(i, 0) + 1
            if self._calls[i] > 1:
                raise LayercritError(f"block {self.names[i]} runs more than once per forward (shared weights?); "
                                     "proxies need a chain of blocks that each run once")
            x = _stream_in(args, kwargs)
            if x is None:
                raise LayercritError(f"block {self.names[i]} was called without a tensor input")
            # A float64 copy: a block may change its input in place (ReLU(inplace=True), +=) and
            # the input of block i is needed until block i + max_n − 1 has run.
            self._inputs[i] = _tokens(x).clone() if x.dtype == torch.float64 else _tokens(x)
            self._shapes_in[i] = tuple(x.shape)
            return None

        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            if not self.active:
                return None
            out = _stream_out(output)
            if out is None:
                raise LayercritError(f"block {self.names[i]} returned {type(output).__name__}; expected a tensor "
                                     "or a tuple starting with one")
            self._measure(i, out.detach())
            for j in [j for j in self._inputs if j <= i - self.max_n + 1]:
                del self._inputs[j]  # no longer needed by any span
            if i == len(self.names) - 1:
                self.active = False  # one forward recorded (an executor may run the model again, e.g. to check itself)
            return None

        return hook

    def _mask_for(self, shape: tuple) -> torch.Tensor | None:
        """The attention mask, for (B, T, D) streams whose (B, T) it fits (not for image maps)."""
        m = self.mask
        return m if m is not None and len(shape) == 3 and tuple(shape[:2]) == tuple(m.shape) else None

    def _measure(self, i: int, out: torch.Tensor) -> None:
        """The proxies of block i and of the spans ending at it. Each pair of streams is converted to
        float64 once and its cosine computed once: BI, both angular distances and the relative L2
        change share it."""
        name = self.names[i]
        shape_in = self._shapes_in[i]
        self.shapes[name] = (shape_in[1:], tuple(out.shape[1:]))
        b = _tokens(out)
        for n in range(1, self.max_n + 1):
            j = i - n + 1
            if j < 0:
                break
            first, a, shape_a = self.names[j], self._inputs[j], self._shapes_in[j]
            if shape_a != tuple(out.shape):
                note = f"the stream entering {first} {shape_a[1:]} and leaving {name} {tuple(out.shape[1:])} differ in shape"
                self.notes[(first, "angular", n)] = note
                if n == 1:
                    self.notes[(name, "bi", 1)] = self.notes[(name, "relative_l2", 1)] = note
                continue
            valid = _valid(self._mask_for(shape_a), a)
            cos = cosine(a, b)
            if n == 1:
                self.sums.add((name, "bi", 1), *sample_means(_masked(1.0 - cos, valid)))
                rel = (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(EPS)
                self.sums.add((name, "relative_l2", 1), *sample_means(_masked(rel, valid)))
            angle = torch.arccos(cos) / math.pi
            self.sums.add((first, "angular_all", n), *sample_means(_masked(angle, valid)))
            last = angle[torch.arange(len(angle), device=angle.device), last_positions(valid)]
            self.sums.add((first, "angular_last", n), last, torch.ones_like(last))


class _ValuesCache:
    """A probe's values of each (block, trial), drawn once and reused by every batch while they fit."""

    BUDGET = 512 << 20  # bytes

    def __init__(self) -> None:
        self.values: dict[tuple, Mapping[str, torch.Tensor]] = {}
        self.bytes = 0

    def get(self, probe, model: nn.Module, unit, seed: int) -> Mapping[str, torch.Tensor]:
        key = (id(probe), unit.name, seed)
        if key in self.values:
            return self.values[key]
        values = probe.values(model, unit, seed)
        size = sum(v.numel() * v.element_size() for v in values.values())
        if self.bytes + size <= self.BUDGET:
            self.values[key] = values
            self.bytes += size
        return values
