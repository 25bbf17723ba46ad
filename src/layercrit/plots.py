"""The papers' figures as library functions.

Every function takes the package's tidy tables (or the result objects holding them) and an optional
axis (`ax`, or `axes` for several panels) and returns `(fig, ax)`. Figures are
`matplotlib.figure.Figure`s, never pyplot ones, styled inside `style()`, so nothing leaks into the
caller's matplotlib state. Criticalities, accuracies and errors (fractions in the tables) are drawn
in %, on axes from 0 to 100 % unless `limits` asks otherwise (`"data"`: fit the data; `(lo, hi)`),
so that a difference of a tenth of a point does not fill the figure.

- Gavrikov et al. 2024: `criticality_heatmap` (Fig. 1), `criticality_vs_metadata` (Fig. 2),
  `criticality_vs_accuracy` (Fig. 3), `difference_heatmap` (Fig. 4), `spread_heatmap` (Fig. 5).
- Zhang et al. 2019: `robustness_heatmap` (Fig. 1a; joint groups Fig. 8-10), `distance_heatmaps`
  (Fig. 1b-c; Chatterji Fig. 8 with `measures=("spectral",)`).
- Chatterji et al. 2020: `modcrit_curves` (Fig. 4), `network_criticality_vs_epsilon` (Fig. 5),
  `ranking_table` (Tables 1-3).
- `criticality_bars`: one model's per-layer criticality with 95 % confidence intervals.

`PLOTS` maps the CLI's plot kinds to these functions.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .compare import BASE_ACCURACY, META, Comparison, _correlate, _listing
from .errors import LayercritError
from .io import atomic_path, check_output_path
from .modcrit import ModcritResult
from .results import SMALL_N, UNMODIFIED, CriticalityResult, format_p, summarize_trials
from .robustness import CHECKPOINT

__all__ = [
    "PLOTS",
    "criticality_bars",
    "criticality_heatmap",
    "criticality_vs_accuracy",
    "criticality_vs_metadata",
    "difference_heatmap",
    "distance_heatmaps",
    "list_plots",
    "modcrit_curves",
    "network_criticality_vs_epsilon",
    "proxy_bump",
    "proxy_scatter",
    "ranking_table",
    "robustness_heatmap",
    "save_figure",
    "shift_heatmaps",
    "spread_heatmap",
    "style",
]

_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7, "figure.dpi": 150}
_SMALL = 6.5  # cell annotations and margins
_MISSING = "0.9"  # colour of cells without a value
_ANNOTATE_MAX = 400  # more cells than this are too small to annotate legibly
_NORMS = {"l2": "ℓ2", "2": "ℓ2", "linf": "ℓ∞", "inf": "ℓ∞", "l1": "ℓ1", "1": "ℓ1"}


@contextlib.contextmanager
def style() -> Iterator[None]:
    """The package's plot style, scoped: nothing leaks into the caller's rcParams."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        yield


def _new_axes(ax, size):
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")  # not pyplot: no global figure registry
    return fig, fig.add_subplot()


