"""scikit-learn's digits: 1,797 8×8 grey images of 10 classes, shipped inside scikit-learn.

Split (fixed, documented): a permutation of the 1,797 samples by `numpy.random.default_rng(0)`;
the first 1,437 (80 %) are `train`, the remaining 360 `test`. Pixels (0..16) are divided by 16
and standardized with the global mean and std of the training pixels (Zhang et al.'s
normalization). Shape (N, 1, 8, 8), float32.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from ..errors import LayercritError
from .base import Dataset

__all__ = ["N_TRAIN", "load_digits"]

N_TRAIN = 1437
SPLITS = ("train", "test", "all")


@functools.lru_cache(maxsize=1)
def _arrays() -> tuple[np.ndarray, np.ndarray, float, float]:
    from sklearn.datasets import load_digits as sk_load

    bunch = sk_load()
    x = (bunch.images.astype(np.float64) / 16.0)[:, None]
    y = bunch.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(x))
    x, y = x[perm], y[perm]
    train = x[:N_TRAIN]
    return x, y, float(train.mean()), float(train.std())


def load_digits(split: str = "test") -> Dataset:
    """The digits split `split` ("train", "test" or "all"), normalized with training statistics."""
    if split not in SPLITS:
        raise LayercritError(f"unknown digits split {split!r}; expected one of {', '.join(SPLITS)}")
    x, y, mean, std = _arrays()
    sl = {"train": slice(0, N_TRAIN), "test": slice(N_TRAIN, None), "all": slice(None)}[split]
    xs = torch.from_numpy(((x[sl] - mean) / std).astype(np.float32))
    return Dataset(
        xs,
        torch.from_numpy(y[sl].copy()),
        spec=f"digits:{split}",
        num_classes=10,
        meta={"split": split, "format": "digits", "mean": mean, "std": std,
              "normalization": {"mean": mean, "std": std}},  # x = (pixels − mean) / std, pixels in [0, 1]
    )
