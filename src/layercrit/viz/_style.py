"""What every figure shares: the scoped matplotlib style, axes, palettes, limits in %, the heatmap
machinery and `save_figure`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .._utils.display import listing
from .._utils.io import atomic_path, check_output_path
from ..errors import LayercritError
from ..results import CriticalityResult

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
        raise LayercritError(f"{what} lacks columns {', '.join(missing)}; columns present: {listing(df.columns)}")


def _unwrap(data) -> pd.DataFrame:
    table = data.table if isinstance(data, CriticalityResult) else data
    if not isinstance(table, pd.DataFrame):
        raise LayercritError(f"Expected a results DataFrame or CriticalityResult, got {type(data).__name__}")
    return table


def _one_model(df: pd.DataFrame, what: str) -> None:
    models = list(dict.fromkeys(df["model"])) if "model" in df.columns else []
    if len(models) > 1:
        raise LayercritError(f"{what} shows one model; the table holds {len(models)} ({listing(models)}): "
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


def save_figure(fig, path: str | Path) -> Path:
    """Save atomically (.png, .svg or .pdf)."""
    path = check_output_path(path, (".png", ".svg", ".pdf"))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:], bbox_inches="tight")
    return path
