"""Data loading: `load_data(spec)` turns a data spec into a `Dataset` of tensors.

Specs: `digits` (the test split; `digits:train`, `digits:all`), `path/to/file.npz`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LayercritError
from .base import Dataset
from .digits import load_digits
from .npz import load_npz

__all__ = ["Dataset", "load_data", "load_digits", "load_npz"]


def load_data(spec: str, split: str | None = None) -> Dataset:
    """Load a data spec.

    Args:
        spec: `digits[:train|test|all]` or a `.npz` file.
        split: default split when the spec names none ("test" for evaluation, "train" for training).
    """
    if not isinstance(spec, str) or not spec:
        raise LayercritError(f"Expected a data spec such as 'digits' or 'file.npz', got {spec!r}")
    name, _, rest = spec.partition(":")
    if name == "digits":
        return load_digits(rest or split or "test")
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        return load_npz(path, spec)
    raise LayercritError(f"unknown data spec {spec!r}; expected 'digits', 'digits:train' or a file ending in .npz")
