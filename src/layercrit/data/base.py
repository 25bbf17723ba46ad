"""`Dataset`: evaluation or training data materialized once as tensors."""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import LayercritError, check_int
from .inputs import Inputs, num_samples, sample_shape, take

__all__ = ["Dataset", "standardize_uint8", "uint8_pixel_stats"]


@dataclass
class Dataset:
    """Decoded, preprocessed samples as tensors, reused by every probe.

    Attributes:
        x: inputs, float32, shape (N, ...), already normalized; or a dict of named (N, ...)
            tensors passed to the model as keyword arguments, integer dtypes kept (token ids,
            attention masks: see `layercrit.inputs`).
        y: integer labels (N,), token labels (N, T) (−100: none), or None for unlabelled data.
        spec: the data spec it was loaded from.
        num_classes: number of classes when known (labels are in 0..num_classes-1).
        indices: positions in the full data of the samples kept by `subset` (None: all, in order).
        meta: format details (split, normalization, source files). Image formats set
            `normalization = {"mean", "std"}` with x = (pixels − mean) / std, pixels in [0, 1].
            A `fingerprint` (e.g. hashes of a text and its tokenizer) enters the `identity`.
    """

    x: Inputs
    y: torch.Tensor | None
    spec: str
    num_classes: int | None = None
    indices: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.y is not None and len(self.y) != len(self):
            raise LayercritError(f"data {self.spec!r} has {len(self)} inputs but {len(self.y)} labels")
        _check_finite(self.x, self.spec)

    def __len__(self) -> int:
        return num_samples(self.x)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one sample (of a dict: of `input_ids`, `pixel_values`, … see `inputs.main_tensor`)."""
        return sample_shape(self.x)

    def subset(self, n: int | None, seed: int = 0, strict: bool = False) -> Dataset:
        """A random subset of `n` samples drawn without replacement under its own `seed`.

        The subset's order is sorted by position, so the same (n, seed) always gives the same samples
        in the same order. `n=None` keeps everything; so does an `n` above the number of samples,
        with a warning (`strict=True`: an error).
        """
        if n is None:
            return self
        check_int("images", n)
        if n > len(self):
            message = f"asked for {n} images but data {self.spec!r} has only {len(self)}"
            if strict:
                raise LayercritError(message)
            warnings.warn(f"{message}; using all {len(self)}", stacklevel=2)
            return self
        rng = np.random.Generator(np.random.PCG64(seed))
        idx = np.sort(rng.choice(len(self), size=n, replace=False))
        base = self.indices if self.indices is not None else np.arange(len(self))
        t = torch.from_numpy(idx)
        return replace(
            self, x=take(self.x, t), y=None if self.y is None else self.y[t], indices=base[idx], meta=dict(self.meta)
        )

    @property
    def identity(self) -> str:
        """Short hash of (spec, split, sample count, kept indices): which samples were evaluated."""
        h = hashlib.sha256()
        shape = tuple(self.x.shape) if isinstance(self.x, torch.Tensor) else {k: tuple(v.shape) for k, v in self.x.items()}
        h.update(f"{self.spec}|{self.meta.get('split')}|{shape}".encode())
        if "fingerprint" in self.meta:  # content hashes (a text and its tokenizer): the spec names only a path
            h.update(f"|{self.meta['fingerprint']}".encode())
        if self.indices is not None:
            h.update(np.ascontiguousarray(self.indices, dtype=np.int64).tobytes())
        if "shift" in self.meta:  # corrupted copies (layercrit.shifts) are other data
            h.update(f"|shift={self.meta['shift']}|seed={self.meta.get('shift_seed')}".encode())
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


def _check_finite(x, spec: str, chunk: int = 1 << 22) -> None:
    """Refuse inputs with NaN or ±inf: they would make every measure NaN without a word.

    Checked in chunks of samples (no full-size boolean copy); integer tensors cannot hold them.
    A dict of tensors (several model inputs) is checked tensor by tensor.
    """
    for t in x.values() if isinstance(x, dict) else [x]:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        flat = t.reshape(len(t), -1)
        step = max(1, chunk // max(1, flat.shape[1]))
        bad, first = 0, None
        for i in range(0, len(flat), step):
            ok = torch.isfinite(flat[i : i + step]).all(dim=1)
            if not bool(ok.all()):
                rows = (~ok).nonzero().flatten()
                bad += len(rows)
                first = i + int(rows[0]) if first is None else first
        if bad:
            raise LayercritError(
                f"data {spec!r} has non-finite values (NaN or inf) in {bad} of {len(t)} samples "
                f"(first: sample {first}); fix or drop them"
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
