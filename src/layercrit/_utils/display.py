"""How numbers are shown to people: fractions as %, rounding noise as 0, p-values, text tables and bars."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pandas as pd


def bar(value: float, width: int = 20) -> str:
    if not math.isfinite(value):
        return " " * width
    filled = max(0.0, min(1.0, value)) * width
    full = int(filled)
    return ("█" * full + ("▌" if filled - full >= 0.5 else "")).ljust(width, "·")


def text_table(df: pd.DataFrame, formats: dict[str, Callable] | None = None, titles: dict[str, str] | None = None,
           digits: int = 4) -> str:
    """`df` as text: floats to `digits` significant digits (rounding noise prints as 0), NaN as "—",
    columns in `formats` by their own function, then renamed by `titles`."""
    def number(v) -> str:
        if pd.isna(v):
            return "—"
        return "0" if abs(v) < 1e-12 else f"{v:.{digits}g}"

    shown = df.copy()
    for col in shown.columns:
        fn = (formats or {}).get(col)
        if fn is not None:
            shown[col] = shown[col].map(fn)
        elif pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(number)
    return shown.rename(columns=titles or {}).to_string(index=False)


def listing(values, limit: int = 12) -> str:
    values = [str(v) for v in values]
    if not values:
        return "(none)"
    return ", ".join(values[:limit]) + (f", … ({len(values)} in all)" if len(values) > limit else "")


def format_number(value, digits: int = 2, *, scale: float = 1.0, sign: bool = False, missing: str = "—") -> str:
    """`value × scale` with `digits` decimals; NaN/None print as `missing` and anything that rounds
    to zero as "0" (no "3.1e-18" or "-0.00" from floating-point noise)."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return missing
    x = float(value) * scale
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if abs(x) < 0.5 * 10.0**-digits:
        return "0"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def format_percent(fraction, digits: int = 2, **kw) -> str:
    """A fraction 0..1 shown in % (without the sign), as `format_number`."""
    return format_number(fraction, digits, scale=100.0, **kw)


def format_p(p, digits: int = 3, missing: str = "—") -> str:
    """A p-value: `digits` decimals, and "<0.001" (for 3 digits) below display precision."""
    if p is None or p is pd.NA or (isinstance(p, (float, np.floating)) and math.isnan(p)):
        return missing
    floor = 10.0**-digits
    return f"<{floor:.{digits}f}" if float(p) < floor else f"{float(p):.{digits}f}"
