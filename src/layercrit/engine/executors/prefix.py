"""The block-prefix executor: a probe of block k re-runs only blocks k…L and what follows them.

Transformers (Hugging Face decoders, encoders, ViTs; layercrit's own ViT and Mixer) are a stack of
repeated blocks, each reading the residual stream the previous one wrote. During the unmodified pass
forward hooks keep the output of the blocks before every *boundary* a coming probe starts at (per
batch, never per data set). A probe whose first changed block is k then calls the model as usual,
with blocks 0…k−1 answering at once with the kept output of block k−1: the embeddings are
recomputed (cheap), and everything the model's own forward computes and passes to its blocks —
attention masks, position embeddings, rotary tables — is computed and passed by the model itself,
so nothing a block needs can be dropped. Blocks k…L, the final norm and the head run normally.

No tracing is needed. What is kept counts against `memory_budget`: when the boundaries do not all
fit, every j-th is kept and a probe starts from the nearest kept boundary before its block (it then
recomputes a few unchanged blocks). On the first batch the executor checks that starting from a
kept boundary reproduces the model's output; a model whose blocks are not a plain chain (a block
called twice, outputs read by other than the next block) fails that check and is refused.

Trials by concatenation: the T draws of one unit change block k only, so block k runs once per draw
on the kept input (with the keyword arguments it was called with, kept by a pre-hook) and the T
outputs, concatenated along the batch, run through blocks k+1…L and the head once, at T×B. With
`batch_trials=None` this is timed on CUDA and off on the CPU (where it measured no faster); when the
boundaries are thinned, only blocks whose input boundary is kept are concatenated.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ...data.inputs import call_model, num_samples, take
from ...errors import LayercritError, check_int
from ...units.blocks import find_block_stack
from ..probes import substitute
from .base import DEFAULT_MEMORY_BUDGET, EXECUTORS, Executor, storage_bytes
from .full import FullForward

__all__ = ["PrefixExecutor"]

log = logging.getLogger("layercrit")

Values = Mapping[str, torch.Tensor]
_MISSING = object()
_MAX_CONCAT = 16  # most trials concatenated into one downstream pass


def _first(value) -> torch.Tensor:
    """The residual stream in a block's output: the tensor itself or the first element."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping):
        return _first(next(iter(value.values())))
    raise _NotAChain(f"a block returned {type(value).__name__}; expected a tensor or a tuple starting with one")


def _with_first(value, first: torch.Tensor):
    """`value` with its residual-stream tensor replaced by `first` (same structure)."""
    if isinstance(value, torch.Tensor):
        return first
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return (first, *value[1:])
    if isinstance(value, list):
        return [first, *value[1:]]
    if isinstance(value, Mapping):
        key = next(iter(value))
        out = type(value)(**{**value, key: first}) if hasattr(value, "to_tuple") else {**value, key: first}
        return out
    raise _NotAChain(f"cannot rebuild a block output of type {type(value).__name__}")


def _equal_outputs(a, b, rtol: float = 1e-5) -> tuple[bool, float]:
    """Whether two outputs agree tensor by tensor (up to round-off), and the largest difference."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return False, float("inf")
        if torch.equal(a, b):
            return True, 0.0
        if not a.is_floating_point():
            return False, float("inf")
        diff = float((a.double() - b.double()).abs().max())
        scale = float(b.double().abs().max())
        return diff <= rtol * max(scale, 1.0), diff
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        pairs = [(a[k], b[k]) for k in a if k in b and a[k] is not None]
    elif isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        pairs = list(zip(a, b))
    else:
        return a is b or a == b, 0.0
    results = [_equal_outputs(x, y, rtol) for x, y in pairs]
    return all(ok for ok, _ in results), max((d for _, d in results), default=0.0)


class _NotAChain(LayercritError):
    """The model's blocks are not a plain chain (found on the first batch); `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; use executor 'full'")
        self.reason = reason

