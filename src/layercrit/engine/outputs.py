"""Output adapters: what of a model's raw output the measures compare, and which rows are samples.

Executors return the model's raw output (a tensor, a tuple, a Hugging Face `ModelOutput` …). An
adapter turns the unmodified output and every probed output of one batch into rows of the same
width that `measures.sample_measures` compares row by row:

- `logits`: (batch, classes) logits — a tensor, `.logits`, or the first tensor of a tuple. One
  row per sample, softmax measures, labels are class indices.
- `next-token`: (B, T, V) logits of a causal language model. Every non-padded position (by
  `attention_mask`) is a row: measures are means over all those tokens. `next-token:last` takes
  only each sequence's last non-padded position, `next-token:every:K` every K-th non-padded
  position (the K-th, 2K-th, …). Labels are the shifted input ids: position t is scored on
  `input_ids[t+1]`; a position whose next token is padding or past the end has no label (so the
  label measures average over one token fewer per sequence than the others). Data with (N, T)
  `labels` (the Hugging Face convention: aligned with `input_ids`, −100 = ignored) uses them,
  shifted the same way; (N,) labels fit `next-token:last` only (the token expected next).
- `hidden[:mean|:cls|:last]`: raw vectors of a model without a head — `.last_hidden_state`, or a
  (B, T, D) / (B, D) tensor — pooled per sequence by a masked mean (default), the first or the last
  non-padded position. Compared as vectors: criticality = 1 − cos(p, q), `rel_l2` = ‖p − q‖/‖p‖,
  `l1`/`l2` their distances; no softmax, and no label measures.

`choose_output` picks the adapter where the output makes it unambiguous, and says why.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn

from .._utils.registry import Registry
from ..data.inputs import (
    Inputs,
    attention_mask,
    token_ids,
)
from ..errors import LayercritError, check_int

__all__ = ["OUTPUTS", "Hidden", "Logits", "NextToken", "OutputAdapter", "Rows", "choose_output", "create_output",
           "list_outputs"]

IGNORE = -100  # label of a row without one (the Hugging Face / PyTorch ignore index)

OUTPUTS: Registry[OutputAdapter] = Registry("output")


@dataclass
class Rows:
    """Which rows of one batch's flattened output are compared, with their labels.

    Attributes:
        index: positions in the (R, C) values of the selected rows (None: every row, in order).
        labels: one label per selected row (IGNORE: none), or None when there are no labels.
        mask: the batch's (B, T) mask of real positions, for adapters that pool over positions.
    """

    index: torch.Tensor | None
    labels: torch.Tensor | None
    mask: torch.Tensor | None = None


def _fields(out: object) -> str:
    if isinstance(out, Mapping):
        return ", ".join(str(k) for k in out.keys()) or "none"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return type(out).__name__


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _logits_tensor(out: object) -> torch.Tensor | None:
    """`out` itself, `out.logits`, or the first tensor of a tuple; None when there is none."""
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _hidden_tensor(out: object) -> torch.Tensor | None:
    """`out.last_hidden_state`, `out` itself, or the first tensor of a tuple."""
    if isinstance(out, torch.Tensor):
        return out
    hidden = out.get("last_hidden_state") if isinstance(out, Mapping) else getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) and not isinstance(out, Mapping):
        return out[0]
    return None


def _has(out: object, name: str) -> bool:
    value = out.get(name) if isinstance(out, Mapping) else getattr(out, name, None)
    return isinstance(value, torch.Tensor)


def _mask(x: Inputs, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """The (B, T) 0/1 attention mask of `x` as bool (all True when `x` has none)."""
    m = attention_mask(x)
    if m is None or tuple(m.shape) != (batch, length):
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    return m.to(device) != 0


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last True (−1 for a row without any)."""
    t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, t, -1).amax(1)


def _first_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's first True (T for a row without any)."""
    length = mask.shape[1]
    t = torch.arange(length, device=mask.device).expand_as(mask)
    return torch.where(mask, t, length).amin(1)


# Every adapter name (K: a positive integer); `hidden` alone means `hidden:mean`.
NAMES = ("logits", "next-token", "next-token:last", "next-token:every:K", "hidden:mean", "hidden:cls", "hidden:last")


def _choices() -> str:
    return ", ".join(NAMES)


