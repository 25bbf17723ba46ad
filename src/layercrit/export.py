"""Export a results store as one tidy file (CSV or Parquet) for analysis elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from .errors import LayercritError
from .io import atomic_path, check_output_path
from .store import Store

__all__ = ["export"]

FORMATS = {"csv": ".csv", "parquet": ".parquet"}
# The unit's identity first, then what was measured, then provenance.
LEADING = ["model", "category", "layer", "label", "probe", "target", "trial", "seed", "criticality", "accuracy", "top5",
           "accuracy_drop", "agreement", "l1", "l2", "kl", "loss", "n", "n_params"]


def export(store: Store, fmt: Literal["csv", "parquet"], out: str | Path, probe: str | None = None) -> Path:
    """Write every stored unit (or those of one probe) as one row, with its model's category.

    Args:
        store: the results store.
        fmt: "csv" or "parquet" (Parquet needs pyarrow).
        out: output file, ending in `.csv` or `.parquet` to match `fmt`.
        probe: only this probe's rows (the unmodified model's rows have probe "none").

    Returns:
        The path written.
    """
    if fmt not in FORMATS:
        raise LayercritError(f"Expected `fmt` to be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = check_output_path(out, (FORMATS[fmt],))
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise LayercritError("writing Parquet needs pyarrow: pip install 'layercrit[parquet]'") from None
    table = store.results(probe=probe)
    if table.empty:
        present = sorted(set(store.results()["probe"]))
        what = "no results" if probe is None else f"no results for probe {probe!r}"
        raise LayercritError(f"{what} in results store {str(store.path)!r}; probes present: {', '.join(present) or '(none)'}")
    categories = store.models()[["model", "category"]]
    table = table.merge(categories, on="model", how="left")
    table = table[LEADING + [c for c in table.columns if c not in LEADING]]
    with atomic_path(path) as tmp:
        if fmt == "csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False, engine="pyarrow")
    return path
