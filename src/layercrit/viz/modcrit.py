"""Chatterji et al.'s figures: module criticality curves (Fig. 4), network criticality vs ε (Fig. 5),
and the ranking table of complexity measures (Tables 1-3)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .._utils.display import format_p, listing
from .._utils.stats import SMALL_N
from ..analyses.modcrit import ModcritResult
from ..errors import LayercritError
from ._style import _SMALL, Limits, _new_axes, _one_model, _palette, _require, _set_limits, style


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
        raise LayercritError(f"no curve for ε = {epsilon:g}; ε present: {listing(f'{e:g}' for e in eps)}")
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
            raise LayercritError(f"unknown modules {listing(unknown)}; modules present: {listing(label)}")
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
                                 f"{measure}@ε columns; columns present: {listing(network.columns)}")
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
