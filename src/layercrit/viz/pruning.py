"""Perplexity after pruning: one line per ranking, perplexity against the number of blocks skipped."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._utils.display import listing
from ..errors import LayercritError
from ._style import _new_axes, _one_model, _palette, _require, style

# How each ranking is called in the legend (others keep their own name).
_NAMES = {"bi_token": "BI (ShortGPT)", "angular_last": "angular distance, last token (Gromov)",
          "angular_all": "angular distance, all tokens", "relative_l2": "relative L2", "skip": "single-block skip (real)",
          "rerandomize": "rerandomize criticality (real)", "greedy": "greedy (skip the cheapest next)"}


def pruning_curve_plot(curve, ax=None, *, rankings: Sequence[str] | None = None, metric: str = "perplexity",
                       log: bool | None = None):
    """Perplexity (or accuracy) of the model with the k least important blocks of each ranking skipped.

    One line per ranking; k = 0 is the unmodified model, also drawn as a dotted horizontal line.

    Args:
        curve: a `PruningCurve` or its table.
        ax: the axes to draw on (default: a new figure).
        rankings: the rankings to draw (default: all).
        metric: "perplexity" (default), "accuracy" (in %) or "loss".
        log: a log y axis (default: for perplexity).

    Returns:
        (fig, ax).
    """
    table = getattr(curve, "table", curve)
    if not isinstance(table, pd.DataFrame):
        raise LayercritError(f"Expected a PruningCurve or its table, got {type(curve).__name__}")
    _require(table, ["ranking", "k", metric], "the pruning-curve table")
    if metric not in ("perplexity", "accuracy", "loss"):
        raise LayercritError(f"Expected `metric` to be perplexity, accuracy or loss, got {metric!r}")
    _one_model(table, "a pruning curve")
    present = list(dict.fromkeys(table["ranking"]))
    names = list(rankings or present)
    unknown = [r for r in names if r not in present]
    if unknown:
        raise LayercritError(f"unknown ranking {unknown[0]!r}; present: {listing(present)}")
    if table.empty:
        raise LayercritError("the pruning-curve table is empty: nothing to draw")
    log = metric == "perplexity" if log is None else log
    scale = 100.0 if metric == "accuracy" else 1.0
    with style():
        fig, ax = _new_axes(ax, (6.4, 4.0))
        markers = "osD^v<>ph*"
        for i, (name, color) in enumerate(zip(names, _palette(len(names)))):
            g = table[table["ranking"] == name].sort_values("k")
            ax.plot(g["k"], g[metric] * scale, marker=markers[i % len(markers)], ms=3.5, lw=1.4, color=color,
                    label=_NAMES.get(name, name), ls="--" if name == "greedy" else "-")
        base = table[table["k"] == 0][metric]
        if len(base):
            ax.axhline(float(base.iloc[0]) * scale, color="0.4", lw=0.8, ls=":", label="unmodified")
        if log:
            ax.set_yscale("log")
        ks = np.sort(table["k"].unique())
        ax.set_xticks(ks if len(ks) <= 16 else ks[:: -(-len(ks) // 16)])
        ax.set_xlabel("blocks skipped (k)")
        ax.set_ylabel({"perplexity": "perplexity", "accuracy": "next-token accuracy (%)", "loss": "loss (nats)"}[metric])
        model = str(table["model"].iloc[0]) if "model" in table.columns else ""
        ax.set_title(f"{model}: {metric} after skipping the k least important blocks".strip(": "))
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize="small")
    return fig, ax
