"""The trace check: a torch.fx trace is used only if it reproduces the model's output on the first
batch, beyond round-off (decided in float64 where float32 differences exceed it)."""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from ...data.inputs import call_model

# What fx adds to check a forward argument specialized to its default: removed with its placeholder.
_SPECIALIZATION_CHECKS = {torch._assert, operator.eq, fx._symbolic_trace._assert_is_none}


_FP64_CHECK_BYTES = 2 << 30  # most bytes of float64 parameters the trace check makes (else: the model's dtype)


def _check_trace(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, ours: object = None) -> tuple[bool, str]:
    """Whether the traced graph `gm` computes what `model` does on the samples `x` (see the module
    docstring); `ours`: `gm`'s output on `x` if already computed. (True, how it was checked) or (False, why not)."""
    with torch.no_grad():
        ours, theirs = gm(x) if ours is None else ours, call_model(model, x)
        if _same_output(ours, theirs, rtol=1e-5, atol=1e-6)[0]:
            return True, f"its trace matches the model to 1e-5 of the outputs' magnitude on {len(x)} samples"
        wide = _check_in_float64(model, gm, x)
        if wide is not None:
            ok, why = _same_output(*wide, rtol=1e-7, atol=1e-12, how="in float64")
            return ok, why or f"its trace matches the model in float64 on {len(x)} samples"
        ok, why = _same_output(ours, theirs, rtol=1e-3, atol=1e-5, how="relative to the outputs' magnitude")
        return ok, why or f"its trace matches the model to 1e-3 of the outputs' magnitude on {len(x)} samples"


def _check_in_float64(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor) -> tuple[object, object] | None:
    """The outputs of `gm` and `model` on `x` with every floating-point parameter, buffer and input
    cast to float64 through `functional_call` (the model is not touched); None where float64 cannot
    be used (too large, a float32 constant, no float64 kernel, an output not in float64)."""
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    floating = {n: t for n, t in tensors.items() if t.is_floating_point()}
    if sum(t.numel() for t in floating.values()) * 8 > _FP64_CHECK_BYTES:
        return None
    wide, by_id = {}, {}
    for n, t in floating.items():  # tied tensors stay tied: one float64 copy each
        if id(t) not in by_id:
            by_id[id(t)] = t.detach().double()
        wide[n] = by_id[id(t)]
    known = {n for n, _ in gm.named_parameters(remove_duplicate=False)} | {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    xd = x.double() if x.is_floating_point() else x
    try:
        ours = torch.func.functional_call(gm, {n: v for n, v in wide.items() if n in known}, (xd,))
        theirs = torch.func.functional_call(model, wide, (xd,))
    except Exception:  # noqa: BLE001  (float64 is not possible here)
        return None
    leaves = _tensor_leaves(ours) + _tensor_leaves(theirs)
    if not leaves or any(t.dtype != torch.float64 for t in leaves if t.is_floating_point()):
        return None
    return ours, theirs


def _same_output(a: object, b: object, **tolerance) -> tuple[bool, str]:
    """`_same` on every tensor of two raw outputs (tensors, tuples, dicts, `ModelOutput`s)."""
    ours, theirs = _tensor_leaves(a), _tensor_leaves(b)
    if len(ours) != len(theirs):
        return False, f"the traced graph returns {len(ours)} tensors, the model {len(theirs)}"
    for u, v in zip(ours, theirs):
        ok, why = _same(u, v, **tolerance)
        if not ok:
            return ok, why
    return True, ""


def _tensor_leaves(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [t for v in values for t in _tensor_leaves(v)]


def _same(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-3, atol: float = 1e-5, how: str = "") -> tuple[bool, str]:
    """Whether `a` (the trace's) equals `b` (the model's) up to `rtol` × max |b| + `atol`: round-off
    is relative to the outputs' magnitude, a wrong trace differs at that magnitude."""
    if a.shape != b.shape:
        return False, f"the traced graph returns shape {tuple(a.shape)}, the model {tuple(b.shape)}"
    if torch.equal(a, b):
        return True, ""
    if not (a.is_floating_point() or a.is_complex()):
        return False, "the traced graph's output differs from the model's (integer values)"
    a, b = a.double(), b.double()
    diff = (a - b).abs().masked_fill(a.isnan() & b.isnan(), 0).nan_to_num(math.inf).max()
    scale = b.abs().nan_to_num(0, 0, 0).max()
    tol = rtol * float(scale) + atol
    if float(diff) <= tol:
        return True, ""
    return False, (f"the traced graph's output differs from the model's by {float(diff):.3g} {how} (outputs up to "
                   f"{float(scale):.3g}; round-off stays below {tol:.2g}): Python control flow or state the trace cannot see?")