class OutputAdapter:
    """Turns a raw model output into the rows measures compare (see the module docstring).

    Attributes:
        name: the adapter as written in configs (`next-token:every:4`, `hidden:mean`).
        softmax: compare softmax distributions (True) or raw vectors (False).
    """

    name = ""
    softmax = True

    def values(self, out: object, rows: Rows) -> torch.Tensor:
        """The output as (R, C) rows (a view where possible: no copy of a (B, T, V) output)."""
        raise NotImplementedError

    def rows(self, x: Inputs, y: torch.Tensor | None, out: object) -> Rows:
        """The compared rows of a batch with inputs `x`, labels `y` and unmodified output `out`."""
        raise NotImplementedError

    def check(self, x: Inputs, y: torch.Tensor | None, out: object) -> int:
        """Raise a one-line `LayercritError` unless the output (on a few samples `x`, labels of the
        whole data `y`) fits; return the width C of the compared rows."""
        raise NotImplementedError


class Logits(OutputAdapter):
    """(batch, classes) logits; one row per sample."""

    name = "logits"

    def values(self, out: object, rows: Rows) -> torch.Tensor:
        return _logits_tensor(out)

    def rows(self, x: Inputs, y: torch.Tensor | None, out: object) -> Rows:
        return Rows(None, y)

    def check(self, x: Inputs, y: torch.Tensor | None, out: object) -> int:
        t = _logits_tensor(out)
        if t is None:
            raise LayercritError(
                f"the model's output {type(out).__name__} has no `logits` (fields: {_fields(out)}); "
                f"choose --output from {_choices()}"
            )
        if t.ndim == 3:
            raise LayercritError(
                f"the model returns per-position logits of shape {_shape(t)}; --output logits expects "
                "(batch, classes): use --output next-token[:last|:every:K] for a language model"
            )
        if t.ndim != 2:
            raise LayercritError(f"the model returned shape {_shape(t)}; expected (batch, classes) logits")
        if y is not None and len(y):
            if y.ndim != 1:
                raise LayercritError(f"labels of shape {_shape(y)} do not fit --output logits; expected one class per sample")
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= t.shape[1]:
                raise LayercritError(
                    f"labels range over {lo}..{hi} but the model has {t.shape[1]} outputs (classes 0..{t.shape[1] - 1})"
                )
        return t.shape[1]


