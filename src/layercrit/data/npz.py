"""`.npz` files with an array `x` (inputs, used as given) and optionally `y` (integer labels)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import LayercritError
from .base import Dataset

__all__ = ["load_npz"]


def load_npz(path: str | Path, spec: str | None = None) -> Dataset:
    """Load `x` (any numeric dtype, cast to float32, no other preprocessing) and optional `y`.

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
            if "x" not in f.files:
                raise LayercritError(f"data file {str(path)!r} has no array 'x' (has: {', '.join(f.files) or 'none'})")
            x = f["x"]
            y = f["y"] if "y" in f.files else None
    except LayercritError:
        raise
    except ValueError as e:
        raise LayercritError(f"data file {str(path)!r} holds pickled objects, which are not loaded: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise LayercritError(f"data file {str(path)!r} is not a readable .npz file: {e}") from None
    if x.dtype.kind not in "biuf" or x.ndim < 2 or len(x) == 0:
        raise LayercritError(
            f"array 'x' in {str(path)!r} has dtype {x.dtype} and shape {x.shape}; expected numbers of shape (N, ...)"
        )
    labels = None
    num_classes = None
    if y is not None:
        if y.dtype.kind not in "biu" or y.ndim != 1 or len(y) != len(x):
            raise LayercritError(
                f"array 'y' in {str(path)!r} has dtype {y.dtype} and shape {y.shape}; "
                f"expected integer labels of shape ({len(x)},)"
            )
        labels = torch.from_numpy(y.astype(np.int64))
        num_classes = int(y.max()) + 1 if len(y) else None
    return Dataset(
        torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
        labels,
        spec=spec,
        num_classes=num_classes,
        meta={"format": "npz", "path": str(path)},
    )
