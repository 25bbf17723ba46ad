"""Export a results store as one tidy file (CSV or Parquet) for analysis elsewhere.

Measured values keep the results' scale (criticality and accuracy as fractions 0..1); each model's
category and the zoo's free metadata follow, the metadata as written in the zoo and prefixed `meta_`
(`meta_accuracy` in % by convention), so it cannot be mistaken for a measured column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pandas as pd

from .._utils.io import atomic_path, check_output_path
from ..errors import LayercritError
from .compare import META
from .store import Store

__all__ = ["export"]

FORMATS = {"csv": ".csv", "parquet": ".parquet"}
# The unit's identity first, then what was measured, then provenance.
LEADING = ["model", "category", "layer", "label", "probe", "target", "trial", "seed", "criticality", "accuracy", "top5",
           "accuracy_drop", "agreement", "l1", "l2", "kl", "loss", "n", "n_params"]
# Columns of `Store.models()` that describe how a model was run, not the zoo's free metadata.
_MODEL_INFO = {"model", "category", "spec", "weights", "data", "data_identity", "n"}


def _metadata(models: pd.DataFrame) -> pd.DataFrame:
    """`model` and the free metadata as `meta_<key>` columns, each of one type (Parquet needs that)."""
    meta = models[["model", *[c for c in models.columns if c not in _MODEL_INFO]]].copy()
    for col in meta.columns[1:]:
        values = meta[col]
        if values.map(lambda v: isinstance(v, (list, dict))).any():  # TOML arrays and tables
            meta[col] = values.map(lambda v: json.dumps(v) if isinstance(v, (list, dict)) else v)
        kind = pd.api.types.infer_dtype(meta[col], skipna=True)
        if kind not in ("string", "integer", "floating", "mixed-integer-float", "boolean", "empty"):
            meta[col] = meta[col].map(lambda v: v if v is None or (isinstance(v, float) and v != v) else str(v))
    return meta.rename(columns=lambda c: c if c == "model" else META + str(c))


def export(store: Store, fmt: Literal["csv", "parquet"], out: str | Path, probe: str | None = None) -> Path:
    """Write every stored unit (or those of one probe) as one row, with its model's category and
    the zoo's metadata (`meta_<key>`).

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
    models = store.models()
    table = table.merge(models[["model", "category"]], on="model", how="left")
    table = table[LEADING + [c for c in table.columns if c not in LEADING]]
    table = table.merge(_metadata(models), on="model", how="left")
    with atomic_path(path) as tmp:
        if fmt == "csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False, engine="pyarrow")
    return path
