"""Block proxies against real criticality: scatter of proxy vs criticality, and the bump chart of ranks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._utils.display import listing
from .._utils.stats import rank_correlation
from ..errors import LayercritError
from ._style import _SMALL, _new_axes, _one_model, _palette, style


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
    from ..analyses.proxies.compare import paired_table

    pairs = paired_table(proxies, criticality)
    if pairs.empty:
        raise LayercritError("no block has both a proxy value and a criticality: nothing to draw")
    probes = list(dict.fromkeys(pairs["probe"]))
    probe = probe or ("rerandomize" if "rerandomize" in probes else probes[0])
    if probe not in probes:
        raise LayercritError(f"no criticality of probe {probe!r}; present: {listing(probes)}")
    pairs = pairs[pairs["probe"] == probe]
    names = list(proxy_names or dict.fromkeys(pairs["proxy"]))
    unknown = [p for p in names if p not in set(pairs["proxy"])]
    if unknown:
        raise LayercritError(f"unknown proxy {unknown[0]!r}; present: {listing(dict.fromkeys(pairs['proxy']))}")
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
            r = rank_correlation(g["value"].to_numpy(float), g["criticality"].to_numpy(float))
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
    from ..analyses.proxies.compare import paired_table

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
            raise LayercritError(f"unknown proxy {name!r}; present: {listing(dict.fromkeys(pairs['proxy']))}")
        columns[name] = g
    for probe in probes or dict.fromkeys(pairs["probe"]):
        g = pairs[pairs["probe"] == probe].drop_duplicates("layer").set_index("layer")["criticality"]
        if g.empty:
            raise LayercritError(f"no criticality of probe {probe!r}; present: {listing(dict.fromkeys(pairs['probe']))}")
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
