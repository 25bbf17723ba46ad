"""Cross-model analysis of stored results: Gavrikov et al.'s average criticality per model, per layer
and per training category, the spread over trials, differences to a baseline model, and rank
correlations of average criticality with model metadata (Spearman's R, Kendall's τ).

Criticality and measured accuracy are fractions 0..1 here, as in the results (`format_comparison`
shows them in %); the zoo's metadata is kept as written, in columns prefixed `meta_` (its
`accuracy` and `top5` in % by convention). A model's average criticality is the mean over its
layers of the mean over trials. The marginal standard deviations (per model over layers, per layer
over models) are population std (ddof=0) as in the reference notebook's heatmap margins; the spread
over trials is the sample std (ddof=1), which the paper's Fig. 5 shows under the name "standard
error", so the real standard error std/√T is given next to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .._utils.display import format_number, format_p, format_percent, listing
from .._utils.io import json_records, plain_json
from .._utils.stats import rank_correlation
from ..errors import LayercritError
from ..results import UNMODIFIED
from .store import Store

BASE_ACCURACY = "base_accuracy"


META = "meta_"  # prefix of the zoo's metadata columns in tables and exports


PERCENT_METADATA = ("accuracy", "top5")  # metadata written in % (the zoo's and the reference's convention)


_CORRELATION_COLUMNS = ["against", "subset", "n", "spearman_r", "spearman_p", "kendall_tau", "kendall_p", "note"]


@dataclass
class Comparison:
    """Result of `summarize`: tidy tables, criticality and measured accuracy as fractions 0..1.

    Attributes:
        models: per model: model, category, avg_criticality, std_criticality (over layers), n_layers,
            trials (most trials of any layer), the `by` metadata columns as written in the zoo
            (`meta_accuracy`, …) and base_accuracy (measured).
        layers: per layer label: mean and std across models of the per-model mean, n_models.
        categories: per category: avg_criticality (mean over its models), n_models.
        category_layers: per (category, label): mean criticality, n_models.
        spread: per (model, layer): trials, mean, std over trials (ddof=1) and sem = std/√T.
        correlations: per (`by` column, subset): n, spearman_r, spearman_p, kendall_tau, kendall_p and
            a note where a value is undefined or n is too small for its p-value to mean much.
        baseline_diff: per (model, layer) of every non-baseline model: its mean minus the baseline's.
        probe: the probe summarized.
        baseline: the baseline model id, if any.
    """

    models: pd.DataFrame
    layers: pd.DataFrame
    categories: pd.DataFrame
    category_layers: pd.DataFrame
    spread: pd.DataFrame
    correlations: pd.DataFrame
    baseline_diff: pd.DataFrame = field(default_factory=pd.DataFrame)
    probe: str = "rerandomize"
    baseline: str | None = None

    def to_json(self) -> dict:
        """Plain-JSON document: one list of records per table (NaN becomes null)."""
        return {name: json_records(getattr(self, name))
                for name in ("models", "layers", "categories", "spread", "correlations", "baseline_diff")}


def _as_tuple(v: str | Sequence[str] | None) -> tuple[str, ...]:
    if v is None:
        return ()
    return (v,) if isinstance(v, str) else tuple(v)


def _load(source: Store | pd.DataFrame, models: pd.DataFrame | None) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(results, per-model metadata, where the results come from)."""
    if isinstance(source, Store):
        return source.results(), source.models() if models is None else models, f"results store {str(source.path)!r}"
    if not isinstance(source, pd.DataFrame):
        raise LayercritError(f"Expected a Store or a results DataFrame to summarize, got {type(source).__name__}")
    missing = [c for c in ("model", "layer", "probe", "criticality") if c not in source.columns]
    if missing:
        raise LayercritError(f"results table lacks columns {', '.join(missing)}; columns present: {listing(source.columns)}")
    if models is None:
        # A table exported with `layercrit export` carries each model's category and metadata.
        cols = [c for c in source.columns if c in ("model", "category") or str(c).startswith(META)]
        models = source[cols].drop_duplicates("model").rename(columns=lambda c: str(c).removeprefix(META))
    return source, models, "the results table"


