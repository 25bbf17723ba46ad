"""Gavrikov et al.'s figures: criticality heatmaps (Fig. 1), vs metadata (Fig. 2), vs accuracy (Fig. 3),
differences to a baseline (Fig. 4), spread (Fig. 5), and one model's bars with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import pandas as pd

from .._utils.display import listing
from .._utils.stats import rank_correlation
from ..analyses.robustness import CHECKPOINT
from ..errors import LayercritError
from ..results import UNMODIFIED, summarize_trials
from ..zoo.compare import BASE_ACCURACY, META, Comparison
from ._style import (
    _NORMS,
    Limits,
    _category_band,
    _heatmap,
    _heatmap_size,
    _margins,
    _new_axes,
    _one_model,
    _palette,
    _pct,
    _probe_label,
    _require,
    _set_limits,
    _signed,
    _unwrap,
    style,
)


def _cells(data, value: str, categories) -> pd.DataFrame:
    """Per (model, probe label, layer label): category, trials, mean and std (ddof=1) over trials, in %."""
    if isinstance(data, Comparison):  # fractions there
        s = data.spread
        cell = pd.DataFrame({"model": s["model"].astype(str), "probe": data.probe, "label": s["label"].astype(str),
                             "category": s["category"], "trials": s["trials"], "mean": s["mean"] * 100,
                             "std": s["std"] * 100})
    else:
        t = _unwrap(data)
        _require(t, ["layer", value], "results table")
        t = t[~t["layer"].isin([UNMODIFIED, CHECKPOINT])]
        if t.empty:
            raise LayercritError("the results table has no layer rows to plot")
        probe = (pd.Series([_probe_label(p, g) for p, g in zip(t["probe"], t["target"] if "target" in t else [None] * len(t))],
                           index=t.index) if "probe" in t else "")
        long = pd.DataFrame({
            "model": t["model"].astype(str) if "model" in t else "model", "probe": probe,
            "label": (t["label"].fillna(t["layer"]) if "label" in t else t["layer"]).astype(str),
            "v": pd.to_numeric(t[value], errors="coerce") * 100,
        })
        cell = long.groupby(["model", "probe", "label"], sort=False)["v"].agg(
            trials="count", mean="mean", std="std").reset_index()
        cat = t.drop_duplicates("model").set_index("model")["category"] if {"model", "category"} <= set(t) else {}
        cell["category"] = cell["model"].map(cat) if len(cat) else None
    if categories is not None:
        if isinstance(categories, pd.DataFrame):
            _require(categories, ["model", "category"], "the categories table")
            categories = dict(zip(categories["model"].astype(str), categories["category"]))
        cell["category"] = cell["model"].map(dict(categories))
    cell["category"] = cell["category"].astype(object).where(cell["category"].notna(), None)
    return cell


def _model_grid(cell: pd.DataFrame, stat: str, rows: str, baseline: str | None):
    """(grid rows × layer labels, each row's model) with the baseline first and models grouped by category."""
    models = list(dict.fromkeys(cell["model"]))
    if baseline is not None and baseline not in models:
        raise LayercritError(f"baseline model {baseline!r} is not in the data; models present: {listing(models)}")
    category = dict(zip(cell["model"], cell["category"]))
    cats = list(dict.fromkeys(category[m] for m in models))
    order = sorted(models, key=lambda m: (m != baseline, cats.index(category[m])))  # stable: keeps first-seen order
    probes = list(dict.fromkeys(cell["probe"]))
    if rows == "auto":
        rows = "model" if len(models) > 1 else "probe"
    if rows not in ("model", "probe"):
        raise LayercritError(f"Expected `rows` to be 'model', 'probe' or 'auto', got {rows!r}")
    rank = {m: i for i, m in enumerate(order)} | {p: i for i, p in enumerate(probes)}
    keys = sorted(dict.fromkeys(zip(cell["model"], cell["probe"])),
                  key=lambda k: (rank[k[0]], rank[k[1]]) if rows == "model" else (rank[k[1]], rank[k[0]]))

    def name(m: str, p: str) -> str:
        parts = ([m] if len(models) > 1 else []) + ([p] if len(probes) > 1 else [])
        return " · ".join(parts if rows == "model" else parts[::-1]) or (m if rows == "model" else p or m)

    cols = list(dict.fromkeys(cell["label"]))
    value = cell.set_index(["model", "probe", "label"])[stat]
    grid = pd.DataFrame([[value.get((m, p, c), math.nan) for c in cols] for m, p in keys],
                        index=[name(m, p) for m, p in keys], columns=cols)
    return grid, [m for m, _ in keys], rows, {m: category[m] for m in order}


def _models_plot(grid: pd.DataFrame, row_models: list[str], rows: str, category: dict, baseline: str | None, ax, *,
                 title: str, margin_fmt: Callable[[float], str], **heatmap):
    """The Gavrikov layout around `_heatmap`: category band and legend, margins, white lines
    between categories and after the baseline."""
    shown = {m: "(none)" if c is None else str(c) for m, c in category.items()}
    cats = [shown[m] for m in row_models]
    by_model = rows == "model"
    with style():
        fig, ax = _new_axes(ax, _heatmap_size(grid, extra_width=0.6))
        _heatmap(ax, grid, reserve_pt=40, **heatmap)  # the per-row margin
        if by_model:
            for i in range(1, len(grid)):
                if cats[i] != cats[i - 1] or (row_models[i - 1] == baseline != row_models[i]):
                    ax.axhline(i - 0.5, color="white", linewidth=1.5)
        if by_model and any(category[m] is not None for m in row_models):
            _category_band(ax, cats, list(dict.fromkeys(shown.values())))
        else:
            ax.set_title(title)
        _margins(ax, grid, margin_fmt, layers=by_model and len(grid) > 1)
    return fig, ax


def criticality_heatmap(data, ax=None, *, rows: str = "auto", baseline: str | None = None,
                        categories: Mapping[str, str] | pd.DataFrame | None = None, annotate: bool | None = None,
                        value: str = "criticality"):
    """Mean criticality (%) per row × layer on a 0–100 % scale, with mean ± std margins (Gavrikov Fig. 1).

    Args:
        data: a results table or `CriticalityResult` (any number of models and probes) or a `Comparison`.
        ax: axes to draw into; default a new figure.
        rows: "model" (one row per model, grouped by category with a colour band and legend, the
            baseline first; a per-layer margin below), "probe" (one row per probe, reinit rows as
            `reinit:E0`) or "auto" (models if there are several, else probes). Models with several
            probes get one row per (model, probe).
        baseline: model drawn first (default: the `Comparison`'s baseline).
        categories: model → category (a mapping or a table with `model`, `category`); default: the
            table's `category` column, if any.
        annotate: write the values in the cells (default: if at most 400 cells).
        value: the measure to draw (a fraction, shown ×100).
    """
    if isinstance(data, Comparison) and baseline is None:
        baseline = data.baseline
    cell = _cells(data, value, categories)
    grid, row_models, rows, category = _model_grid(cell, "mean", rows, baseline)
    return _models_plot(grid, row_models, rows, category, baseline, ax, title=f"Layer {value} (mean over trials)",
                        margin_fmt=_pct, cbar_label=f"{value} (%)", annotate=annotate)


def difference_heatmap(data, baseline: str | None = None, ax=None, *,
                       categories: Mapping[str, str] | pd.DataFrame | None = None, annotate: bool | None = None):
    """Each model's per-layer mean criticality minus the baseline model's, −100…+100 % (Gavrikov Fig. 4).

    Args:
        data: a results table (one probe) or a `Comparison`.
        baseline: the baseline model (default: the `Comparison`'s).
        ax: axes to draw into; default a new figure.
        categories: as in `criticality_heatmap`.
        annotate: write the differences in the cells (default: if at most 400 cells).
    """
    if baseline is None:
        baseline = data.baseline if isinstance(data, Comparison) else None
    if baseline is None:
        raise LayercritError("difference_heatmap needs a baseline model (baseline=...)")
    cell = _cells(data, "criticality", categories)
    probes = list(dict.fromkeys(cell["probe"]))
    if len(probes) > 1:
        raise LayercritError(f"difference_heatmap compares one probe; the data hold {listing(probes)}")
    grid, row_models, _, category = _model_grid(cell, "mean", "model", baseline)
    keep = [m != baseline for m in row_models]
    if not any(keep):
        raise LayercritError(f"no model besides the baseline {baseline!r} to compare")
    diff = grid[keep] - grid[[not k for k in keep]].to_numpy()  # matched on the layer label, as `summarize`
    return _models_plot(diff, [m for m, k in zip(row_models, keep) if k], "model", category, None, ax,
                        title=f"Criticality minus {baseline}", margin_fmt=_signed, cmap="RdBu_r", vmin=-100,
                        vmax=100, cbar_label=f"criticality − {baseline} (%)", annotate=annotate, fmt=_signed)


def spread_heatmap(data, ax=None, *, rows: str = "auto", baseline: str | None = None,
                   categories: Mapping[str, str] | pd.DataFrame | None = None, annotate: bool | None = None,
                   vmax: float | None = None):
    """Standard deviation over trials (ddof=1, %) of each cell's criticality (Gavrikov Fig. 5, there
    labelled "standard error").

    Args:
        data: a results table or a `Comparison`.
        ax, rows, baseline, categories, annotate: as in `criticality_heatmap`.
        vmax: top of the colour scale (default: the largest spread).
    """
    if isinstance(data, Comparison) and baseline is None:
        baseline = data.baseline
    cell = _cells(data, "criticality", categories)
    grid, row_models, rows, category = _model_grid(cell, "std", rows, baseline)
    return _models_plot(grid, row_models, rows, category, baseline, ax, title="Criticality spread over trials",
                        margin_fmt=_pct, cmap="magma", vmax=vmax, cbar_label="std over trials (%)", annotate=annotate)


def criticality_bars(table, ax=None, *, value: str = "criticality", limits: Limits = None):
    """One model's per-layer mean criticality (%) with t-based 95 % confidence intervals; one bar
    colour per probe (single-trial cells have no interval).

    Args:
        table: a results table or `CriticalityResult` (one model).
        ax: axes to draw into; default a new figure.
        value: the measure to draw (a fraction, shown ×100).
        limits: the y axis: None for 0–100 %, "data" to fit the bars, or (low, high) in %.
    """
    t = _unwrap(table)
    _require(t, ["layer", value], "results table")
    _one_model(t, "criticality_bars")
    t = t[~t["layer"].isin([UNMODIFIED, CHECKPOINT])].copy()
    t["label"] = t["label"].fillna(t["layer"]) if "label" in t else t["layer"]
    t["probe_label"] = [_probe_label(p, g) for p, g in zip(t.get("probe", [""] * len(t)), t.get("target", [None] * len(t)))]
    s = summarize_trials(t, keys=["probe_label", "label"], measures=[value])
    labels, probes = list(dict.fromkeys(s["label"])), list(dict.fromkeys(s["probe_label"]))
    width = 0.8 / len(probes)
    with style():
        fig, ax = _new_axes(ax, (min(max(3.5, 0.35 * len(labels) * len(probes) + 1.5), 16), 3.0))
        for k, (p, color) in enumerate(zip(probes, _palette(len(probes)))):
            g = s[s["probe_label"] == p].set_index("label").reindex(labels)
            mean = g[f"{value}_mean"].to_numpy(float) * 100
            err = np.vstack([mean - g[f"{value}_ci_low"] * 100, g[f"{value}_ci_high"] * 100 - mean])
            ax.bar(np.arange(len(labels)) + (k - (len(probes) - 1) / 2) * width, mean, width, yerr=err,
                   color=color, label=p, capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xticks(range(len(labels)), labels, rotation=90 if max(map(len, labels)) > 4 else 0)
        _set_limits(ax, limits)
        ax.set_ylabel(f"{value} (%)")
        ax.set_title(f"Layer {value} (mean, 95 % CI over trials)")
        if len(probes) > 1:
            ax.legend(frameon=False)
    return fig, ax


# Columns of `Comparison.models` that hold fractions (drawn ×100).
_FRACTIONS = {"avg_criticality", "std_criticality", BASE_ACCURACY}


def _models_table(models, metadata: pd.DataFrame | None) -> pd.DataFrame:
    df = models.models if isinstance(models, Comparison) else models
    if not isinstance(df, pd.DataFrame):
        raise LayercritError(f"Expected a per-model table or a Comparison, got {type(models).__name__}")
    if metadata is not None:
        _require(metadata, ["model"], "the metadata table")
        extra = [c for c in metadata.columns if c == "model" or c not in df.columns]
        df = df.merge(metadata[extra].drop_duplicates("model"), on="model", how="left")
    return df


def _column(df: pd.DataFrame, name: str) -> str:
    """`name`, or the zoo's metadata column `meta_<name>` when only that is present."""
    return META + name if name not in df.columns and META + name in df.columns else name


def _scatter_column(df: pd.DataFrame, name: str | None, default: str) -> str | None:
    """`name` if present; a column left at its default and absent means "not used"."""
    if name is not None:
        name = _column(df, name)
    if name is None or name in df.columns:
        return name
    if name == default:
        return None
    raise LayercritError(f"column {name!r} is not in the models table; columns present: {listing(df.columns)}")


def criticality_vs_metadata(models, x: str = "epsilon", color: str | None = "norm", size: str | None = "accuracy",
                            ax=None, *, y: str = "avg_criticality", metadata: pd.DataFrame | None = None,
                            limits: Limits = None):
    """Average criticality (%) against a numeric metadata column, one colour and line per value of
    `color`, marker area growing with `size` (Gavrikov Fig. 2: ε, by norm, size = accuracy).

    Args:
        models: `Comparison.models` (or the `Comparison`), one row per model.
        x: numeric column on the x axis; models without a value are left out.
        color: column grouping the points (norms print as ℓ2, ℓ∞); if the default is absent: one colour.
        size: numeric column for the marker area; if the default is absent: one size.
        ax: axes to draw into; default a new figure.
        y: the criticality column (`avg_criticality`, a fraction, is drawn in %).
        metadata: per-model columns to merge in by `model` (e.g. `Store.models()`, which holds the norm).
        limits: the criticality axis: None for 0–100 %, "data" to fit the points, or (low, high).
    """
    df = _models_table(models, metadata)
    x = _column(df, x)
    _require(df, [x, y], "the models table")
    color, size = _scatter_column(df, color, "norm"), _scatter_column(df, size, "accuracy")
    yscale = 100 if y in _FRACTIONS else 1
    df = df.assign(_x=pd.to_numeric(df[x], errors="coerce"),
                   _y=pd.to_numeric(df[y], errors="coerce") * yscale).dropna(subset=["_x", "_y"])
    if df.empty:
        raise LayercritError(f"no model has both {x!r} and {y!r}")
    groups = df[color].astype(object).where(df[color].notna(), "n/a").astype(str) if color else pd.Series("", index=df.index)
    if size:
        s = pd.to_numeric(df[size], errors="coerce")
        lo, hi = s.min(), s.max()
        area = (15 + 135 * (s - lo) / (hi - lo)).fillna(15) if hi > lo else pd.Series(60.0, index=df.index)
    else:
        area = pd.Series(40.0, index=df.index)
    from matplotlib.lines import Line2D

    with style():
        fig, ax = _new_axes(ax, (4.2, 3.2))
        names = list(dict.fromkeys(groups))
        handles = []
        for g, c in zip(names, _palette(len(names))):
            sub = df[groups == g].sort_values("_x")
            ax.plot(sub["_x"], sub["_y"], color=c, linewidth=0.8, alpha=0.6)
            ax.scatter(sub["_x"], sub["_y"], s=area[sub.index], color=c, edgecolors="white", linewidths=0.5, zorder=3)
            handles.append(Line2D([], [], marker="o", linestyle="-", color=c, label=_NORMS.get(g.lower(), g) or y))
        if size and s.max() > s.min():
            for v in np.unique(np.round(np.linspace(s.min(), s.max(), 3), 3)):
                a = 15 + 135 * (v - s.min()) / (s.max() - s.min())
                handles.append(Line2D([], [], marker="o", linestyle="none", color="0.5", markersize=math.sqrt(a),
                                      label=f"{size.removeprefix(META)} {v:.3g}"))
        ax.legend(handles=handles, frameon=False, title=color.removeprefix(META) if color else None, loc="best")
        ax.set_xlabel("training attack budget ε" if x.removeprefix(META) == "epsilon" else x.removeprefix(META))
        ax.set_ylabel("average criticality (%)" if y == "avg_criticality" else y)
        if yscale == 100:
            _set_limits(ax, limits)
        ax.grid(alpha=0.3)
    return fig, ax


def criticality_vs_accuracy(models, ax=None, exclude_category: str | None = None, *, x: str = "accuracy",
                            y: str = "avg_criticality", metadata: pd.DataFrame | None = None, limits: Limits = None):
    """Average criticality (%) against accuracy, coloured by category, with Spearman's R over all
    models and without `exclude_category` in the legend (Gavrikov Fig. 3).

    Args:
        models: `Comparison.models` (or the `Comparison`).
        ax: axes to draw into; default a new figure.
        exclude_category: category left out of the second correlation (the paper: adversarial).
        x: the accuracy column: the zoo's (`accuracy` or `meta_accuracy`, in %) or, if the default is
            absent, the measured `base_accuracy` (a fraction, drawn in %).
        y: the criticality column (`avg_criticality`, a fraction, is drawn in %).
        metadata: per-model columns to merge in by `model`.
        limits: both axes: None for 0–100 %, "data" to fit the points, or (low, high).
    """
    df = _models_table(models, metadata)
    x = _column(df, x)
    xlabel = "accuracy (%)" if x.removeprefix(META) == "accuracy" else x
    if x == "accuracy" and x not in df.columns and BASE_ACCURACY in df.columns:
        x, xlabel = BASE_ACCURACY, "accuracy (%, measured)"
    _require(df, [x, y], "the models table")
    df = df.assign(**{c: pd.to_numeric(df[c], errors="coerce") * 100 for c in {x, y} & _FRACTIONS})
    cats = (df["category"].astype(object).where(df["category"].notna(), "(none)").astype(str)
            if "category" in df.columns else pd.Series("models", index=df.index))
    if exclude_category is not None and exclude_category not in set(cats):
        raise LayercritError(f"unknown category {exclude_category!r}; categories present: {listing(dict.fromkeys(cats))}")
    xv, yv = pd.to_numeric(df[x], errors="coerce").to_numpy(float), pd.to_numeric(df[y], errors="coerce").to_numpy(float)
    from matplotlib.lines import Line2D

    with style():
        fig, ax = _new_axes(ax, (4.2, 3.2))
        names = list(dict.fromkeys(cats))
        for c, color in zip(names, _palette(len(names))):
            m = (cats == c).to_numpy()
            ax.scatter(xv[m], yv[m], s=30, color=color, edgecolors="white", linewidths=0.5, label=c, zorder=3)
        handles, _ = ax.get_legend_handles_labels()
        subsets = [("all", np.ones(len(df), bool))]
        if exclude_category is not None:
            subsets.append((f"without {exclude_category}", (cats != exclude_category).to_numpy()))
        for name, m in subsets:
            r = rank_correlation(xv[m], yv[m])
            txt = "n/a" if math.isnan(r["spearman_r"]) else f"{r['spearman_r']:+.2f}"
            handles.append(Line2D([], [], linestyle="none", label=f"Spearman R = {txt} ({name}, n={r['n']})"))
        ax.legend(handles=handles, frameon=False, loc="best", handlelength=1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("average criticality (%)" if y == "avg_criticality" else y)
        _set_limits(ax, limits, "x")
        _set_limits(ax, limits, "y")
        ax.grid(alpha=0.3)
    return fig, ax
