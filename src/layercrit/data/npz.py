"""`.npz` files: an array `x` (inputs, used as given) and optionally `y` (integer labels); or named
model inputs (`input_ids`, `attention_mask`, `pixel_values`, …) and optionally `labels`.

With an array `x`, it is the one input, cast to float32 (image data stored as uint8 keeps working
as before), and other arrays besides `y` are ignored. Without `x`, every array other than `y` and
`labels` is a model input passed as a keyword argument under its name: integer arrays keep their
dtype (token ids must stay integers; unsigned integers wider than 8 bits become int64, which torch
indexes with), floating arrays become float32. Labels (`y` or `labels`) are integers of shape (N,)
(one class per sample) or (N, T) (one token per position, −100 = none, the Hugging Face convention).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import LayercritError
from .base import Dataset

__all__ = ["load_npz"]


def load_npz(path: str | Path, spec: str | None = None) -> Dataset:
    """Load `x` (any numeric dtype, cast to float32, no other preprocessing) and optional `y`, or
    named inputs and optional `labels` (see the module docstring).

    Loaded with `allow_pickle=False`: object arrays are refused.
    """
    path = Path(path)
    spec = spec or str(path)
    if not path.is_file():
        raise LayercritError(f"data file {str(path)!r} does not exist")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":  # np.load would take any other bytes for a pickle
            raise LayercritError(f"data file {str(path)!r} is not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as f:
            named = [k for k in f.files if k not in ("x", "y", "labels")]
            if "x" not in f.files and not named:
                raise LayercritError(
                    f"data file {str(path)!r} has no array 'x' and no named inputs such as 'input_ids' "
                    f"(has: {', '.join(f.files) or 'none'})"
                )
            if "y" in f.files and "labels" in f.files:
                raise LayercritError(f"data file {str(path)!r} has both 'y' and 'labels'; keep one array of labels")
            x = f["x"] if "x" in f.files else {k: f[k] for k in named}
            label_key = "y" if "y" in f.files else "labels"
            y = f[label_key] if label_key in f.files else None
    except LayercritError:
        raise
    except ValueError as e:
        raise LayercritError(f"data file {str(path)!r} holds pickled objects, which are not loaded: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise LayercritError(f"data file {str(path)!r} is not a readable .npz file: {e}") from None
    if isinstance(x, dict):
        inputs = {k: _named_input(path, k, v) for k, v in x.items()}
        sizes = {k: len(v) for k, v in inputs.items()}
        if len(set(sizes.values())) > 1:
            raise LayercritError(f"named inputs in {str(path)!r} have different numbers of samples: {sizes}")
        n = next(iter(sizes.values()))
    else:
        if x.dtype.kind not in "biuf" or x.ndim < 2 or len(x) == 0:
            raise LayercritError(
                f"array 'x' in {str(path)!r} has dtype {x.dtype} and shape {x.shape}; expected numbers of shape (N, ...)"
            )
        inputs, n = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), len(x)
    labels = None
    num_classes = None
    if y is not None:
        if y.dtype.kind not in "biu" or y.ndim not in (1, 2) or len(y) != n or (y.ndim == 2 and label_key == "y"):
            raise LayercritError(
                f"array {label_key!r} in {str(path)!r} has dtype {y.dtype} and shape {y.shape}; "
                f"expected integer labels of shape ({n},)" + (f" or ({n}, T)" if label_key == "labels" else "")
            )
        labels = torch.from_numpy(y.astype(np.int64))
        num_classes = int(y.max()) + 1 if len(y) and y.ndim == 1 else None
    return Dataset(
        inputs,
        labels,
        spec=spec,
        num_classes=num_classes,
        meta={"format": "npz", "path": str(path)},
    )


def _named_input(path: Path, name: str, a: np.ndarray) -> torch.Tensor:
    """One named model input: integers keep their dtype (wide unsigned ones become int64), floats become float32."""
    if a.dtype.kind not in "biuf" or a.ndim < 1 or len(a) == 0:
        raise LayercritError(
            f"array {name!r} in {str(path)!r} has dtype {a.dtype} and shape {a.shape}; expected numbers of shape (N, ...)"
        )
    if a.dtype.kind == "f":
        a = a.astype(np.float32)
    elif a.dtype.kind == "u" and a.dtype.itemsize > 1:
        a = a.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(a))