def _select(table: pd.DataFrame, probe: str, target: str | None, where: str) -> pd.DataFrame:
    """The probe's layer rows, checked to hold one target and each unit once."""
    rows = table[(table["probe"] == probe) & (table["layer"] != UNMODIFIED)].copy()
    if rows.empty:
        present = sorted({str(p) for p in table["probe"].dropna()} - {"none"})
        raise LayercritError(f"no results for probe {probe!r} in {where}; probes present: {listing(present)}")
    if "target" in rows.columns:
        targets = list(dict.fromkeys(rows["target"].fillna("")))
        if target is not None:
            if target not in targets:
                raise LayercritError(f"no results for probe {probe!r} with target {target!r} in {where}; "
                                     f"targets present: {listing(targets)}")
            rows = rows[rows["target"].fillna("") == target]
        elif len(targets) > 1:
            # Averaging, say, a reset to epoch 0 with one to epoch 10 would mean nothing.
            raise LayercritError(f"probe {probe!r} has {len(targets)} targets in {where} ({listing(targets)}); "
                                 f"choose one with target=")
    if "trial" not in rows.columns:
        rows["trial"] = rows.groupby(["model", "layer"], sort=False).cumcount()
    unit = ["model", "layer", "trial"]
    dup = rows.duplicated(unit, keep=False)
    if dup.any():
        # Within one configuration the store's key forbids this, so it means several configurations.
        first = rows[dup].iloc[0]
        same = rows[dup & (rows["model"] == first["model"])]
        configs = same["config_hash"].dropna().unique() if "config_hash" in same.columns else []
        how = f" (configurations {listing(configs)})" if len(configs) else ""
        raise LayercritError(f"model {first['model']!r} has {len(same)} rows for repeated units, e.g. layer "
                             f"{first['layer']!r} trial {first['trial']}{how}; summarize one configuration at a time")
    rows["label"] = rows["label"].fillna(rows["layer"]) if "label" in rows.columns else rows["layer"]
    return rows


def _by_column(name: str) -> str:
    """The models-table column of a `by` name: `meta_<name>` for metadata, `base_accuracy` as is."""
    return name if name == BASE_ACCURACY else META + name.removeprefix(META)


def _metadata(meta: pd.DataFrame, model_ids: list[str], by: tuple[str, ...], base_acc: pd.Series) -> pd.DataFrame:
    """Per model (in `model_ids` order): category and the numeric `by` columns (as `meta_<name>`)."""
    if "model" not in meta.columns:
        raise LayercritError(f"model metadata lacks a 'model' column; columns present: {listing(meta.columns)}")
    meta = meta.drop_duplicates("model").set_index("model")
    out = pd.DataFrame(index=pd.Index(model_ids, name="model"))
    out["category"] = meta["category"].reindex(model_ids).astype(object) if "category" in meta.columns else None
    for col in by:
        if col == BASE_ACCURACY:
            continue
        col = col.removeprefix(META)
        if col not in meta.columns:
            present = [c for c in meta.columns if c != "category"]
            raise LayercritError(f"`by` column {col!r} is not in the model metadata; columns present: "
                                 f"{listing(present)} (and {BASE_ACCURACY}, measured)")
        raw = meta[col].reindex(model_ids)
        values = pd.to_numeric(raw, errors="coerce")
        bad = raw.notna() & values.isna()
        if bad.any():
            raise LayercritError(f"`by` column {col!r} must be numeric, but model {bad.idxmax()!r} has "
                                 f"{raw[bad.idxmax()]!r}")
        out[META + col] = values.astype(float)
    out[BASE_ACCURACY] = base_acc.reindex(model_ids).astype(float)
    return out.reset_index()