def _palette(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LayercritError(f"{what} lacks columns {', '.join(missing)}; columns present: {_listing(df.columns)}")


def _unwrap(data) -> pd.DataFrame:
    table = data.table if isinstance(data, CriticalityResult) else data
    if not isinstance(table, pd.DataFrame):
        raise LayercritError(f"Expected a results DataFrame or CriticalityResult, got {type(data).__name__}")
    return table


def _one_model(df: pd.DataFrame, what: str) -> None:
    models = list(dict.fromkeys(df["model"])) if "model" in df.columns else []
    if len(models) > 1:
        raise LayercritError(f"{what} shows one model; the table holds {len(models)} ({_listing(models)}): "
                             f"pass one model's rows")


def _probe_label(probe, target) -> str:
    """`rerandomize`, `reinit:E0`: the target only where it says more than the probe's name."""
    t = "" if target is None or pd.isna(target) else str(target)
    return str(probe) if t in ("", str(probe)) else f"{probe}:{t}"


Limits = str | tuple[float, float] | None


def _set_limits(ax, limits: Limits, axis: str = "y") -> None:
    """A % axis: 0–100 by default, `"data"` to fit the data, or `(lo, hi)`."""
    if limits == "data":
        return
    if limits is None:
        limits = (0.0, 100.0)
    try:
        lo, hi = (float(v) for v in limits)
    except (TypeError, ValueError):
        raise LayercritError(f'Expected `limits` to be None, "data" or (low, high), got {limits!r}') from None
    if not lo < hi:
        raise LayercritError(f"Expected `limits` (low, high) with low < high, got {limits!r}")
    (ax.set_xlim if axis == "x" else ax.set_ylim)(lo, hi)


def _pct(v: float) -> str:
    if not np.isfinite(v):
        return ""
    v = 0.0 if abs(v) < 0.05 else v  # no "-0.0" from rounding noise
    return f"{v:.1f}" if abs(v) < 9.95 else f"{v:.0f}"


def _signed(v: float) -> str:
    return "" if not np.isfinite(v) else "0" if abs(v) < 0.5 else f"{v:+.0f}"


def _short(v: float) -> str:
    return "" if not np.isfinite(v) else f"{v:.2g}"


# --- the shared heatmap ------------------------------------------------------------------------


def _heatmap_size(grid: pd.DataFrame, extra_width: float = 0.0) -> tuple[float, float]:
    row_chars = max((len(str(r)) for r in grid.index), default=4)
    col_chars = max((len(str(c)) for c in grid.columns), default=4)
    width = 0.32 * grid.shape[1] + 0.065 * row_chars + 1.5 + extra_width
    height = 0.25 * grid.shape[0] + (0.065 * col_chars if col_chars > 4 else 0.2) + 0.9
    return min(max(width, 3.5), 18.0), min(max(height, 1.8), 14.0)


def _heatmap(ax, grid: pd.DataFrame, *, cmap: str = "viridis", vmin: float | None = 0.0, vmax: float | None = 100.0,
             cbar_label: str = "", annotate: bool | None = None, fmt: Callable[[float], str] = _pct,
             reserve_pt: float = 0.0):
    """`grid` (rows × columns, labels from its index and columns) as an `imshow` with a colour bar.

    Cells are annotated with `fmt` in black or white, whichever reads on the cell's colour; NaN
    cells are light grey. `annotate=None` annotates grids of at most `_ANNOTATE_MAX` cells.
    `reserve_pt`: room for text right of the heatmap, left before the colour bar.
    """
    import matplotlib

    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    if vmax is None:  # an automatic scale still starts at 0: these are distances and spreads
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    cm = matplotlib.colormaps[cmap].with_extremes(bad=_MISSING)
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cm, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    cols = [str(c) for c in grid.columns]
    long = max((len(c) for c in cols), default=0) > 4
    ax.set_xticks(range(len(cols)), cols, rotation=90 if long else 0)
    ax.set_yticks(range(len(grid)), [str(r) for r in grid.index])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    if annotate if annotate is not None else values.size <= _ANNOTATE_MAX:
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                r, g, b, _ = cm(im.norm(v))
                ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, fmt(v), ha="center", va="center", color=ink, fontsize=_SMALL)
    pad = 0.02
    if reserve_pt and ax.figure.get_layout_engine() is None:  # a layout engine makes that room by itself
        pad += reserve_pt / 72 / max(ax.get_position().width * ax.figure.get_figwidth(), 0.1)
    ax.figure.colorbar(im, ax=ax, label=cbar_label, fraction=0.05, pad=pad,
                      aspect=max(4.0, 2.5 * len(grid)))  # ~0.1 in wide whatever the rows
    return im


def _offset(ax, base, dx_pt: float = 0.0, dy_pt: float = 0.0):
    """`base` shifted by a fixed distance in points, so bands and margins keep their size whatever the axes'."""
    from matplotlib.transforms import ScaledTranslation

    return base + ScaledTranslation(dx_pt / 72, dy_pt / 72, ax.figure.dpi_scale_trans)


def _margins(ax, grid: pd.DataFrame, fmt: Callable[[float], str], layers: bool) -> None:
    """Mean ± std (population, as the reference notebook) per row at the right and, if `layers`,
    per column below the heatmap, pushing the column labels down."""

    def text(vs: np.ndarray) -> str:
        vs = vs[np.isfinite(vs)]
        return "—" if not vs.size else f"{fmt(vs.mean())}±{_pct(np.std(vs))}"

    values = grid.to_numpy(dtype=float)
    n = len(values)
    right = _offset(ax, ax.get_yaxis_transform(), dx_pt=3)
    for i, row in enumerate(values):
        ax.text(1, i, text(row), transform=right, ha="left", va="center", fontsize=_SMALL, clip_on=False)
    corner = {"va": "top", "fontsize": _SMALL, "style": "italic", "clip_on": False}
    ax.text(1, n - 0.5, "mean±std", transform=_offset(ax, ax.get_yaxis_transform(), 3, -3), ha="left", **corner)
    if not layers:
        return
    texts = [text(col) for col in values.T]
    for j, s in enumerate(texts):
        ax.text(j, n - 0.5, s, transform=_offset(ax, ax.transData, dy_pt=-3), ha="center", va="top", rotation=90,
                fontsize=_SMALL, clip_on=False)
    ax.tick_params(axis="x", pad=0.8 * _SMALL * max(len(s) for s in texts) + 6)  # column labels below the margin
    left = -ax.yaxis.get_major_ticks()[0].get_pad()  # right-aligned with the row labels
    ax.text(-0.5, n - 0.5, "layer mean±std", transform=_offset(ax, ax.transData, left, -3), ha="right", **corner)


