"""CIFAR-10 from the `cifar-10-batches-py` folder (`data_batch_1..5`, `test_batch`).

Each batch is a (Python 2) pickle of a dict with `data` (uint8, N×3072: the red, green and blue
32×32 planes of each image) and `labels` (N ints in 0..9). Pickles are read by a restricted
unpickler that admits only what numpy arrays need, so a tampered file cannot run code.

Pixels are scaled to [0, 1] and standardized with one scalar mean and std over all training pixels
(Zhang et al.); the test split uses the training statistics. Shape (N, 3, 32, 32), float32.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import LayercritError
from .base import Dataset, standardize_uint8, uint8_pixel_stats

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2
    from numpy.core.multiarray import _reconstruct

__all__ = ["SPLIT_FILES", "load_cifar10"]

SPLIT_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
ROW_BYTES = 3 * 32 * 32

# Globals a pickled uint8 array refers to (numpy 1 and 2 module names; `_codecs.encode` carries bytes
# in protocol-2 pickles written by Python 3). Mapped to the objects directly: nothing else is imported.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those numpy arrays need."""

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")  # py2 `str` stays bytes: keys are b"data", b"labels"
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise LayercritError(
                f"CIFAR batch {str(self.path)!r} refers to {module}.{name}, which is refused; "
                "a CIFAR batch holds only numpy arrays, lists and bytes"
            ) from None

    def persistent_load(self, pid):
        raise LayercritError(f"CIFAR batch {str(self.path)!r} uses pickle persistent ids, which are refused")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch's (uint8 data (N, 3072), int64 labels (N,)), validated."""
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, path).load()
    except LayercritError:
        raise
    except Exception as e:  # any unpickling failure means a damaged file: pickle raises many types
        raise LayercritError(f"CIFAR batch {str(path)!r} is not a readable pickle: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise LayercritError(f"CIFAR batch {str(path)!r} holds a {type(d).__name__}; expected a dict")
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise LayercritError(f"CIFAR batch {str(path)!r} lacks 'data' or 'labels'; keys: {sorted(map(str, d))}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise LayercritError(
            f"CIFAR batch {str(path)!r} has data of {getattr(data, 'dtype', type(data).__name__)} and shape "
            f"{getattr(data, 'shape', None)}; expected a uint8 array of shape (N, {ROW_BYTES})"
        )
    if data.shape[1] != ROW_BYTES:
        raise LayercritError(
            f"CIFAR batch {str(path)!r} has data rows of {data.shape[1]} bytes; expected {ROW_BYTES} (3×32×32)"
        )
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise LayercritError(f"CIFAR batch {str(path)!r} has labels of dtype {y.dtype}; expected a list of integers")
    y = y.astype(np.int64)
    if len(y) != len(data):
        raise LayercritError(f"CIFAR batch {str(path)!r} has {len(data)} images but {len(y)} labels")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise LayercritError(f"CIFAR batch {str(path)!r} has labels in {y.min()}..{y.max()}; expected 0..9")
    return data, y


def _require(root: Path, split: str, why: str = "") -> list[Path]:
    missing = [n for n in SPLIT_FILES[split] if not (root / n).is_file()]
    if missing:
        raise LayercritError(
            f"CIFAR-10 folder {str(root)!r} lacks {', '.join(missing)}{why}; "
            "expected data_batch_1..5 and test_batch (the cifar-10-batches-py layout)"
        )
    return [root / n for n in SPLIT_FILES[split]]


def _read(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    parts = [_read_batch(f) for f in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10(path: str | Path, split: str = "test", spec: str | None = None) -> Dataset:
    """The CIFAR-10 split `split` ("train" or "test"), standardized with the training pixels' mean and std.

    The training batches are read for both splits (their statistics normalize the test split too).
    """
    root = Path(path)
    if split not in SPLIT_FILES:
        raise LayercritError(f"unknown CIFAR-10 split {split!r}; expected train or test")
    if not root.is_dir():
        raise LayercritError(f"CIFAR-10 folder {str(root)!r} does not exist")
    files = _require(root, split)  # checked first: a missing test batch fails before the training batches are read
    why = "" if split == "train" else " (their pixel statistics normalize the test split too)"
    x, y = _read(_require(root, "train", why))
    mean, std = uint8_pixel_stats([x], f"the CIFAR-10 training batches in {str(root)!r}")
    if split == "test":
        x, y = _read(files)
    return Dataset(
        standardize_uint8(x, mean, std).view(-1, 3, 32, 32),
        torch.from_numpy(y),
        spec=spec or f"cifar10:{root}:{split}",
        num_classes=10,
        meta={"format": "cifar10", "split": split, "path": str(root), "mean": mean, "std": std,
              "normalization": {"mean": mean, "std": std}},  # x = (pixels − mean) / std, pixels in [0, 1]
    )
