"""Import the results of Gavrikov et al.'s reference implementation (`paulgavrikov/layer_criticality`).

Its results CSV (written by `convert_pt_checkpoints_to_csv.py`) has one row per (model, layer,
trial): `top1_acc, top5_acc, loss, batch_acc, layer, pred_cos_sim, pred_l1_err, pred_l2_err,
pred_ce_loss, trial, recovered_acc, model_id`, accuracies in percent, the unmodified model's row
already removed. Criticality is 1 − pred_cos_sim (cosine similarity of the softmax outputs), exactly
our measure, so imported rows sit beside our own in the store and `summarize` compares both.
Layer names there carry the normalization wrapper's prefix (`model.layer1.0.conv1`); the labels are
computed without it.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import LayercritError
from ..units.labels import BLOCK_LABEL, gavrikov_label
from .store import Store

__all__ = ["UNKNOWN_CATEGORY", "import_reference", "read_reference"]

PROBE = "rerandomize"
# Columns that map onto the store's measures; the reference CSV has them all.
REQUIRED = ["model_id", "layer", "trial", "pred_cos_sim", "top1_acc", "top5_acc", "loss", "pred_l1_err", "pred_l2_err"]
# Kept in each row's `extra` when present (batch_acc is empty unless the run logged batches).
EXTRA = ["batch_acc", "pred_ce_loss", "recovered_acc"]
_NUMERIC = ["trial", "pred_cos_sim", "top1_acc", "top5_acc", "loss", "pred_l1_err", "pred_l2_err", "pred_ce_loss",
            "recovered_acc"]
_TOL = 1e-6
# Category of a model that has results but no metadata row.
UNKNOWN_CATEGORY = "unknown"


def _read_csv(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise LayercritError(f"{what} {str(path)!r} does not exist")
    try:
        # Ids stay text: "1.0" must not become 1.
        return pd.read_csv(path, dtype={"model_id": str, "layer": str, "category": str}, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise LayercritError(f"cannot read {what} {str(path)!r} as CSV: {str(e).splitlines()[0]}") from None


def _require(df: pd.DataFrame, columns: list[str], what: str, path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayercritError(f"{what} {str(path)!r} lacks columns {', '.join(missing)}; "
                             f"columns present: {', '.join(map(str, df.columns))}")


def _numbers(df: pd.DataFrame, col: str, path: Path) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = df[col].notna() & values.isna()
    if bad.any():
        i = bad.idxmax()
        # +2: the header is line 1 and the index counts from 0.
        raise LayercritError(f"reference results {str(path)!r} line {i + 2}: {col} {df[col][i]!r} is not a number")
    return values.astype(float)


def _label_fn(names: list[str]):
    """Gavrikov's labels if the names are a torchvision ResNet's (under some wrapper prefix), else the name."""
    names_set = set(names)
    for name in names:
        if name == "fc" or name.endswith(".fc"):
            prefix = name[: -len("fc")]
            if prefix + "conv1" in names_set and any(
                    n.startswith(prefix) and BLOCK_LABEL.match(n[len(prefix):]) for n in names):
                return lambda n: gavrikov_label(n[len(prefix):]) if n.startswith(prefix) else n
    return lambda n: n


def read_reference(results_csv: str | Path, metadata_csv: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and check a reference results CSV and its model metadata.

    Args:
        results_csv: the reference implementation's results (columns as in the module docstring).
        metadata_csv: one row per model: `model_id`, `category` and any further columns
            (e.g. `accuracy`), which become free metadata. A model with results but no row gets
            category "unknown" and no metadata, with one warning naming all such models.

    Returns:
        (results, models): results as rows in the store's column names plus the extra fields
        `batch_acc`, `pred_ce_loss`, `recovered_acc`; models with `model`, `category` and the
        other metadata columns.
    """
    rows, models, _ = _read(results_csv, metadata_csv)
    return rows, models