def summarize(
    store_or_table: Store | pd.DataFrame,
    models: pd.DataFrame | None = None,
    *,
    probe: str = "rerandomize",
    target: str | None = None,
    by: str | Sequence[str] = ("accuracy",),
    exclude_categories: str | Sequence[str] = (),
    baseline: str | None = None,
) -> Comparison:
    """Compare the layer criticality of several models.

    Args:
        store_or_table: a results `Store`, or a tidy results DataFrame (one row per unit).
        models: per-model metadata with columns `model`, `category`, …; default: the store's models
            (for a table: its `category` column, if any).
        probe: the probe whose results are compared.
        target: the probe's target, needed when its results hold several (reinit to several epochs).
        by: numeric metadata columns to correlate average criticality with (`accuracy` or
            `meta_accuracy`: the zoo's; `base_accuracy`: the measured accuracy of the unmodified model).
            In the models table and the correlations they are named `meta_<name>`.
        exclude_categories: categories left out of extra correlation subsets, one subset per
            category and, for several, one without all of them (the paper: without adversarial).
        baseline: model id whose per-layer criticality is subtracted from every other model's.

    Returns:
        A `Comparison` of tidy tables.
    """
    by, exclude = tuple(dict.fromkeys(_as_tuple(by))), _as_tuple(exclude_categories)
    table, meta, where = _load(store_or_table, models)
    rows = _select(table, probe, target, where)
    base_rows = table[table["layer"] == UNMODIFIED]
    base_acc = (base_rows.groupby("model")["accuracy"].mean() if "accuracy" in base_rows.columns
                else pd.Series(dtype=float))

    # Per (model, layer): statistics over trials, in first-seen order.
    crit = rows.assign(criticality=pd.to_numeric(rows["criticality"], errors="coerce"))
    g = crit.groupby(["model", "layer"], sort=False)
    cell = g.agg(label=("label", "first"), trials=("criticality", "count"), mean=("criticality", "mean"),
                 std=("criticality", "std")).reset_index()
    cell["sem"] = cell["std"] / np.sqrt(cell["trials"].where(cell["trials"] > 0))
    model_ids = list(dict.fromkeys(cell["model"]))
    info = _metadata(meta, model_ids, by, base_acc)
    category = dict(zip(info["model"], info["category"]))
    cell.insert(1, "category", cell["model"].map(category).astype(object))

    per_model = cell.groupby("model", sort=False).agg(
        avg_criticality=("mean", "mean"), std_criticality=("mean", lambda s: s.std(ddof=0)),
        n_layers=("mean", "count"), trials=("trials", "max"),
    ).reset_index()
    summary = info[["model", "category"]].merge(per_model, on="model")
    by_cols = list(dict.fromkeys(_by_column(c) for c in by))
    summary = summary.merge(info[["model", *[c for c in by_cols if c != BASE_ACCURACY], BASE_ACCURACY]], on="model")

    layers = cell.groupby("label", sort=False)["mean"].agg(
        mean="mean", std=lambda s: s.std(ddof=0), n_models="count").reset_index()
    cats = summary.groupby("category", sort=False, dropna=False).agg(
        avg_criticality=("avg_criticality", "mean"), n_models=("model", "count")).reset_index()
    cat_layers = cell.groupby(["category", "label"], sort=False, dropna=False).agg(
        mean=("mean", "mean"), n_models=("model", "count")).reset_index()

    present = [c for c in dict.fromkeys(summary["category"]) if isinstance(c, str)]
    unknown = [c for c in exclude if c not in present]
    if unknown:
        raise LayercritError(f"unknown categories to exclude: {', '.join(map(repr, unknown))}; "
                             f"categories present: {listing(present)}")
    subsets = [("all", summary)] + [(f"excluding {c}", summary[summary["category"] != c]) for c in exclude]
    if len(exclude) > 1:
        subsets.append((f"excluding {', '.join(exclude)}", summary[~summary["category"].isin(exclude)]))
    corr = pd.DataFrame(
        [{"against": col, "subset": name,
          **rank_correlation(sub["avg_criticality"].to_numpy(float), sub[col].to_numpy(float))}
         for col in by_cols for name, sub in subsets],
        columns=_CORRELATION_COLUMNS,
    )

    diff = pd.DataFrame(columns=["model", "category", "layer", "label", "criticality", "baseline_criticality", "diff"])
    if baseline is not None:
        if baseline not in model_ids:
            raise LayercritError(f"baseline model {baseline!r} has no results for probe {probe!r} in {where}; "
                                 f"models present: {listing(model_ids)}")
        # Matched on the label, so results of the same architecture under other module prefixes line up.
        ref = cell.loc[cell["model"] == baseline, ["label", "mean"]].rename(columns={"mean": "baseline_criticality"})
        diff = cell[cell["model"] != baseline].merge(ref, on="label", how="inner")
        diff = diff.rename(columns={"mean": "criticality"})
        diff["diff"] = diff["criticality"] - diff["baseline_criticality"]
        diff = diff[["model", "category", "layer", "label", "criticality", "baseline_criticality", "diff"]]

    spread = cell[["model", "category", "layer", "label", "trials", "mean", "std", "sem"]]
    return Comparison(models=summary, layers=layers, categories=cats, category_layers=cat_layers, spread=spread,
                      correlations=corr, baseline_diff=diff.reset_index(drop=True), probe=probe, baseline=baseline)


