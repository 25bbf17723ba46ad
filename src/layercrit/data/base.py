"""`Dataset`: evaluation or training data materialized once as tensors."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import LayercritError, check_int

__all__ = ["Dataset", "standardize_uint8", "uint8_pixel_stats"]


@dataclass
class Dataset:
    """Decoded, preprocessed samples as tensors, reused by every probe.

    Attributes:
        x: inputs, float32, shape (N, ...), already normalized.
        y: integer labels (N,), or None for unlabelled data.
        spec: the data spec it was loaded from.
        num_classes: number of classes when known (labels are in 0..num_classes-1).
        indices: positions in the full data of the samples kept by `subset` (None: all, in order).
        meta: format details (split, normalization, source files).
    """

    x: torch.Tensor
    y: torch.Tensor | None
    spec: str
    num_classes: int | None = None
    indices: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self.x):
            raise LayercritError(f"data {self.spec!r} has {len(self.x)} inputs but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, n: int | None, seed: int = 0) -> Dataset:
        """A random subset of `n` samples drawn without replacement under its own `seed`.

        The subset's order is sorted by position, so the same (n, seed) always gives the same samples
        in the same order. `n=None` keeps everything.
        """
        if n is None:
            return self
        check_int("images", n)
        if n > len(self):
            raise LayercritError(f"asked for {n} images but data {self.spec!r} has only {len(self)}")
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = np.sort(rng.choice(len(self), size=n, replace=False))
        base = self.indices if self.indices is not None else np.arange(len(self))
        t = torch.from_numpy(idx)
        return replace(
            self, x=self.x[t], y=None if self.y is None else self.y[t], indices=base[idx], meta=dict(self.meta)
        )

    @property
    def identity(self) -> str:
        """Short hash of (spec, split, sample count, kept indices): which samples were evaluated."""
        h = hashlib.sha256()
        h.update(f"{self.spec}|{self.meta.get('split')}|{tuple(self.x.shape)}".encode())
        if self.indices is not None:
            h.update(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def check_labels(self, num_outputs: int) -> None:
        """Labels must index the model's outputs."""
        if self.y is None or len(self.y) == 0:
            return
        lo, hi = int(self.y.min()), int(self.y.max())
        if lo < 0 or hi >= num_outputs:
            raise LayercritError(
                f"labels of data {self.spec!r} range over {lo}..{hi} but the model has {num_outputs} outputs "
                f"(classes 0..{num_outputs - 1})"
            )


def uint8_pixel_stats(arrays: list[np.ndarray], what: str) -> tuple[float, float]:
    """Global mean and std of uint8 pixels scaled to [0, 1], over all `arrays` (Zhang et al.'s statistics).

    Computed exactly from a 256-bin histogram: no float copy of the data is made.
    """
    counts = torch.zeros(256, dtype=torch.float64)
    for a in arrays:
        counts += torch.bincount(torch.from_numpy(np.ascontiguousarray(a).reshape(-1)), minlength=256)
    n = float(counts.sum())
    if n == 0:
        raise LayercritError(f"{what} has no pixels to compute normalization statistics from")
    v = torch.arange(256, dtype=torch.float64) / 255.0
    mean = float(counts @ v / n)
    std = float(torch.sqrt(counts @ (v - mean) ** 2 / n))
    if std == 0.0:
        raise LayercritError(f"all pixels of {what} have the value {round(mean * 255)}; cannot normalize by their std")
    return mean, std


def standardize_uint8(x: np.ndarray, mean: float, std: float) -> torch.Tensor:
    """uint8 pixels to float32 `(x / 255 - mean) / std`, computed in place on one float32 copy."""
    return torch.from_numpy(x).to(torch.float32).sub_(mean * 255.0).div_(std * 255.0)
