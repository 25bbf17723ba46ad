"""Zhang et al.'s figures: the re-initialization robustness heatmap (Fig. 1a; joint groups Figs. 8-10)
and weight distances to the initialization (Fig. 1b-c)."""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from ..analyses.robustness import CHECKPOINT
from ..errors import LayercritError
from ..results import UNMODIFIED, CriticalityResult
from ._style import (
    _heatmap,
    _heatmap_size,
    _new_axes,
    _one_model,
    _palette,
    _probe_label,
    _require,
    _short,
    _unwrap,
    style,
)


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
