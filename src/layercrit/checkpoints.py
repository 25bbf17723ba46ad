"""Weights and self-describing checkpoints, loaded without unpickling arbitrary code.

A layercrit checkpoint is a `torch.save`d dict written atomically:
`{"format": "layercrit-checkpoint", "version": 1, "epoch", "model": {"spec", "kwargs"},
"data": {...}, "seed", "hparams": {...}, "metrics": {...}, "state_dict": {...}, ...}`.
Plain state-dict files (`.pt`/`.pth` via `torch.load(weights_only=True)`, `.safetensors`) are
accepted wherever weights are.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import LayercritError
from .io import atomic_path

__all__ = ["FORMAT", "VERSION", "apply_weights", "load_checkpoint", "load_state_dict", "save_checkpoint", "strip_wrappers"]

FORMAT = "layercrit-checkpoint"
VERSION = 1
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile, DataParallel/DDP


def strip_wrappers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `torch.compile` / DDP prefixes from state-dict keys."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LayercritError(
            f"{str(path)!r} contains pickled objects other than tensors and plain containers, which are not "
            f"loaded (weights_only=True); save a state dict instead ({str(e).splitlines()[0][:120]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as e:
        raise LayercritError(f"{str(path)!r} is not a readable PyTorch file (corrupt or truncated?): {str(e).splitlines()[0][:200]}") from None


def load_checkpoint(path: str | Path) -> dict:
    """Read a file written by `save_checkpoint`, or a plain state dict wrapped as one (epoch None)."""
    path = Path(path)
    if not path.is_file():
        raise LayercritError(f"weights file {str(path)!r} does not exist")
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file

            return {"state_dict": load_file(str(path), device="cpu"), "epoch": None}
        except Exception as e:  # safetensors raises its own error types
            raise LayercritError(f"{str(path)!r} is not a readable safetensors file: {str(e).splitlines()[0][:200]}") from None
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        if obj.get("version") != VERSION:
            raise LayercritError(f"{str(path)!r} is a layercrit checkpoint of format version {obj.get('version')}; this version reads {VERSION}")
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model", "state"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LayercritError(f"{str(path)!r} does not hold a state dict (a mapping of parameter names to tensors)")
    return {"state_dict": dict(obj), "epoch": None}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a weights or checkpoint file, wrapper prefixes stripped."""
    return strip_wrappers(load_checkpoint(path)["state_dict"])


def apply_weights(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights") -> nn.Module:
    """Load `state` strictly, naming the keys or shapes that do not match the model."""
    state = strip_wrappers(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (file vs model) {_few(shapes)}")
    if problems:
        raise LayercritError(f"{source} do not match the model: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model


def _few(items: list[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def save_checkpoint(path: str | Path, state_dict: Mapping[str, torch.Tensor], **info: Any) -> Path:
    """Write a self-describing checkpoint atomically (temporary file + rename)."""
    doc = {"format": FORMAT, "version": VERSION, **info}
    doc["state_dict"] = {k: v.detach().cpu().clone() for k, v in strip_wrappers(state_dict).items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(doc, tmp)
    return path
