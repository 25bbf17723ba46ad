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

`PLOTS` maps the CLI's plot kinds to these functions."""

from __future__ import annotations

from collections.abc import Callable

from ._style import save_figure, style
from .criticality import (
    criticality_bars,
    criticality_heatmap,
    criticality_vs_accuracy,
    criticality_vs_metadata,
    difference_heatmap,
    spread_heatmap,
)
from .modcrit import modcrit_curves, network_criticality_vs_epsilon, ranking_table
from .proxies import proxy_bump, proxy_scatter
from .pruning import pruning_curve_plot
from .robustness import distance_heatmaps, robustness_heatmap
from .shifts import shift_heatmaps

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
    "proxy-scatter": proxy_scatter,
    "proxy-bump": proxy_bump,
    "pruning-curve": pruning_curve_plot,
    "shift": shift_heatmaps,
}

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
    "pruning_curve_plot",
    "proxy_scatter",
    "ranking_table",
    "robustness_heatmap",
    "save_figure",
    "shift_heatmaps",
    "spread_heatmap",
    "style",
]


def list_plots() -> dict[str, str]:
    """Plot kind → the first line of its function's docstring."""
    return {k: (f.__doc__ or "").strip().splitlines()[0] for k, f in PLOTS.items()}

