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

from .._utils.io import atomic_path
from ..errors import LayercritError

__all__ = ["FORMAT", "VERSION", "Run", "apply_weights", "load_checkpoint", "load_state_dict", "save_checkpoint", "strip_wrappers"]

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
    """Load `state` strictly, naming the keys or shapes that do not match the model.

    Non-persistent buffers (e.g. Hugging Face's `position_ids`, rotary `inv_freq`) are not part of a
    state dict; a file that has them (older versions saved some) is not mismatching: they are ignored.
    """
    state = strip_wrappers(state)
    own = model.state_dict()
    derived = {n for n, _ in model.named_buffers() if n not in own}
    state = {k: v for k, v in state.items() if k not in derived}
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(doc, f)  # through a file object: a full disk raises OSError (a path gives a RuntimeError)
    return path


class Run:
    """A training run's checkpoint folder (as written by `layercrit train`), validated.

    Attributes:
        path: the folder.
        manifest: the parsed `manifest.json`.
        files: checkpoint file per epoch, ascending; epoch 0 is the untrained init.
    """

    def __init__(self, path: str | Path) -> None:
        import json
        import warnings

        self.path = path = Path(path)
        if not path.is_dir():
            raise LayercritError(f"checkpoint folder {str(path)!r} does not exist")
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise LayercritError(f"{str(path)!r} has no manifest.json: not a layercrit training run (`layercrit train` writes one)")
        try:
            self.manifest = json.loads(mpath.read_text())
            entries = self.manifest["checkpoints"]
            self.files = {int(c["epoch"]): path / c["file"] for c in entries}
        except (ValueError, KeyError, TypeError) as e:
            raise LayercritError(f"{str(mpath)!r} is not a valid layercrit manifest: {e}") from None
        self.files = dict(sorted(self.files.items()))
        if 0 not in self.files:
            raise LayercritError(f"{str(path)!r} has no checkpoint 0 (the untrained init, needed to reset layers to it)")
        missing = [f.name for f in self.files.values() if not f.is_file()]
        if missing:
            raise LayercritError(f"manifest in {str(path)!r} lists {', '.join(missing)}, which do not exist")
        unlisted = sorted({f.name for f in path.glob("epoch_*.pt")} - {f.name for f in self.files.values()})
        if unlisted:  # e.g. a run killed between writing a checkpoint and the manifest
            warnings.warn(f"{str(path)!r} holds checkpoints the manifest does not list (ignored): {', '.join(unlisted)}", stacklevel=2)
        config = self.manifest.get("config", {})
        self.model_spec: str = config.get("model", "")
        self.model_kwargs: dict = config.get("model_kwargs", {})
        self._cache: dict[int, dict] = {}

    @property
    def epochs(self) -> list[int]:
        return list(self.files)

    @property
    def final_epoch(self) -> int:
        return self.epochs[-1]

    def checkpoint(self, epoch: int) -> dict:
        """The checkpoint of `epoch`, checked to be of this run's architecture (two kept in memory)."""
        if epoch not in self.files:
            raise LayercritError(f"{str(self.path)!r} has no checkpoint of epoch {epoch}; it has {self.epochs}")
        if epoch not in self._cache:
            ckpt = load_checkpoint(self.files[epoch])
            model = ckpt.get("model") or {}
            if ckpt.get("epoch") != epoch:
                raise LayercritError(f"{self.files[epoch].name} holds epoch {ckpt.get('epoch')}, the manifest says {epoch}")
            kwargs = model.get("kwargs") or {}
            if model.get("spec") != self.model_spec or _plain(kwargs) != _plain(self.model_kwargs):
                raise LayercritError(
                    f"{self.files[epoch].name} is a checkpoint of {model.get('spec')!r} {kwargs}, but the run is "
                    f"{self.model_spec!r} {self.model_kwargs}: checkpoints of another architecture"
                )
            while len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = ckpt
        return self._cache[epoch]

    def state_dict(self, epoch: int) -> dict[str, torch.Tensor]:
        return strip_wrappers(self.checkpoint(epoch)["state_dict"])

    def factory(self):
        """The run's untrained constructor (the init source for re-randomization)."""
        from ..models import resolve_factory

        return resolve_factory(self.model_spec, **self.model_kwargs)

    def model(self, epoch: int | None = None) -> nn.Module:
        """The model with the weights of `epoch` (default: the last checkpoint)."""
        epoch = self.final_epoch if epoch is None else epoch
        model = self.factory()()
        return apply_weights(model, self.state_dict(epoch), f"checkpoint {self.files[epoch].name}")

    @property
    def test_data(self) -> str | None:
        """The run's held-out data spec, when it has one."""
        from ..data import held_out_spec

        config = self.manifest.get("config", {})
        return config.get("test_data") or held_out_spec(config.get("data", ""))

    @property
    def train_data(self) -> str:
        return self.manifest.get("config", {}).get("data", "digits:train")


def _plain(obj):
    """JSON-comparable form (tuples and lists alike)."""
    import json

    return json.loads(json.dumps(obj))


def build_model(spec: str, weights: str | Path | None = None, model_args: Mapping | None = None, data=None):
    """A model from a spec, with weights: `(model, factory)`; the factory is its init source.

    Built-in models are sized by `data` (classes, input shape) unless `model_args` say otherwise;
    a layercrit checkpoint of the same spec supplies its constructor arguments. A spec that names
    trained weights (`hf:PATH`) is loaded with them unless `weights` replace them. The untrained model
    is built under seed 0, so a model without weights is reproducible.
    """
    from ..models import factory_for_data

    kwargs = dict(model_args or {})
    ckpt = load_checkpoint(weights) if weights else None
    info = (ckpt or {}).get("model") or {}
    if info.get("spec") == spec and not kwargs:
        kwargs = dict(info.get("kwargs") or {})
    factory = factory_for_data(spec, kwargs, getattr(data, "num_classes", None), getattr(data, "input_shape", None))
    if ckpt is None and factory.pretrained is not None:  # `hf:PATH`: the model's own weights
        return factory.pretrained(), factory
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = factory()
    if ckpt is not None:
        apply_weights(model, ckpt["state_dict"], f"weights in {str(weights)!r}")
    return model, factory
