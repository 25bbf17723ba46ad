"""Output: files written atomically, and console lines that keep clear of progress bars.

A failed or interrupted write never leaves a half-written file. Output folders are created on
demand, with their parents (`--out runs/fcn/r.csv` needs no mkdir). A write that fails (a full
disk, a read-only folder) raises a `LayercritError` naming the file and saying that it was left as
it was. `logging_above_bars` prints the log records of libraries (Ray, …) above progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LayercritError

__all__ = ["CACHE_ENV_VAR", "atomic_path", "cache_dir", "check_output_dir", "check_output_path", "logging_above_bars", "make_output_dir"]


CACHE_ENV_VAR = "LAYERCRIT_CACHE_DIR"


def cache_dir() -> Path:
    """`$LAYERCRIT_CACHE_DIR`, or `~/.cache/layercrit` when unset or empty: where decoded data and
    converted models are cached."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "layercrit")


def _check_creatable(folder: Path, what: str) -> None:
    """`folder` exists as a folder, or can be created: its nearest existing ancestor is a folder."""
    for p in (folder, *folder.parents):
        if p.exists():
            if not p.is_dir():
                raise LayercritError(f"{what} {str(folder)!r} cannot be created: {str(p)!r} is a file")
            return


def check_output_path(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> Path:
    """Validate an output file path before any compute starts (its folder is created when written)."""
    path = Path(path)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise LayercritError(
            f"output file {str(path)!r} has an unsupported extension; expected one of {', '.join(suffixes)}"
        )
    if path.is_dir():
        raise LayercritError(f"output path {str(path)!r} is a folder; expected a file name")
    _check_creatable(path.parent, "output folder")
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """Validate an output folder before any compute starts: a folder, or creatable as one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LayercritError(f"output folder {str(path)!r} is a file; expected a folder")
    _check_creatable(path, "output folder")
    return path


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create an output folder and its parents (an existing one is fine)."""
    path = check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LayercritError(f"cannot create output folder {str(path)!r}: {e.strerror or e}") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    The folder of `path` is created if missing. On an exception the temporary file is removed and
    `path` is left as it was; an `OSError` (a full disk, no permission) becomes a `LayercritError`
    naming the file.
    """
    path = Path(path)
    tmp = None
    try:
        make_output_dir(path.parent if str(path.parent) else Path("."))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        os.close(fd)
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; outputs get the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(e, OSError):
            state = "left unchanged" if path.exists() else "not created"
            reason = f"[Errno {e.errno}] {e.strerror}" if e.strerror else str(e)
            raise LayercritError(f"could not write {str(path)!r} ({reason}); nothing was written, the file was {state}") from None
        raise


class _AboveBars(logging.Handler):
    """Writes records with `tqdm.write`: above any progress bar, which is then redrawn."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _prints_to_console(handler: logging.Handler) -> bool:
    if isinstance(handler, logging.FileHandler) or not isinstance(handler, logging.StreamHandler):
        return False
    # Ray's handler writes to whatever sys.stderr is when a record comes, not to the stream it holds.
    return (getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
            or type(handler).__name__ == "PlainRayHandler")


@contextlib.contextmanager
def logging_above_bars() -> Iterator[None]:
    """While inside, the console handlers of the root logger and of every logger that has its own
    (Ray's, …) print through `tqdm.write`, so a library's message never lands inside a progress bar's
    line. Loggers created inside the block are not covered: enter it after importing such libraries."""
    loggers = [logging.root] + [lg for lg in list(logging.root.manager.loggerDict.values())
                                if isinstance(lg, logging.Logger) and lg.handlers]
    saved = [(lg, lg.handlers) for lg in loggers]
    try:
        for lg, handlers in saved:
            console = [h for h in handlers if _prints_to_console(h)]
            if not console and not (lg is logging.root and not handlers):
                continue
            above = _AboveBars()
            if console:  # as the handler it replaces: its level, format and filters
                # (Ray's driver-side handler prints through a plain `%(message)s` handler it holds)
                shown = getattr(console[0], "plain_handler", console[0])
                above.setLevel(console[0].level)
                above.setFormatter(shown.formatter)
                above.filters = list(console[0].filters)
            else:  # a root logger without handlers prints WARNING and above (logging.lastResort): so does this
                above.setLevel(logging.WARNING)
            lg.handlers = [above] + [h for h in handlers if h not in console]
        yield
    finally:
        for lg, handlers in saved:
            lg.handlers = handlers


def plain_json(v):
    """A JSON-ready scalar: numpy scalars as Python values, NaN/NA as None."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def json_records(df: pd.DataFrame) -> list[dict]:
    # Not DataFrame.to_json: it rounds floats to 10 digits.
    return [{k: plain_json(v) for k, v in row.items()} for row in df.to_dict(orient="records")]