def _category_band(ax, categories: list[str], palette_order: list[str]) -> None:
    """A thin coloured band between the row labels and the heatmap, and a category legend above.
    Colours follow `palette_order`, so figures showing a subset of the models keep them."""
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.transforms import Affine2D, ScaledTranslation, blended_transform_factory

    names = list(dict.fromkeys(categories))
    colors = dict(zip(palette_order, _palette(len(palette_order))))
    width, gap = 6.0, 2.0  # points, whatever the axes' size
    points_from_left = Affine2D().scale(1 / 72) + ax.figure.dpi_scale_trans + ScaledTranslation(0, 0, ax.transAxes)
    band = blended_transform_factory(points_from_left, ax.transData)
    for i, c in enumerate(categories):
        ax.add_patch(Rectangle((-(width + gap), i - 0.5), width, 1, transform=band, color=colors[c], linewidth=0,
                               clip_on=False))
    ax.tick_params(axis="y", pad=width + gap + 3)
    ax.legend(handles=[Patch(color=colors[c], label=c) for c in names], loc="lower left", bbox_to_anchor=(0, 1.01),
              ncols=min(len(names), 6), frameon=False, handlelength=1.0, borderaxespad=0)


# --- Gavrikov: models × layers ----------------------------------------------------------------


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
        raise LayercritError(f"baseline model {baseline!r} is not in the data; models present: {_listing(models)}")
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
        raise LayercritError(f"difference_heatmap compares one probe; the data hold {_listing(probes)}")
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
    raise LayercritError(f"column {name!r} is not in the models table; columns present: {_listing(df.columns)}")


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
        raise LayercritError(f"unknown category {exclude_category!r}; categories present: {_listing(dict.fromkeys(cats))}")
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
            r = _correlate(xv[m], yv[m])
            txt = "n/a" if math.isnan(r["spearman_r"]) else f"{r['spearman_r']:+.2f}"
            handles.append(Line2D([], [], linestyle="none", label=f"Spearman R = {txt} ({name}, n={r['n']})"))
        ax.legend(handles=handles, frameon=False, loc="best", handlelength=1.0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("average criticality (%)" if y == "avg_criticality" else y)
        _set_limits(ax, limits, "x")
        _set_limits(ax, limits, "y")
        ax.grid(alpha=0.3)
    return fig, ax


# --- Zhang: robustness and distances ------------------------------------------------------------


def _epoch(target: str) -> float:
    m = re.fullmatch(r"E(\d+)", str(target))
    return float(m.group(1)) if m else math.inf


def robustness_heatmap(data, ax=None, *, value: str = "error",
                       groups: Mapping[str, Sequence[str]] | Sequence[str] | None = None, annotate: bool | None = None):
    """Layers × [Re-Rnd, E0, E1, …] of the test error (or criticality) after resetting the row's
    layer to the column's values, last row the whole model at each checkpoint (Zhang Fig. 1a).

    Joint groups are marked as in Zhang Fig. 8: "*" before the label and one tick colour per group.

    Args:
        data: a `robustness(...)` result or its table (one model).
        ax: axes to draw into; default a new figure.
        value: "error" or "criticality" (fractions, drawn ×100 on a 0–100 % scale).
        groups: joint groups to mark: `{name: [glob, ...]}` or a list of globs (matched against layer
            names and labels); rows named after a group are marked too. Default: the groups the
            result was measured with, if any.
        annotate: write the values in the cells (default: if at most 400 cells).
    """
    if groups is None and isinstance(data, CriticalityResult):
        groups = data.config.get("groups")
    t = _unwrap(data)
    if value == "error" and "error" not in t.columns and "accuracy" in t.columns:
        t = t.assign(error=1 - t["accuracy"])
    _require(t, ["layer", "probe", "target", value], "robustness table")
    _one_model(t, "robustness_heatmap")
    t = t[t["layer"] != UNMODIFIED]
    label = (t["label"].fillna(t["layer"]) if "label" in t else t["layer"]).astype(str)
    column = [("Re-Rnd" if p == "rerandomize" else str(g) if p in ("reinit", "checkpoint") else _probe_label(p, g))
              for p, g in zip(t["probe"], t["target"])]
    t = t.assign(_row=label, _col=column, _v=pd.to_numeric(t[value], errors="coerce") * 100)
    cols = sorted(dict.fromkeys(column), key=lambda c: (c != "Re-Rnd", _epoch(c)))  # stable: other probes keep their order
    units = t[t["layer"] != CHECKPOINT].drop_duplicates("_row")
    whole = t[t["layer"] == CHECKPOINT]["_row"].unique().tolist()
    grid = t.groupby(["_row", "_col"], sort=False)["_v"].mean().unstack("_col").reindex(
        index=units["_row"].tolist() + whole, columns=cols)
    if isinstance(groups, Mapping):
        groups = {str(k): [v] if isinstance(v, str) else list(v) for k, v in groups.items()}
    elif groups is not None:
        groups = {"group": [groups] if isinstance(groups, str) else list(groups)}
    member = {}
    for k, (gname, globs) in enumerate((groups or {}).items()):
        for layer, lab in zip(units["layer"].astype(str), units["_row"]):
            if layer == gname or any(fnmatch.fnmatchcase(layer, p) or fnmatch.fnmatchcase(lab, p) for p in globs):
                member.setdefault(lab, k)
    grid.index = [f"*{r}" if r in member else r for r in grid.index]
    name = "test error" if value == "error" else value
    with style():
        fig, ax = _new_axes(ax, _heatmap_size(grid))
        _heatmap(ax, grid, cbar_label=f"{name} (%)", annotate=annotate)
        colors = _palette(max(len(groups or {}), 1))
        for tick, r in zip(ax.get_yticklabels(), grid.index):
            if r.startswith("*") and r[1:] in member:
                tick.set_color(colors[member[r[1:]]])
        if whole and len(units):
            ax.axhline(len(units) - 0.5, color="white", linewidth=2)
        ax.set_title(f"{name.capitalize()} after resetting a layer (%)")
        ax.set_xlabel("re-randomization | re-initialization to checkpoint")
    return fig, ax


_DISTANCES = {"l2": r"$\Vert\theta_\tau-\theta_0\Vert_2\,/\,\sqrt{\dim}$", "linf": r"$\Vert\theta_\tau-\theta_0\Vert_\infty$",
              "spectral": r"$\Vert\theta_\tau-\theta_0\Vert_{op}$ (largest singular value)"}


def distance_heatmaps(distances: pd.DataFrame, axes=None, *, measures: Sequence[str] = ("l2", "linf"),
                      annotate: bool | None = None):
    """Layers × checkpoints of each layer's distance to checkpoint 0, one heatmap per measure side
    by side (Zhang Fig. 1b-c: ℓ2/√dim and ℓ∞; `measures=("spectral",)` for Chatterji Fig. 8).

    Args:
        distances: a `weight_distances(...)` table (one model).
        axes: one axes per measure; default a new figure.
        measures: columns of `distances` to draw.
        annotate: write the values in the cells (default: if at most 400 cells).

    Returns:
        (fig, list of axes).
    """
    _require(distances, ["layer", "epoch", *measures], "distance table")
    _one_model(distances, "distance_heatmaps")
    d = distances.assign(_row=(distances["label"].fillna(distances["layer"]) if "label" in distances
                               else distances["layer"]).astype(str))
    epochs = sorted(d["epoch"].unique())
    grids = [d.groupby(["_row", "epoch"], sort=False)[m].mean().unstack("epoch").reindex(
        index=list(dict.fromkeys(d["_row"])), columns=epochs).rename(columns=lambda e: f"E{e}") for m in measures]
    with style():
        if axes is None:
            from matplotlib.figure import Figure

            w, h = _heatmap_size(grids[0])
            fig = Figure(figsize=(w * len(measures), h), layout="constrained")
            axes = list(fig.subplots(1, len(measures), squeeze=False)[0])
        else:
            axes = list(np.atleast_1d(axes))
            if len(axes) != len(measures):
                raise LayercritError(f"Expected {len(measures)} axes, one per measure, got {len(axes)}")
            fig = axes[0].figure
        for ax, m, grid in zip(axes, measures, grids):
            _heatmap(ax, grid, vmax=None, cbar_label="distance to checkpoint 0", annotate=annotate, fmt=_short)
            ax.set_title(_DISTANCES.get(m, m))
            ax.set_xlabel("checkpoint")
    return fig, axes


# --- Chatterji: module criticality ---------------------------------------------------------------


def modcrit_curves(curve, modules: Sequence[str] | None = None, ax=None, *, epsilon: float | None = None,
                   loss: str | None = None, limits: Limits = None):
    """Training loss along θ(α) = (1−α)θ⁰ + αθᶠ for chosen modules: the loss at θ(α) itself as a
    line and the loss at the largest feasible σ as markers, ε as a dashed line (Chatterji Fig. 4).

    Args:
        curve: a `ModcritResult` or its `curve` table (one model).
        modules: module names or labels; default the most and the least critical by μ(ε).
        ax: axes to draw into; default a new figure.
        epsilon: the ε whose σ_max and μ are shown (default: the smallest).
        loss: "error" (drawn in %) or "cross-entropy"; default from the result's config, else "error".
        limits: the error axis: None for 0–100 %, "data" to fit the curves, or (low, high) in %
            (cross-entropy: always fitted to the data).
    """
    if isinstance(curve, ModcritResult):
        loss = loss or curve.config.get("loss")
        curve = curve.curve
    loss = loss or "error"
    _require(curve, ["module", "epsilon", "alpha", "mu", "loss", "loss_no_noise"], "module-criticality curve")
    _one_model(curve, "modcrit_curves")
    eps = sorted(curve["epsilon"].unique())
    if epsilon is None:
        epsilon = eps[0]
    elif not np.isclose(eps, epsilon).any():
        raise LayercritError(f"no curve for ε = {epsilon:g}; ε present: {_listing(f'{e:g}' for e in eps)}")
    c = curve[np.isclose(curve["epsilon"], epsilon)]
    label = dict(zip(c["module"], (c["label"] if "label" in c else c["module"]).astype(str)))
    mu = c.groupby("module", sort=False)["mu"].min().fillna(math.inf)  # infeasible everywhere: the most critical
    if modules is None:
        ranked = mu.sort_values(kind="stable").index  # with ties (all infeasible) still two modules
        modules = list(dict.fromkeys([ranked[-1], ranked[0]]))
    else:
        by_label = {v: k for k, v in label.items()}
        unknown = [m for m in modules if m not in label and m not in by_label]
        if unknown:
            raise LayercritError(f"unknown modules {_listing(unknown)}; modules present: {_listing(label)}")
        modules = [m if m in label else by_label[m] for m in modules]
    scale, ylabel = (100, "training error (%)") if loss == "error" else (1, f"training {loss}")
    from matplotlib.lines import Line2D

    with style():
        fig, ax = _new_axes(ax, (4.2, 3.0))
        for m, color in zip(modules, _palette(len(modules))):
            g = c[c["module"] == m].sort_values("alpha")
            name = f"{label[m]} (μ = {mu[m]:.3g})" if np.isfinite(mu[m]) else f"{label[m]} (infeasible)"
            ax.plot(g["alpha"], g["loss_no_noise"] * scale, color=color, label=name)
            ax.scatter(g["alpha"], g["loss"] * scale, facecolors="none", edgecolors=[color], s=18, zorder=3)
        thr = float(c["threshold"].iloc[0]) if "threshold" in c else epsilon
        ax.axhline(thr * scale, color="0.4", linestyle="--", linewidth=0.8)
        handles, _ = ax.get_legend_handles_labels()
        handles += [Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor="0.3", linestyle="none",
                           label="at σ_max (noise)"),
                    Line2D([], [], color="0.4", linestyle="--", linewidth=0.8, label=f"threshold (ε = {epsilon:g})")]
        ax.legend(handles=handles, frameon=False, loc="best")
        ax.set_xlabel(r"α   (0: initial $\theta^0$, 1: final $\theta^F$)")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, 1)
        if loss == "error":
            _set_limits(ax, limits)
        ax.grid(alpha=0.3)
    return fig, ax