def _fmt(v, spec: str = ".1f") -> str:
    v = plain_json(v)
    return "—" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def column_title(col: str) -> str:
    """How a models-table column is titled where people read it (values as `readable_models` gives them)."""
    if col == BASE_ACCURACY:
        return "accuracy % (measured)"
    if col.startswith(META):
        name = col.removeprefix(META)
        return f"{name} % (zoo)" if name in PERCENT_METADATA else f"{name} (zoo)"
    return {"avg_criticality": "avg criticality %", "std_criticality": "std %", "n_layers": "layers"}.get(col, col)


def readable_models(models: pd.DataFrame) -> pd.DataFrame:
    """`Comparison.models` on the reading scale: criticality and measured accuracy in %, the zoo's
    metadata as written (accuracy in %), columns titled by `column_title`."""
    out = models.copy()
    for col in ("avg_criticality", "std_criticality", BASE_ACCURACY):
        if col in out:
            out[col] = out[col] * 100
    return out.rename(columns=column_title)


def _fraction_metadata(models: pd.DataFrame) -> list[str]:
    """Metadata said to be in % whose values all lie in 0..1: probably fractions."""
    cols = [META + n for n in PERCENT_METADATA if META + n in models]
    return [c for c in cols if models[c].notna().any() and models[c].dropna().between(0, 1).all()]


def _models(n: int) -> str:
    return f"{n} model" if n == 1 else f"{n} models"


def _p(p) -> str:
    """`p=0.042`, `p<0.001`."""
    text = format_p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def format_comparison(c: Comparison) -> str:
    """Readable text: per-model table (by category, then criticality), per-layer mean ± std, category
    means and correlations; criticality and accuracy in %."""
    pct = lambda v: format_percent(v, 1)  # noqa: E731
    out = [f"Layer criticality under probe {c.probe!r}: {len(c.models)} models, {len(c.layers)} layers (%)", ""]
    m = c.models.assign(_cat=c.models["category"].fillna("")).sort_values(
        ["_cat", "avg_criticality"], kind="stable").drop(columns="_cat")
    shown = readable_models(m)
    for col in shown.columns[2:]:
        if pd.api.types.is_float_dtype(shown[col]):
            digits = 2 if col.startswith("accuracy") or col.startswith("top5") else 1
            shown[col] = shown[col].map(lambda v, d=digits: format_number(v, d)) if "%" in col else shown[col].map(
                lambda v: _fmt(v, ".4g"))
    shown["category"] = shown["category"].map(_fmt)
    shown = shown[["category", "model", *shown.columns[2:]]]
    out += ["Models (avg: mean over layers of the mean over trials; std over layers):", shown.to_string(index=False)]
    for col in _fraction_metadata(c.models):
        out.append(f"note: {column_title(col)} holds values between 0 and 1 only; the zoo's {col.removeprefix(META)} "
                   f"is expected in % (write 95.1, not 0.951)")
    out.append("")
    width = max((len(str(s)) for s in c.layers["label"]), default=0)
    out.append("Layers (mean ± std across models, %):")
    out += [f"  {str(r.label):<{width}}  {pct(r.mean):>5} ± {pct(r.std):<5} ({_models(r.n_models)})"
            for r in c.layers.itertuples()]
    out += ["", "Categories (mean average criticality, %):"]
    out += [f"  {_fmt(r.category):<20} {pct(r.avg_criticality):>5}  ({_models(r.n_models)})"
            for r in c.categories.sort_values("category", na_position="last").itertuples()]
    if len(c.correlations):
        against = [column_title(a).replace(" %", "") for a in c.correlations["against"]]
        w_against = max(len(a) for a in against)
        w_subset = max(len(str(a)) for a in c.correlations["subset"])
        out += ["", "Rank correlation of average criticality with:"]
        out += [f"  {a:<{w_against}}  {r.subset:<{w_subset}}  n={r.n:<3} Spearman R={_fmt(r.spearman_r, '+.2f')} "
                f"({_p(r.spearman_p)})  Kendall τ={_fmt(r.kendall_tau, '+.2f')} ({_p(r.kendall_p)})"
                + (f"  note: {r.note}" if r.note else "")
                for a, r in zip(against, c.correlations.itertuples())]
    if c.baseline is not None and len(c.baseline_diff):
        d = c.baseline_diff.groupby("model", sort=False)["diff"].mean()
        out += ["", f"Mean difference to baseline {c.baseline!r} over shared layers (percentage points):"]
        out += [f"  {model:<30} {format_number(v, 1, scale=100, sign=True)}" for model, v in d.items()]
    return "\n".join(out)
