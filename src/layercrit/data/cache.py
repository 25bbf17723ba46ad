"""On-disk cache of decoded data, so a large image folder is decoded once, not on every run.

An entry is a `.pt` file (a dict of tensors and plain values) named by a sha256 key over the kind of
data, the absolute folder, every file's relative name, size and modification time, the transform
parameters and `CACHE_VERSION`: editing, adding or removing a file, or changing a parameter, gives a
new key. Entries live in `$LAYERCRIT_CACHE_DIR` (default `~/.cache/layercrit`), are written
atomically and read with `torch.load(weights_only=True)`. A damaged or unwritable cache is never
fatal: the data is decoded again (with a warning when the entry cannot be written).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .._utils.io import CACHE_ENV_VAR, atomic_path, cache_dir

__all__ = ["CACHE_VERSION", "ENV_VAR", "cache_dir", "cache_key", "load_cached", "save_cached"]

CACHE_VERSION = 1  # bump when the decoding or the entry layout changes: old entries are then never read
ENV_VAR = CACHE_ENV_VAR  # (cache_dir and the variable live in _utils.io: converted models are cached there too)


def cache_key(kind: str, root: str | Path, files: Sequence[str], params: dict) -> str:
    """sha256 over (kind, absolute root, sorted files with size and mtime, params, CACHE_VERSION).

    Args:
        kind: the data format, e.g. "imagefolder".
        root: the folder the files are in.
        files: file names relative to `root`.
        params: JSON-serializable transform parameters.
    """
    root = Path(root).resolve()
    stamps = []
    for name in sorted(files):
        try:
            st = (root / name).stat()
            stamps.append((name, st.st_size, st.st_mtime_ns))
        except OSError:  # vanished since listing: the decoder reports it; the key must still be computable
            stamps.append((name, -1, -1))
    payload = {"version": CACHE_VERSION, "kind": kind, "root": str(root), "files": stamps, "params": params}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _entry_path(kind: str, key: str) -> Path:
    return cache_dir() / f"{kind}-{key}.pt"


def load_cached(kind: str, key: str) -> dict | None:
    """The entry stored under `key`, or None when absent, unreadable or written for another key/version."""
    path = _entry_path(kind, key)
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged entry (truncated, foreign, older torch) only costs a re-decode
        return None
    if not isinstance(entry, dict) or entry.get("version") != CACHE_VERSION or entry.get("key") != key:
        return None
    return entry


def save_cached(kind: str, key: str, entry: dict) -> Path | None:
    """Store `entry` under `key` atomically; warn and return None if the cache cannot be written."""
    path = _entry_path(kind, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({**entry, "version": CACHE_VERSION, "key": key}, tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
        warnings.warn(f"could not write the data cache {str(path)!r} ({e}); data will be decoded again", stacklevel=2)
        return None
    return path