class PrefixExecutor(Executor):
    """Re-runs only the blocks from the first changed one onward, from block outputs kept per batch.

    Args:
        model: a model with a stack of repeated blocks (`blocks.find_block_stack`).
        memory_budget: bytes of kept block outputs per batch (default 1 GiB); when the boundaries
            the probes need do not fit, every j-th is kept.
        batch_trials: concatenate the draws of one block along the batch and run the downstream
            blocks once (True/False; None: off on the CPU, on CUDA decided on the first batch by
            timing both ways).
        compile: not supported by this executor (the model runs eagerly); must be False.
        fallback: when the model's blocks turn out not to be a plain chain (checked on the first
            batch), run the full forward instead (with `fallback_reason`) rather than raise.

    Attributes:
        peak_bytes: the most bytes of kept outputs held at once.
        concat_used: whether trials ran concatenated (None until decided).

    Raises:
        LayercritError: the model has no block stack.
    """

    name = "prefix"

    def __init__(self, model: nn.Module, memory_budget: int | None = None, batch_trials: bool | None = None,
                 compile: bool | str = False, fallback: bool = False) -> None:
        super().__init__(model)
        stack = find_block_stack(model)
        if stack is None:
            raise LayercritError(f"executor 'prefix' needs a stack of repeated blocks; found none in "
                                 f"{type(model).__name__} (use executor 'full' or 'auto')")
        if compile:
            raise LayercritError("executor 'prefix' runs the model eagerly; use it without `compile`")

        self.memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
        check_int("memory_budget", self.memory_budget)
        self.batch_trials = batch_trials
        self.stack = stack
        self.block_names = list(stack.names)
        self.blocks = [model.get_submodule(n) for n in self.block_names]
        self.peak_bytes = 0
        self.concat_used: bool | None = batch_trials if batch_trials is not None else None
        self.fallback = fallback
        self.fallback_reason: str | None = None
        self._full: FullForward | None = None
        self._aliases = self._alias_map(model)
        self._keep: list[int] = []  # boundaries kept: b means "the output of block b-1"
        self._concat_blocks: set[int] = set()
        self._batch: dict | None = None
        self._validated = False
        self._per_boundary: float | None = None

    # -- planning ---------------------------------------------------------------------------------

    @staticmethod
    def _alias_map(model: nn.Module) -> dict[str, list[str]]:
        by_id: dict[int, list[str]] = {}
        named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
        for n, t in named:
            by_id.setdefault(id(t), []).append(n)
        return {n: by_id[id(t)] for n, t in named}

    def _position(self, path: str) -> int:
        """Index of the first block whose output a change at `path` (a parameter or module) alters:
        its block, len(blocks) for the head after the stack, 0 for anything else (embeddings, or
        unknown: the whole forward)."""
        i = self.stack.block_of(path)
        if i is not None:
            return i
        for h in self.stack.head:
            if path == h or path.startswith(h + "."):
                return len(self.blocks)
        return 0

    def start(self, values: Values) -> int:
        """The first block a change affects (0: the full forward is needed)."""
        positions = [self._position(a) for n in values for a in self._aliases.get(n, [n])]
        positions += [self._position(m) for m in getattr(values, "skip", ())]
        return min(positions, default=len(self.blocks))

    def _only_block(self, values: Values) -> int | None:
        """The block index if every change lies inside that one block (trials can be concatenated)."""
        positions = {self._position(a) for n in values for a in self._aliases.get(n, [n])}
        positions |= {self._position(m) for m in getattr(values, "skip", ())}
        if len(positions) == 1:
            (k,) = positions
            if k < len(self.blocks) and self._in_block(values, k):
                return k
        return None

    def _in_block(self, values: Values, k: int) -> bool:
        b = self.block_names[k]
        paths = [a for n in values for a in self._aliases.get(n, [n])] + list(getattr(values, "skip", ()))
        return all(p == b or p.startswith(b + ".") for p in paths)

    def prepare(self, perturbations: Sequence[Values]) -> None:
        if self.batch_trials is None and self.concat_used is None and not self._on_cuda():
            # On the CPU the concatenated pass does the same arithmetic in larger tensors and measured
            # slower (benchmarks/bench_prefix.py); on CUDA it fills the device and is timed per run.
            self.concat_used = False
        self._keep = sorted({self.start(v) for v in perturbations} - {0})
        # Blocks whose inputs (and keyword arguments) are kept for concatenated trials.
        self._concat_blocks = set() if self.concat_used is False else {
            k for k in (self._only_block(v) for v in perturbations) if k is not None}

    def _on_cuda(self) -> bool:
        first = next(self.model.parameters(), None)
        return first is not None and first.device.type == "cuda"

    def _thin(self, boundaries: list[int], per: float) -> list[int]:
        """The boundaries that fit the budget: all, or every j-th (the last one always)."""
        if per <= 0 or len(boundaries) * per <= self.memory_budget:
            return boundaries
        fit = int(self.memory_budget // per)
        if fit < 1:
            log.warning("layercrit: memory_budget %d is smaller than one block output of this batch (%d bytes); "
                        "keeping none (full forward)", self.memory_budget, int(per))
            return []
        step = -(-len(boundaries) // fit)
        return boundaries[::-1][::step][::-1]

    # -- per batch --------------------------------------------------------------------------------

    def start_batch(self, x):
        if self._full is not None:
            return self._full.start_batch(x)
        try:
            return self._start_batch(x)
        except _NotAChain as e:
            if not self.fallback:
                raise
            self.fallback_reason = e.reason
            self._full = FullForward(self.model)
            self._batch = None
            log.warning("layercrit: %s runs with the full forward: %s", type(self.model).__name__, self.fallback_reason)
            return self._full.start_batch(x)

    def _start_batch(self, x):
        kept: dict[int, object] = {}
        inputs: dict[int, tuple] = {}
        calls = [0] * len(self.blocks)
        handles = []
        wanted = set(self._keep)

        def keep_output(i):
            def hook(module, args, output):
                calls[i] += 1
                if i + 1 in wanted:
                    kept[i + 1] = output
            return hook

        def keep_input(i):
            def hook(module, args, kwargs):
                inputs[i] = (args, kwargs)
            return hook

        try:
            for i, block in enumerate(self.blocks):
                handles.append(block.register_forward_hook(keep_output(i)))
                if i in self._concat_blocks:
                    handles.append(block.register_forward_pre_hook(keep_input(i), with_kwargs=True))
            out = call_model(self.model, x)
        finally:
            for h in handles:
                h.remove()
        if any(c != 1 for c in calls):
            raise _NotAChain(
                f"executor 'prefix' needs every block called once per forward; {type(self.model).__name__} calls "
                f"{self.block_names[next(i for i, c in enumerate(calls) if c != 1)]} {max(calls)} times")
        rows = num_samples(x)
        if kept:
            per = max(storage_bytes([v]) for v in kept.values())
            keep = set(self._thin(sorted(kept), per))
            if len(keep) < len(kept):  # thinned: a kept block input would hold its dropped boundary alive
                inputs = {k: v for k, v in inputs.items() if k in keep}
            kept = {b: v for b, v in kept.items() if b in keep}
        self.peak_bytes = max(self.peak_bytes, storage_bytes([list(kept.values()), list(inputs.values())]))
        self._batch = {"x": x, "out": out, "kept": kept, "inputs": inputs, "rows": rows}
        if not self._validated:
            self._validate()
        return out

    @property
    def batches_outputs(self) -> bool:
        """Whether `run_many` computes several outputs together (concatenated trials): otherwise the
        engine asks for one output at a time, and holds one."""
        return self._full is None and self.concat_used is not False

    def _validate(self) -> None:
        """Starting from a kept boundary must reproduce the model's output (a plain chain of blocks).

        The last kept boundary: the check costs the fewest blocks there, and the most blocks answer
        with a kept output, so a block output read elsewhere than by the next block is the likeliest
        to show."""
        self._validated = True
        kept = self._batch["kept"]
        if not kept:
            return
        b = max(kept)
        with self._patched(b, kept[b]):
            again = call_model(self.model, self._batch["x"])
        ok, diff = _equal_outputs(again, self._batch["out"])
        if not ok:
            raise _NotAChain(
                f"executor 'prefix' cannot run {type(self.model).__name__}: starting at block {b} changes the output "
                f"by {diff:.3g} (its blocks are not a plain chain)")

    @contextlib.contextmanager
    def _patched(self, boundary: int, value) -> Iterator[None]:
        """Blocks 0…boundary−1 answer with `value` (the kept output of block boundary−1) at once."""
        saved = [b.__dict__.get("forward", _MISSING) for b in self.blocks[:boundary]]

        def kept_output(*args, **kwargs):
            return value

        try:
            for b in self.blocks[:boundary]:
                b.forward = kept_output
            yield
        finally:
            for b, s in zip(self.blocks[:boundary], saved):
                if s is _MISSING:
                    del b.forward
                else:
                    b.forward = s

    def _boundary(self, k: int) -> int:
        """The largest kept boundary ≤ k (0: none, run everything)."""
        return max((b for b in self._batch["kept"] if b <= k), default=0)

    def run(self, values: Values):
        if self._full is not None:
            return self._full.run(values)
        batch = self._batch
        b = self._boundary(self.start(values))
        with substitute(self.model, values):
            if b == 0:
                return call_model(self.model, batch["x"])
            with self._patched(b, batch["kept"][b]):
                return call_model(self.model, batch["x"])

    def run_many(self, perturbations: Sequence[Values]) -> list:
        if self._full is not None:
            return self._full.run_many(perturbations)
        if self.concat_used is False or len(perturbations) < 2:
            return [self.run(v) for v in perturbations]
        out: list = [None] * len(perturbations)
        groups: dict[tuple, list[int]] = {}
        for i, v in enumerate(perturbations):
            k = self._only_block(v)
            if k is not None and k in self._batch["inputs"] and k + 1 <= len(self.blocks):
                groups.setdefault((k, frozenset(v), frozenset(getattr(v, "skip", ()))), []).append(i)
            else:
                out[i] = self.run(v)
        for (k, _, _), idx in groups.items():
            if len(idx) == 1:
                out[idx[0]] = self.run(perturbations[idx[0]])
                continue
            if self.concat_used is None:
                if len(idx) < 3:  # too few draws to time both ways without running one twice
                    for i in idx:
                        out[i] = self.run(perturbations[i])
                    continue
                self.concat_used = self._decide(k, idx, perturbations, out)
                self._run_group(k, idx[1 + _MAX_CONCAT :], perturbations, out)
                continue
            self._run_group(k, idx, perturbations, out)
        return out

    def _run_group(self, k: int, idx: list[int], perturbations: Sequence[Values], out: list) -> None:
        """The draws `idx` of block k into `out`, concatenated or one by one as decided."""
        if not self.concat_used:
            for i in idx:
                out[i] = self.run(perturbations[i])
            return
        for s in range(0, len(idx), _MAX_CONCAT):
            part = idx[s : s + _MAX_CONCAT]
            for i, q in zip(part, self._concat(k, [perturbations[i] for i in part])):
                out[i] = q

    def _decide(self, k: int, idx: list[int], perturbations: Sequence[Values], out: list) -> bool:
        """Whether concatenating is faster, timed on the first group without computing any draw twice:
        its first draw runs alone, the others concatenated; every output is kept in `out`."""
        t0 = time.perf_counter()
        out[idx[0]] = self.run(perturbations[idx[0]])
        one = time.perf_counter() - t0
        rest = idx[1 : 1 + _MAX_CONCAT]
        t0 = time.perf_counter()
        for i, q in zip(rest, self._concat(k, [perturbations[i] for i in rest])):
            out[i] = q
        both = (time.perf_counter() - t0) / len(rest)
        log.info("layercrit: prefix executor, one draw alone %.3f s, concatenated %.3f s per draw", one, both)
        return both < one

    def _concat(self, k: int, group: list[Values]) -> list:
        """The outputs of `group` (changes inside block k only), downstream blocks run once at T×B."""
        batch = self._batch
        args, kwargs = batch["inputs"][k]
        outs = []
        for v in group:
            with substitute(self.model, v):
                outs.append(self.blocks[k](*args, **kwargs))
        stream = torch.cat([_first(o) for o in outs], dim=0)
        joined = _with_first(outs[0], stream)
        rows, parts = batch["rows"], len(group)
        x = take(batch["x"], torch.arange(rows).repeat(parts))
        with self._patched(k + 1, joined):
            out = call_model(self.model, x)
        return [take(out, slice(i * rows, (i + 1) * rows), n=parts * rows) for i in range(parts)]

    def end_batch(self) -> None:
        if self._full is not None:
            self._full.end_batch()
        self._batch = None


EXECUTORS.register("prefix")(PrefixExecutor)