class NextToken(OutputAdapter):
    """(B, T, V) causal-LM logits; positions are rows, labels the shifted input ids.

    Args:
        every: take every `every`-th non-padded position (1: all of them).
        last: take only each sequence's last non-padded position.
    """

    def __init__(self, every: int = 1, last: bool = False) -> None:
        check_int("every", every)
        self.every, self.last = every, last
        self.name = "next-token:last" if last else "next-token" if every == 1 else f"next-token:every:{every}"

    def values(self, out: object, rows: Rows) -> torch.Tensor:
        t = _logits_tensor(out)
        return t.reshape(-1, t.shape[-1])  # a view for the contiguous logits models return

    def _selected(self, mask: torch.Tensor) -> torch.Tensor:
        if self.last:
            pos = _last_positions(mask)
            sel = torch.zeros_like(mask)
            ok = pos >= 0
            sel[ok.nonzero().squeeze(1), pos[ok]] = True
            return sel
        if self.every == 1:
            return mask
        return mask & (mask.long().cumsum(1) % self.every == 0)

    def rows(self, x: Inputs, y: torch.Tensor | None, out: object) -> Rows:
        logits = _logits_tensor(out)
        b, t = logits.shape[:2]
        device = logits.device
        mask = _mask(x, b, t, device)
        sel = self._selected(mask)
        index = sel.reshape(-1).nonzero().squeeze(1)
        labels = self._labels(x, y, mask, sel, device)
        return Rows(index, None if labels is None else labels.reshape(-1)[index])

    def _labels(self, x: Inputs, y: torch.Tensor | None, mask: torch.Tensor, sel: torch.Tensor,
                device: torch.device) -> torch.Tensor | None:
        """(B, T) labels: the next token (or the shifted (B, T) `labels`) where the next position is
        real, IGNORE elsewhere; (B,) labels go to each sequence's last position."""
        b, t = mask.shape
        if y is not None and y.ndim == 1:
            out = torch.full((b, t), IGNORE, dtype=torch.long, device=device)
            pos = _last_positions(mask)
            ok = pos >= 0
            out[ok.nonzero().squeeze(1), pos[ok]] = y.to(device).long()[ok]
            return out
        source = y if y is not None else token_ids(x)
        if source is None or tuple(source.shape) != (b, t):
            return None
        source = source.to(device).long()
        out = torch.full((b, t), IGNORE, dtype=torch.long, device=device)
        nxt = mask[:, 1:] & mask[:, :-1]
        out[:, :-1] = torch.where(nxt, source[:, 1:], IGNORE)
        return out

    def check(self, x: Inputs, y: torch.Tensor | None, out: object) -> int:
        t = _logits_tensor(out)
        if t is None:
            raise LayercritError(
                f"the model's output {type(out).__name__} has no `logits` (fields: {_fields(out)}); "
                f"--output {self.name} needs (B, T, V) logits; choose from {_choices()}"
            )
        if t.ndim != 3:
            raise LayercritError(
                f"--output {self.name} needs (batch, positions, vocabulary) logits; the model returns {_shape(t)}"
                + ("; use --output logits" if t.ndim == 2 else "")
            )
        if y is not None and y.ndim == 1 and not self.last:
            raise LayercritError(
                f"labels of shape {_shape(y)} (one per sequence) fit --output next-token:last only; "
                "next-token scores each position on the next input id"
            )
        if y is not None and y.ndim == 2 and y.shape[1] != t.shape[1]:
            raise LayercritError(f"labels of shape {_shape(y)} do not match {t.shape[1]} positions")
        if y is not None and y.ndim > 2:
            raise LayercritError(f"labels of shape {_shape(y)} do not fit --output {self.name}")
        if y is not None and len(y):
            valid = y[y != IGNORE]
            if len(valid) and (int(valid.min()) < 0 or int(valid.max()) >= t.shape[-1]):
                raise LayercritError(
                    f"labels range over {int(valid.min())}..{int(valid.max())} but the vocabulary has {t.shape[-1]} entries"
                )
        return t.shape[-1]


class Hidden(OutputAdapter):
    """Raw vectors (`last_hidden_state` or a tensor), pooled per sequence; compared without softmax.

    Args:
        pool: "mean" (masked by `attention_mask`), "cls" (first non-padded position) or "last"
            (last non-padded position); an output that is already (B, D) is used as it is.
    """

    softmax = False

    def __init__(self, pool: str = "mean") -> None:
        if pool not in ("mean", "cls", "last"):
            raise LayercritError(f"unknown output 'hidden:{pool}'; expected hidden:mean, hidden:cls or hidden:last")
        self.pool = pool
        self.name = f"hidden:{pool}"

    def values(self, out: object, rows: Rows) -> torch.Tensor:
        h = _hidden_tensor(out)
        if h.ndim == 2:
            return h
        b, t = h.shape[:2]
        mask = rows.mask if rows.mask is not None else torch.ones(b, t, dtype=torch.bool, device=h.device)
        if self.pool == "mean":
            w = mask.to(h.dtype).unsqueeze(-1)
            return (h * w).sum(1) / w.sum(1).clamp_min(1)
        pos = _first_positions(mask).clamp_max(t - 1) if self.pool == "cls" else _last_positions(mask).clamp_min(0)
        return h[torch.arange(b, device=h.device), pos]

    def rows(self, x: Inputs, y: torch.Tensor | None, out: object) -> Rows:
        h = _hidden_tensor(out)
        return Rows(None, None, _mask(x, h.shape[0], h.shape[1], h.device) if h.ndim == 3 else None)

    def check(self, x: Inputs, y: torch.Tensor | None, out: object) -> int:
        h = _hidden_tensor(out)
        if h is None:
            raise LayercritError(
                f"the model's output {type(out).__name__} has no `last_hidden_state` (fields: {_fields(out)}); "
                f"choose --output from {_choices()}"
            )
        if h.ndim not in (2, 3) or (h.ndim == 2 and self.pool != "mean"):
            raise LayercritError(
                f"--output {self.name} pools (batch, positions, features) vectors; the model returns {_shape(h)}"
                + ("; use --output hidden" if h.ndim == 2 else "")
            )
        if h.ndim == 2:
            self.name = "hidden"  # already one vector per sample: nothing is pooled
        return h.shape[-1]