def _read(results_csv: str | Path, metadata_csv: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """`read_reference`, plus the models that had no metadata row."""
    results_csv, metadata_csv = Path(results_csv), Path(metadata_csv)
    raw = _read_csv(results_csv, "reference results")
    meta = _read_csv(metadata_csv, "model metadata")
    _require(raw, REQUIRED, "reference results", results_csv)
    _require(meta, ["model_id", "category"], "model metadata", metadata_csv)
    if raw.empty:
        raise LayercritError(f"reference results {str(results_csv)!r} has no rows")

    for col in ("model_id", "layer"):
        empty = raw[col].isna()
        if empty.any():
            raise LayercritError(f"reference results {str(results_csv)!r} line {empty.idxmax() + 2}: {col} is empty")
    num = {c: _numbers(raw, c, results_csv) for c in _NUMERIC if c in raw.columns}
    for col in ("trial", "pred_cos_sim"):
        if num[col].isna().any():
            raise LayercritError(f"reference results {str(results_csv)!r} line {num[col].isna().idxmax() + 2}: "
                                 f"{col} is empty")
    fractional = num["trial"] != np.round(num["trial"])
    if fractional.any():
        raise LayercritError(f"reference results {str(results_csv)!r} line {fractional.idxmax() + 2}: trial "
                             f"{float(num['trial'][fractional.idxmax()])!r} is not a whole number")
    for col, lo, hi, unit in (("top1_acc", 0, 100, "a percentage"), ("top5_acc", 0, 100, "a percentage"),
                              ("pred_cos_sim", -1, 1, "a cosine similarity")):
        out = (num[col] < lo - _TOL) | (num[col] > hi + _TOL)
        if out.any():
            i = out.idxmax()
            raise LayercritError(f"reference results {str(results_csv)!r} line {i + 2}: {col} {float(num[col][i])!r} is "
                                 f"outside {lo}..{hi}; expected {unit}")

    meta = meta.rename(columns={"model_id": "model"})
    if meta["model"].isna().any():
        raise LayercritError(f"model metadata {str(metadata_csv)!r} line {meta['model'].isna().idxmax() + 2}: "
                             f"model_id is empty")
    dup = meta["model"][meta["model"].duplicated()]
    if len(dup):
        raise LayercritError(f"model metadata {str(metadata_csv)!r} lists model {dup.iloc[0]!r} twice")
    missing = [m for m in dict.fromkeys(raw["model_id"]) if m not in set(meta["model"])]
    if missing:
        # The published results hold a model the paper's analysis leaves out (resnet50_frozen_random):
        # its rows are kept, under a category that says so, and left out of metadata statistics.
        warnings.warn(f"model metadata {str(metadata_csv)!r} has no row for models {', '.join(missing)}; "
                      f"imported with category {UNKNOWN_CATEGORY!r} and no metadata", stacklevel=2)
        meta = pd.concat([meta, pd.DataFrame({"model": missing, "category": UNKNOWN_CATEGORY})], ignore_index=True)
    meta = meta[["model", "category", *[c for c in meta.columns if c not in ("model", "category")]]]

    rows = pd.DataFrame({
        "model": raw["model_id"], "layer": raw["layer"], "label": raw["layer"], "probe": PROBE, "target": PROBE,
        "trial": num["trial"].astype("int64"), "seed": pd.array([pd.NA] * len(raw), dtype="Int64"),
        "criticality": 1.0 - num["pred_cos_sim"], "accuracy": num["top1_acc"] / 100, "top5": num["top5_acc"] / 100,
        "l1": num["pred_l1_err"], "l2": num["pred_l2_err"], "loss": num["loss"],
    })
    for idx in rows.groupby("model", sort=False).groups.values():
        label = _label_fn(list(dict.fromkeys(rows.loc[idx, "layer"])))
        rows.loc[idx, "label"] = rows.loc[idx, "layer"].map(label)
    for col in EXTRA:
        if col in raw.columns:
            rows[col] = num.get(col, raw[col])
    return rows, meta.reset_index(drop=True), missing


def _metadata_dict(row: dict) -> dict:
    """Free metadata as plain JSON values; empty cells are left out."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "item"):
            v = v.item()
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        out[str(k)] = v
    return out


def import_reference(results_csv: str | Path, metadata_csv: str | Path, store: Store) -> int:
    """Put the reference results and their models into `store`.

    The rows are stored under the configuration `reference:<first 16 hex digits of the sha256 of the
    results file>`, so importing the same file again adds nothing.

    Returns:
        The number of result rows added.
    """
    results, models, no_metadata = _read(results_csv, metadata_csv)
    digest = hashlib.sha256(Path(results_csv).read_bytes()).hexdigest()[:16]
    known = store.models()
    # A model a sweep described (spec/weights) keeps its description: put_model would overwrite it whole.
    described = set(known.loc[known["spec"].notna() | known["weights"].notna(), "model"])
    # A model without a metadata row this time keeps whatever the store already says about it.
    placeholder = set(no_metadata) & set(known["model"])
    for rec in models.to_dict(orient="records"):
        model, category = str(rec.pop("model")), rec.pop("category")
        if model in placeholder:
            continue
        if model in described:
            warnings.warn(f"model {model!r} is already described in the store; its description is kept and the "
                          f"reference metadata not applied", stacklevel=2)
            continue
        store.put_model(model, None if pd.isna(category) else str(category), _metadata_dict(rec))
    return store.add_results(results.to_dict(orient="records"), f"reference:{digest}")
