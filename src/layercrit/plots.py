"""Figures. Each function takes an optional axis, returns `(fig, ax)` and leaves global
matplotlib state untouched (styles are applied through a context manager)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from .io import atomic_path, check_output_path
from .results import UNMODIFIED

__all__ = ["criticality_heatmap", "save_figure", "style"]

_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "figure.dpi": 150}


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


def criticality_heatmap(table: pd.DataFrame, ax=None, rows: str = "probe", value: str = "criticality"):
    """Heatmap of mean criticality (%) with rows = `rows` (probe or model) × columns = layers.

    Cells are annotated with the mean over trials; the colour scale is 0–100 %.
    """
    data = table[table["layer"] != UNMODIFIED]
    order = list(dict.fromkeys(data["label"]))
    grid = data.groupby([rows, "label"], sort=False)[value].mean().unstack("label").reindex(columns=order) * 100
    with style():
        fig, ax = _new_axes(ax, (max(4.0, 0.7 * len(order) + 2), 0.5 * len(grid) + 1.6))
        im = ax.imshow(grid.to_numpy(dtype=float), vmin=0, vmax=100, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(order)), order, rotation=45, ha="right")
        ax.set_yticks(range(len(grid)), grid.index)
        for (i, j), v in np.ndenumerate(grid.to_numpy(dtype=float)):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="white" if v < 60 else "black", fontsize=7)
        fig.colorbar(im, ax=ax, label=f"{value} (%)")
        ax.set_title(f"Layer {value} (mean over trials)")
    return fig, ax


def save_figure(fig, path: str | Path) -> Path:
    """Save atomically (.png, .svg or .pdf)."""
    path = check_output_path(path, (".png", ".svg", ".pdf"))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:], bbox_inches="tight")
    return path