def network_criticality_vs_epsilon(network, ax=None, *, measure: str = "network_criticality", log: bool | None = None):
    """Network criticality Σμᵢ(ε) against the error threshold ε, one line per model (Chatterji Fig. 5).

    Args:
        network: `ModcritResult.network` tables (one or several models, or the results), or the
            models table of `rank_runs` (columns `network_criticality@ε`).
        ax: axes to draw into; default a new figure.
        measure: "network_criticality" or "pac_bayes".
        log: logarithmic y axis (default: if the values span more than two decades).
    """
    if isinstance(network, ModcritResult):
        network = network.network
    elif isinstance(network, Sequence) and not isinstance(network, str):
        network = pd.concat([n.network if isinstance(n, ModcritResult) else n for n in network], ignore_index=True)
    if "epsilon" not in network.columns:  # wide: rank_runs' `measure@ε` columns
        wide = [c for c in network.columns if str(c).startswith(f"{measure}@")]
        if not wide or "model" not in network.columns:
            raise LayercritError(f"Expected a network table with columns model, epsilon, {measure} or "
                                 f"{measure}@ε columns; columns present: {_listing(network.columns)}")
        network = network.melt(id_vars="model", value_vars=wide, var_name="epsilon", value_name=measure)
        network["epsilon"] = network["epsilon"].str.partition("@")[2].astype(float)
    _require(network, ["epsilon", measure], "network table")
    network = network.assign(model=network["model"] if "model" in network else "model")
    v = pd.to_numeric(network[measure], errors="coerce")
    pos = v[v > 0]
    if log is None:
        log = len(pos) > 1 and pos.max() / pos.min() > 100
    with style():
        fig, ax = _new_axes(ax, (4.2, 3.0))
        models = list(dict.fromkeys(network["model"]))
        for m, color in zip(models, _palette(len(models))):
            g = network[network["model"] == m].sort_values("epsilon")
            ax.plot(g["epsilon"], g[measure], marker="o", markersize=3, color=color, label=str(m))
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("training-error threshold ε")
        ax.set_ylabel("network criticality Σ μᵢ(ε)" if measure == "network_criticality" else measure.replace("_", "-"))
        if len(models) > 1:
            ax.legend(frameon=False, loc="best")
        ax.grid(alpha=0.3)
    return fig, ax


