"""The one exception type users see: a wrong input, explained in one line."""

from __future__ import annotations

__all__ = ["LayercritError"]


class LayercritError(ValueError):
    """Bad input to a user-facing entry point.

    The message is one line saying what is wrong and what would be right; the CLI prints it
    without a traceback and exits non-zero.
    """
