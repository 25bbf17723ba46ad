"""Tidy results: one row per (model, layer, probe, trial) with its seed, plus summaries."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ._utils.io import atomic_path, check_output_path
from .errors import LayercritError

UNMODIFIED = "(unmodified)"


KEYS = ["model", "layer", "label", "probe"]


ROW_COLUMNS = ["model", "layer", "label", "probe", "target", "trial", "seed", "n", "n_params"]


VALUE_COLUMNS = ["criticality", "accuracy", "top5", "accuracy_drop", "agreement", "l1", "l2", "kl", "loss", "rel_l2",
                 "perplexity"]


# Per row, not averaged over trials: the output adapter (layercrit.outputs), how many compared rows
# (samples or tokens) had a non-finite output and were left out of the means, and a note saying so.
INFO_COLUMNS = ["output", "n_nonfinite", "note"]


# Adaptive sampling (layercrit.adaptive) only: the trials the row's unit took and the 95 % half-width
# of its mean criticality over those trials and its `n` images.
ADAPTIVE_COLUMNS = ["trials_used", "half_width"]


def summarize_trials(table: pd.DataFrame, keys: list[str] | None = None, measures: list[str] | None = None) -> pd.DataFrame:
    """Per group of `keys`: mean, std (ddof=1), standard error std/√T and a t-based 95 % CI per measure.

    Groups keep their first-seen order. With a single trial std, sem and the CI are NaN. Rows of
    adaptive sampling (a `half_width` column) also give `n` (images) and `half_width`, and the
    criticality CI is mean ± half_width: the interval over trials *and* images (`layercrit.adaptive`).
    """
    from scipy import stats  # deferred: scipy.stats costs a second at import

    keys = [k for k in (keys or KEYS + ["target", "shift"]) if k in table.columns]  # shift: layercrit.shifts
    measures = [m for m in (measures or VALUE_COLUMNS) if m in table.columns]
    adaptive = "half_width" in table.columns and table["half_width"].notna().any()  # layercrit.adaptive
    rows = []
    for key, g in table.groupby(keys, sort=False, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        t = len(g)
        row["trials"] = t
        for m in measures:
            v = g[m].to_numpy(dtype=float)
            mean = float(np.mean(v))
            std = float(np.std(v, ddof=1)) if t > 1 else math.nan
            sem = std / math.sqrt(t) if t > 1 else math.nan
            half = float(stats.t.ppf(0.975, t - 1)) * sem if t > 1 else math.nan
            row |= {f"{m}_mean": mean, f"{m}_std": std, f"{m}_sem": sem, f"{m}_ci_low": mean - half, f"{m}_ci_high": mean + half}
        if adaptive:
            h = float(g["half_width"].iloc[0])
            row |= {"n": int(g["n"].iloc[0]), "half_width": h}
            if "criticality_mean" in row and not math.isnan(h):
                row |= {"criticality_ci_low": row["criticality_mean"] - h, "criticality_ci_high": row["criticality_mean"] + h}
        rows.append(row)
    return pd.DataFrame(rows)


def save_table(table: pd.DataFrame, path: str | Path, config: dict | None = None,
               extra: dict[str, pd.DataFrame] | None = None) -> Path:
    """Write a tidy table atomically: `.csv` with the config in `<stem>.config.json` beside it, or
    `.json` holding `{"config", "rows", **extra}`. With `config=None` no config file is written."""
    path = check_output_path(path, (".csv", ".json"))
    if path.suffix.lower() == ".csv":
        with atomic_path(path) as tmp:  # the table lands only after its config: a failed write of either leaves no table
            table.to_csv(tmp, index=False)
            if config is not None:
                with atomic_path(path.with_suffix(".config.json")) as tmp_config:
                    tmp_config.write_text(json.dumps(config, indent=2, default=str))
        return path
    doc = {"config": config or {}, "rows": json.loads(table.to_json(orient="records"))}
    doc |= {k: json.loads(v.to_json(orient="records")) for k, v in (extra or {}).items()}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2, default=str))
    return path


@dataclass
class CriticalityResult:
    """Result of `layercrit.measure`.

    Attributes:
        table: tidy DataFrame, one row per (layer, probe, trial) plus one for the unmodified model.
        config: the resolved configuration (saved next to the results).
    """

    table: pd.DataFrame
    config: dict = field(default_factory=dict)

    def summary(self) -> pd.DataFrame:
        """Per (layer, probe): mean, std, standard error and 95 % CI of each measure over trials."""
        return summarize_trials(self.table)

    def save(self, path: str | Path) -> Path:
        """Write the table as `.csv` (config in a `.config.json` beside it) or `.json` (config, rows, summary)."""
        return save_table(self.table, path, self.config, {"summary": self.summary()})

    @classmethod
    def load(cls, path: str | Path) -> CriticalityResult:
        """Read a result written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise LayercritError(f"results file {str(path)!r} does not exist")
        try:
            if path.suffix.lower() == ".json":
                doc = json.loads(path.read_text())
                return cls(pd.DataFrame(doc["rows"]), doc.get("config", {}))
            table = pd.read_csv(path)
        except (ValueError, KeyError, OSError) as e:
            raise LayercritError(f"cannot read results file {str(path)!r}: {e}") from None
        config_path = path.with_suffix(".config.json")
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        missing = {"layer", "probe", "criticality"} - set(table.columns)
        if missing:
            raise LayercritError(f"results file {str(path)!r} lacks columns {', '.join(sorted(missing))}")
        return cls(table, config)


def result_row(model, layer, label, probe, target, trial, seed, n, n_params, values, base, output: str = "") -> dict:
    row = {"model": model, "layer": layer, "label": label, "probe": probe, "target": target, "trial": trial,
           "seed": seed, "n": n, "n_params": n_params}
    row |= {k: values[k] for k in VALUE_COLUMNS if k in values}
    row["accuracy_drop"] = base["accuracy"] - values["accuracy"]
    # Perplexity of the mean next-token loss (exp of the mean, not the mean of exps); a trial mean
    # in `summary()` is then the mean of the trials' perplexities.
    loss = values["loss"]
    row["perplexity"] = (math.exp(loss) if loss <= 709.0 else math.inf) \
        if output.startswith("next-token") and not math.isnan(loss) else math.nan
    bad = values.get("n_nonfinite", 0)
    row["output"] = output
    row["n_nonfinite"] = bad
    row["note"] = (f"output non-finite on {bad} of {values.get('n_rows')} compared rows; measures are means over the others"
                   if bad else "")
    return row


CLEAN = "none"  # the `shift` of the unshifted data
