"""Atomic file output: a failed or interrupted write never leaves a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import LayercritError

__all__ = ["atomic_path", "check_output_path"]


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> Path:
    """Validate an output path before any compute starts."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise LayercritError(
            f"output file {str(path)!r} has an unsupported extension; expected one of {', '.join(suffixes)}"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise LayercritError(f"output folder {str(parent)!r} does not exist; create it first or choose another path")
    if path.is_dir():
        raise LayercritError(f"output path {str(path)!r} is a folder; expected a file name")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
