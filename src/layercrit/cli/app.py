"""Command-line interface: a thin layer that parses, calls the library and prints.

Bad input is answered with one line `layercrit: error: …` and exit status 2; an unexpected
failure with one line and exit status 1 (set LAYERCRIT_DEBUG=1 for the traceback). Ctrl-C
(SIGINT) and SIGTERM stop any command the same way: one line `layercrit: interrupted …`, exit
status 130, finished results kept (a sweep's committed work items, a run's saved checkpoints)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Sequence

from .._utils.io import logging_above_bars
from .._version import __version__
from ..errors import LayercritError
from ._args import _Parser
from .commands import add_parsers


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layercrit", description="Which layers of a trained network its decisions depend on.")
    parser.add_argument("--version", action="version", version=f"layercrit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parsers(sub)
    return parser


# What an interrupted command keeps, said on its one `interrupted` line.
_INTERRUPTED = {
    "sweep": lambda a: f"; the finished work items are in {str(a.store)!r}: run the same command again to do the rest",
    "train": lambda a: f"; the saved checkpoints are in {str(a.out)!r}: add --resume to continue",
}


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a command exactly as Ctrl-C does: cleanup runs, one line, exit 130


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"layercrit: warning: {message}", file=sys.stderr)  # above any progress bar, not inside it


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 internal error or failed models, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = None
    main_thread = _is_main_thread()  # signal handlers can only be set there (tests may call main in a thread)
    previous = signal.signal(signal.SIGTERM, _sigterm) if main_thread else None
    try:
        args = parser.parse_args(argv)
        # Log records of libraries (Ray, transformers, …) and warnings print above progress bars.
        with warnings.catch_warnings(), logging_above_bars():
            warnings.simplefilter("default")
            warnings.showwarning = _warn
            return args.fn(args)
    except LayercritError as e:
        print(f"layercrit: error: {e.message}", file=sys.stderr)
        for problem in e.problems:
            print(f"layercrit: error:   - {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _INTERRUPTED.get(getattr(args, "command", None))
        print(f"layercrit: interrupted{hint(args) if hint else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line unless debugging
        if os.environ.get("LAYERCRIT_DEBUG"):
            raise
        print(f"layercrit: internal error: {type(e).__name__}: {e} (set LAYERCRIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