_MEASURE_NAMES = {"log10_pfn": "log10 Π Frobenius norms", "log10_psn": "log10 Π spectral norms",
                  "dti": "distance to init.", "nop": "number of parameters"}


_COLUMN_NAMES = {"kendall_tau": "Kendall τ", "kendall_p": "p", "spearman_rho": "Spearman ρ", "spearman_p": "p"}


def _num(v, spec: str) -> str:
    return "—" if pd.isna(v) else format(v, spec)


def _measure_name(m: str) -> str:
    base, at, eps = str(m).partition("@")
    name = {"pac_bayes": "PAC-Bayes", "network_criticality": "network criticality"}.get(base, _MEASURE_NAMES.get(base, base))
    return f"{name} (ε = {eps})" if at else name


def ranking_table(ranking, ax=None, *, best_by: str = "kendall_tau"):
    """The complexity measures' rank correlation with the generalization error as a table (measure,
    Kendall τ, p, Spearman ρ, p, n), the best measure (largest `best_by`) highlighted (Chatterji Tables 1-3).

    p-values below 0.001 print as <0.001; those of fewer than 5 models are marked † with a footnote.

    Args:
        ranking: the ranking table of `rank_runs` (or its `(models, ranking)` pair).
        ax: axes to draw into; default a new figure.
        best_by: the column that decides the best measure.
    """
    if isinstance(ranking, tuple):
        ranking = ranking[1]
    _require(ranking, ["measure", "kendall_tau", "kendall_p", "spearman_rho", "spearman_p"], "ranking table")
    if ranking.empty:
        raise LayercritError("the ranking table is empty")
    def p(v, n) -> str:
        mark = "†" if isinstance(n, (int, np.integer)) and n < SMALL_N and not pd.isna(v) else ""
        return format_p(v) + mark

    cells = [[_measure_name(r.measure), _num(r.kendall_tau, "+.2f"), p(r.kendall_p, getattr(r, "n", None)),
              _num(r.spearman_rho, "+.2f"), p(r.spearman_p, getattr(r, "n", None)), str(getattr(r, "n", ""))]
             for r in ranking.itertuples()]
    small = sorted({int(n) for n in ranking["n"] if n < SMALL_N}) if "n" in ranking else []
    score = pd.to_numeric(ranking[best_by], errors="coerce").to_numpy(float)
    best = int(np.nanargmax(score)) if np.isfinite(score).any() else None
    with style():
        fig, ax = _new_axes(ax, (5.2, 0.22 * (len(cells) + 1) + 0.5))
        ax.axis("off")
        table = ax.table(cellText=cells, colLabels=["measure", *_COLUMN_NAMES.values(), "n"],
                         loc="center", cellLoc="center", colWidths=[0.38, 0.13, 0.11, 0.17, 0.11, 0.07])
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.25)
        for (i, _j), cell in table.get_celld().items():
            cell.set_edgecolor("0.8")
            if i == 0:
                cell.set_facecolor("0.92")
                cell.set_text_props(weight="bold")
            elif best is not None and i == best + 1:
                cell.set_facecolor("#fff2a8")
                cell.set_text_props(weight="bold")
        ax.set_title(f"Rank correlation with {ranking['against'].iloc[0] if 'against' in ranking else 'ge'}"
                     f" (best by {_COLUMN_NAMES.get(best_by, best_by)} highlighted)")
        if small:
            ax.text(0.5, -0.02, f"† n = {', '.join(map(str, small))} < {SMALL_N} models: too few for a test; no exact "
                    f"two-sided p-value can be below {2 / math.factorial(max(small)):.2g}", transform=ax.transAxes,
                    ha="center", va="top", fontsize=_SMALL, style="italic")
    return fig, ax


