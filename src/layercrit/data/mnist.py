"""MNIST from its four IDX files in one folder, each plain or gzip-compressed (`.gz`).

IDX: a big-endian int32 magic (2051 images, 2049 labels), one big-endian int32 per dimension,
then the uint8 values. Pixels are divided by 255 and standardized with one scalar mean and std
over all training pixels; without the training images the test images' own statistics are used,
with a warning and `meta["stats_from"] = "test"`. Shape (N, 1, rows, cols) (28×28 for MNIST), float32.
"""

from __future__ import annotations

import gzip
import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import LayercritError
from .base import Dataset, standardize_uint8, uint8_pixel_stats

__all__ = ["SPLIT_FILES", "load_mnist"]

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MAGIC = {3: 2051, 1: 2049}  # number of dimensions -> magic number (type 0x08: unsigned byte)


def _find(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file with `ndim` dimensions, header and size checked."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise LayercritError(f"MNIST file {str(path)!r} cannot be read: {e}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise LayercritError(f"MNIST file {str(path)!r} has {len(raw)} bytes, shorter than its {header}-byte header")
    magic, *dims = struct.unpack(f">{1 + ndim}i", raw[:header])
    if magic != _MAGIC[ndim]:
        raise LayercritError(
            f"MNIST file {str(path)!r} has magic number {magic}; expected {_MAGIC[ndim]} "
            f"({'images' if ndim == 3 else 'labels'}, IDX unsigned bytes)"
        )
    if min(dims) < 0 or (ndim == 3 and min(dims[1:]) < 1):
        raise LayercritError(f"MNIST file {str(path)!r} declares dimensions {dims}; expected positive sizes")
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise LayercritError(
            f"MNIST file {str(path)!r} has {len(raw)} bytes but its header {dims} needs {expected}; "
            f"the file is {'truncated' if len(raw) < expected else 'longer than declared'}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable, as torch expects


def _read_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(images (N, 1, rows, cols), int64 labels) of `split`, or None when both its files are absent."""
    paths = [_find(root, n) for n in SPLIT_FILES[split]]
    if paths == [None, None]:
        return None
    if None in paths:
        missing = SPLIT_FILES[split][paths.index(None)]
        raise LayercritError(f"MNIST folder {str(root)!r} lacks {missing} (or {missing}.gz) for the {split} split")
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise LayercritError(f"MNIST {split} files in {str(root)!r} hold {len(images)} images but {len(labels)} labels")
    if len(labels) and labels.max() > 9:
        raise LayercritError(f"MNIST file {str(paths[1])!r} has labels up to {labels.max()}; expected 0..9")
    return images[:, None], labels.astype(np.int64)


def load_mnist(path: str | Path, split: str = "test", spec: str | None = None) -> Dataset:
    """The MNIST split `split` ("train" or "test"), standardized with the training pixels' mean and std."""
    root = Path(path)
    if split not in SPLIT_FILES:
        raise LayercritError(f"unknown MNIST split {split!r}; expected train or test")
    if not root.is_dir():
        raise LayercritError(f"MNIST folder {str(root)!r} does not exist")
    train = _read_split(root, "train")
    data = train if split == "train" else _read_split(root, "test")
    if data is None:
        names = " and ".join(SPLIT_FILES[split])
        raise LayercritError(f"MNIST folder {str(root)!r} has no {split} split; expected {names} (optionally .gz)")
    if train is not None and train[0].shape[1:] != data[0].shape[1:]:
        raise LayercritError(
            f"MNIST folder {str(root)!r} has train images of {train[0].shape[2:]} but test images of "
            f"{data[0].shape[2:]}; expected the same size"
        )
    stats_from, stats_images = ("train", train[0]) if train is not None else ("test", data[0])
    if train is None:
        warnings.warn(
            f"MNIST folder {str(root)!r} has no training images; normalizing the test split with its own mean and std",
            stacklevel=2,
        )
    mean, std = uint8_pixel_stats([stats_images], f"the MNIST {stats_from} images in {str(root)!r}")
    return Dataset(
        standardize_uint8(data[0], mean, std),
        torch.from_numpy(data[1]),
        spec=spec or f"mnist:{root}:{split}",
        num_classes=10,
        meta={"format": "mnist", "split": split, "path": str(root), "mean": mean, "std": std, "stats_from": stats_from,
              "normalization": {"mean": mean, "std": std}},  # x = (pixels − mean) / std, pixels in [0, 1]
    )
