"""Criticality under distribution shift: one heatmap per corruption, beside the clean data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .._utils.display import listing
from ..errors import LayercritError
from ._style import _heatmap, _heatmap_size, _one_model, _pct, _probe_label, _require, _signed, _unwrap, style
from .modcrit import _num


def shift_heatmaps(table, axes=None, *, probe: str | None = None, annotate: bool | None = None):
    """Per layer, criticality (%) on clean and on shifted data, and shifted − clean per shift and severity.

    Args:
        table: one model's results of `measure(..., shifts=[...])` (a `shift` column), or its result.
        axes: two axes (levels, differences); default a new figure.
        probe: the probe shown, when the table holds several.
        annotate: write the values in the cells (default: if at most 400 cells).

    Rows of the difference panel carry the Pearson correlation of the shifted with the clean profile.
    """
    from ..analyses.shifts import shift_correlations, shift_summary
    from ..results import CLEAN

    t = _unwrap(table)
    _require(t, ["shift", "layer", "criticality"], "results table")
    _one_model(t, "shift_heatmaps")
    s = shift_summary(t, probe)
    pairs = list(dict.fromkeys(zip(s["probe"], s["target"])))
    if len(pairs) > 1:
        raise LayercritError(f"shift_heatmaps shows one probe; the table holds "
                             f"{listing(_probe_label(p, g) for p, g in pairs)}: pass probe=")
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