# --- registry and output -----------------------------------------------------------------------

PLOTS: dict[str, Callable] = {
    "heatmap": criticality_heatmap,
    "bars": criticality_bars,
    "difference": difference_heatmap,
    "spread": spread_heatmap,
    "vs-metadata": criticality_vs_metadata,
    "vs-accuracy": criticality_vs_accuracy,
    "robustness": robustness_heatmap,
    "distances": distance_heatmaps,
    "modcrit-curves": modcrit_curves,
    "network-vs-epsilon": network_criticality_vs_epsilon,
    "ranking": ranking_table,
}


def list_plots() -> dict[str, str]:
    """Plot kind → the first line of its function's docstring."""
    return {k: (f.__doc__ or "").strip().splitlines()[0] for k, f in PLOTS.items()}


def save_figure(fig, path: str | Path) -> Path:
    """Save atomically (.png, .svg or .pdf)."""
    path = check_output_path(path, (".png", ".svg", ".pdf"))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:], bbox_inches="tight")
    return path


# --- proxies of the pruning literature against real resets ----------------------------------------


def proxy_scatter(proxies, criticality=None, axes=None, *, probe: str | None = None,
                  proxy_names: Sequence[str] | None = None):
    """Block proxies against the real criticality (%) of the same blocks, one panel per proxy.

    One colour per model; Spearman's ρ in each panel's title.

    Args:
        proxies: a `ProxyResult` (its own criticality is used unless `criticality` is given) or a
            proxies table (then `criticality` is needed).
        criticality: `measure`'s result or table, or None.
        axes: one axes per proxy; default a new figure.
        probe: the probe whose criticality is the y axis (default: rerandomize if present, else the first).
        proxy_names: the proxies to draw (default: every single-block proxy).

    Returns:
        (fig, list of axes).
    """
    from .proxies import paired_table

    pairs = paired_table(proxies, criticality)
    if pairs.empty:
        raise LayercritError("no block has both a proxy value and a criticality: nothing to draw")
    probes = list(dict.fromkeys(pairs["probe"]))
    probe = probe or ("rerandomize" if "rerandomize" in probes else probes[0])
    if probe not in probes:
        raise LayercritError(f"no criticality of probe {probe!r}; present: {_listing(probes)}")
    pairs = pairs[pairs["probe"] == probe]
    names = list(proxy_names or dict.fromkeys(pairs["proxy"]))
    unknown = [p for p in names if p not in set(pairs["proxy"])]
    if unknown:
        raise LayercritError(f"unknown proxy {unknown[0]!r}; present: {_listing(dict.fromkeys(pairs['proxy']))}")
    models = list(dict.fromkeys(pairs["model"])) if "model" in pairs else ["model"]
    with style():
        if axes is None:
            from matplotlib.figure import Figure

            cols = min(3, len(names))
            rows = -(-len(names) // cols)
            fig = Figure(figsize=(2.8 * cols, 2.5 * rows), layout="constrained")
            axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
            for extra in axes[len(names):]:
                extra.set_visible(False)
        else:
            axes = list(np.ravel(axes))
            fig = axes[0].figure
            if len(axes) != len(names):
                raise LayercritError(f"Expected {len(names)} axes, one per proxy, got {len(axes)}")
        for ax, name in zip(axes, names):
            g = pairs[pairs["proxy"] == name]
            for m, color in zip(models, _palette(len(models))):
                gm = g[g["model"] == m] if "model" in g else g
                ax.scatter(gm["value"], gm["criticality"] * 100, s=18, color=color, label=m, zorder=3,
                           edgecolors="white", linewidths=0.4)
                if len(models) == 1:
                    for _, r in gm.iterrows():
                        ax.annotate(str(r.get("label", r["layer"])), (r["value"], r["criticality"] * 100),
                                    fontsize=_SMALL, xytext=(2, 2), textcoords="offset points")
            r = _correlate(g["value"].to_numpy(float), g["criticality"].to_numpy(float))
            rho = "n/a" if math.isnan(r["spearman_r"]) else f"{r['spearman_r']:+.2f}"
            ax.set_title(f"{name}  (Spearman ρ = {rho}, n={r['n']})")
            ax.set_xlabel(name)
            ax.set_ylabel(f"{probe} criticality (%)")
            ax.grid(alpha=0.3)
        if len(models) > 1:
            axes[0].legend(frameon=False)
    return fig, axes[: len(names)]


def proxy_bump(proxies, criticality=None, ax=None, *, probes: Sequence[str] | None = None,
               proxy_names: Sequence[str] | None = None):
    """Ranking bump chart of the blocks under each proxy and under each probe's real criticality.

    One line per block; rank 1 = least important (pruned first).

    Args:
        proxies: a `ProxyResult` of one model (or its table, with `criticality`).
        criticality: `measure`'s result or table, or None (the `ProxyResult`'s own).
        ax: axes to draw into; default a new figure.
        probes: the criticality rankings to draw (default: every probe present).
        proxy_names: the proxy rankings to draw (default: every single-block proxy).
    """
    from .proxies import paired_table

    pairs = paired_table(proxies, criticality)
    if pairs.empty:
        raise LayercritError("no block has both a proxy value and a criticality: nothing to draw")
    _one_model(pairs, "proxy_bump")
    blocks = list(dict.fromkeys(pairs["layer"]))
    labels = dict(zip(pairs["layer"], pairs["label"] if "label" in pairs else pairs["layer"]))
    columns: dict[str, pd.Series] = {}
    for name in proxy_names or dict.fromkeys(pairs["proxy"]):
        g = pairs[pairs["proxy"] == name].drop_duplicates("layer").set_index("layer")["value"]
        if g.empty:
            raise LayercritError(f"unknown proxy {name!r}; present: {_listing(dict.fromkeys(pairs['proxy']))}")
        columns[name] = g
    for probe in probes or dict.fromkeys(pairs["probe"]):
        g = pairs[pairs["probe"] == probe].drop_duplicates("layer").set_index("layer")["criticality"]
        if g.empty:
            raise LayercritError(f"no criticality of probe {probe!r}; present: {_listing(dict.fromkeys(pairs['probe']))}")
        columns[f"{probe} (real)"] = g
    ranks = pd.DataFrame({k: v.reindex(blocks).rank(method="first") for k, v in columns.items()})
    with style():
        fig, ax = _new_axes(ax, (max(4.0, 1.1 * len(columns) + 1.5), max(2.5, 0.28 * len(blocks) + 1.0)))
        xs = np.arange(len(columns))
        for (block, row), color in zip(ranks.iterrows(), _palette(len(blocks))):
            ax.plot(xs, row.to_numpy(float), marker="o", markersize=4, color=color, linewidth=1.2)
            ax.annotate(str(labels[block]), (xs[-1], row.iloc[-1]), xytext=(4, 0), textcoords="offset points",
                        fontsize=_SMALL, va="center", color=color)
        ax.set_xticks(xs, list(columns), rotation=30, ha="right")
        ax.set_ylim(len(blocks) + 0.5, 0.5)
        ax.set_ylabel("rank (1 = least important)")
        ax.set_title("Block rankings: proxies vs real criticality")
        ax.grid(alpha=0.3, axis="x")
    return fig, ax


PLOTS["proxy-scatter"] = proxy_scatter
PLOTS["proxy-bump"] = proxy_bump


# --- distribution shift (layercrit.shifts) ---------------------------------------------------------


def shift_heatmaps(table, axes=None, *, probe: str | None = None, annotate: bool | None = None):
    """Per layer, criticality (%) on clean and on shifted data, and shifted − clean per shift and severity.

    Args:
        table: one model's results of `measure(..., shifts=[...])` (a `shift` column), or its result.
        axes: two axes (levels, differences); default a new figure.
        probe: the probe shown, when the table holds several.
        annotate: write the values in the cells (default: if at most 400 cells).

    Rows of the difference panel carry the Pearson correlation of the shifted with the clean profile.
    """
    from .shifts import CLEAN, shift_correlations, shift_summary

    t = _unwrap(table)
    _require(t, ["shift", "layer", "criticality"], "results table")
    _one_model(t, "shift_heatmaps")
    s = shift_summary(t, probe)
    pairs = list(dict.fromkeys(zip(s["probe"], s["target"])))
    if len(pairs) > 1:
        raise LayercritError(f"shift_heatmaps shows one probe; the table holds "
                             f"{_listing(_probe_label(p, g) for p, g in pairs)}: pass probe=")
    corr = shift_correlations(t, probe).set_index("shift")["pearson_r"]
    labels, shifts = list(dict.fromkeys(s["label"])), list(dict.fromkeys(s["shift"]))
    clean = s.drop_duplicates("label").set_index("label")["clean"]
    levels = pd.DataFrame([clean.reindex(labels).to_numpy(float)]
                          + [s[s["shift"] == sh].set_index("label")["shifted"].reindex(labels).to_numpy(float)
                             for sh in shifts], index=[f"{CLEAN} (clean)", *shifts], columns=labels) * 100
    diff = pd.DataFrame([s[s["shift"] == sh].set_index("label")["diff"].reindex(labels).to_numpy(float) for sh in shifts],
                        index=[f"{sh}  r={_num(corr.get(sh, math.nan), '.2f')}" for sh in shifts], columns=labels) * 100
    finite = np.abs(diff.to_numpy(float))
    finite = finite[np.isfinite(finite)]
    limit = max(1.0, float(np.ceil(finite.max()))) if finite.size else 1.0
    with style():
        if axes is None:
            from matplotlib.figure import Figure

            w1, h1 = _heatmap_size(levels)
            w2, h2 = _heatmap_size(diff)
            fig = Figure(figsize=(max(w1, w2), min(h1 + h2, 18.0)), layout="constrained")
            axes = fig.subplots(2, 1, height_ratios=[len(levels), len(diff)])
        fig = axes[0].figure
        _heatmap(axes[0], levels, cbar_label="criticality (%)", annotate=annotate)
        axes[0].set_title(f"Layer criticality ({_probe_label(*pairs[0])}), clean and shifted data")
        _heatmap(axes[1], diff, cmap="RdBu_r", vmin=-limit, vmax=limit, cbar_label="shifted − clean (%)",
                 annotate=annotate, fmt=_signed if limit >= 5 else _pct)
        axes[1].set_title("Shifted minus clean (r: Pearson correlation of the layer profiles)")
    return fig, axes


PLOTS["shift"] = shift_heatmaps