def create_output(name: str) -> OutputAdapter:
    """The adapter for a name: `logits`, `next-token`, `next-token:last`, `next-token:every:K`,
    `hidden`, `hidden:mean`, `hidden:cls`, `hidden:last`."""
    if not isinstance(name, str):
        raise LayercritError(f"Expected `output` to be an output adapter name ({_choices()}), got {name!r}")
    base, _, rest = name.partition(":")
    if base not in OUTPUTS:
        raise LayercritError(f"unknown output {name!r}; expected one of: {_choices()}")
    return OUTPUTS.create(base, spec=rest)


@OUTPUTS.register("next-token")
def _next_token(spec: str = "") -> NextToken:
    if spec == "":
        return NextToken()
    if spec == "last":
        return NextToken(last=True)
    kind, _, k = spec.partition(":")
    if kind == "every" and k.isdigit() and int(k) >= 1:
        return NextToken(every=int(k))
    raise LayercritError(f"unknown output 'next-token:{spec}'; expected next-token, next-token:last or next-token:every:K (K ≥ 1)")


@OUTPUTS.register("hidden")
def _hidden(spec: str = "") -> Hidden:
    return Hidden(spec or "mean")


@OUTPUTS.register("logits")
def _logits(spec: str = "") -> Logits:
    if spec:
        raise LayercritError(f"unknown output 'logits:{spec}'; expected one of: {_choices()}")
    return Logits()


def list_outputs() -> list[str]:
    """The adapter names (`next-token` and `hidden` take a suffix, see `create_output`)."""
    return list(NAMES)


def is_causal_lm(model: nn.Module) -> bool:
    """A model with a causal language-model head: a `…ForCausalLM` / `…LMHeadModel` class, a decoder
    config, or an `lm_head`."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    return (name.endswith(("ForCausalLM", "LMHeadModel")) or bool(getattr(config, "is_decoder", False))
            or isinstance(getattr(model, "lm_head", None), nn.Module))


def choose_output(model: nn.Module, out: object) -> tuple[OutputAdapter, str]:
    """The adapter for an output where it is unambiguous, and why (recorded in the config).

    (B, C) logits → `logits`; (B, T, V) logits of a causal LM → `next-token`; an output with
    `last_hidden_state` and no logits → `hidden:mean` (or `hidden` when already (B, D)).
    """
    if not isinstance(out, torch.Tensor) and not _has(out, "logits") and _has(out, "last_hidden_state"):
        adapter = Hidden("mean")
        adapter.check({}, None, out)  # names a (B, D) output `hidden`
        return adapter, f"the output has last_hidden_state {_shape(_hidden_tensor(out))} and no logits"
    logits = _logits_tensor(out)
    if logits is None:
        raise LayercritError(
            f"the model's output {type(out).__name__} holds no tensor to compare (fields: {_fields(out)}); "
            f"choose --output from {_choices()}"
        )
    if logits.ndim == 2:
        return Logits(), f"(batch, classes) logits {_shape(logits)}"
    if logits.ndim == 3 and is_causal_lm(model):
        return NextToken(), f"(B, T, V) logits {_shape(logits)} of a causal language model ({type(model).__name__})"
    if logits.ndim == 3:
        raise LayercritError(
            f"the model returns {_shape(logits)} outputs per position and is not a causal language model; say what to "
            "compare: --output next-token (per-position logits), hidden:mean, hidden:cls or hidden:last (raw vectors)"
        )
    raise LayercritError(f"the model returned shape {_shape(logits)}; expected (batch, classes) logits or choose --output")


def resolve_output(spec: str | OutputAdapter | None, model: nn.Module, out: object) -> tuple[OutputAdapter, str]:
    """The adapter asked for (`spec`), or the automatic choice when None; with the reason."""
    if spec is None:
        adapter, why = choose_output(model, out)
        return adapter, f"automatic: {why}"
    adapter = spec if isinstance(spec, OutputAdapter) else create_output(spec)
    return adapter, "asked for"


def logits_of(output) -> torch.Tensor:
    """The logits in a model's output: a tensor, `.logits` (Hugging Face), or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise LayercritError(f"the model returned {type(output).__name__}; expected a tensor of logits")
