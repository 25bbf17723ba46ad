"""The one exception type users see: a wrong input, explained in one line."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["LayercritError", "check_int"]


class LayercritError(ValueError):
    """Bad input to a user-facing entry point.

    The message is one line saying what is wrong and what would be right; the CLI prints it
    without a traceback and exits non-zero. Input with several independent problems (a zoo file)
    carries them in `problems`, one line each.
    """

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.message, self.problems = message, list(problems)
        super().__init__("\n".join([message, *(f"  - {p}" for p in self.problems)]))


def check_int(name: str, value: object, low: int = 1, expected: str | None = None) -> None:
    """Raise a `LayercritError` unless `value` is an int (not a bool) of at least `low`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        expected = expected or {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer ≥ {low}")
        raise LayercritError(f"Expected `{name}` to be {expected}, got {value!r}")
