"""Complexity measures of trained models and how well each ranks their generalization error
(Chatterji et al. 2020, Table 1 to 3).

Per model (a training run's final checkpoint against its checkpoint 0), over the modules i
(the probe-able layers; a module's θ is all of its parameters, weight and bias):

| column | measure |
|---|---|
| `ge` | generalization error: test − train 0-1 error (the final checkpoint's own metrics) |
| `log10_pfn` | log10 ∏_i ‖θᶠ_i‖_F (products overflow: kept as log10) |
| `log10_psn` | log10 ∏_i ‖W_i‖₂, the spectral norm of each module's weight reshaped to (out, rest) |
| `dti` | distance to initialization Σ_i ‖θᶠ_i − θ⁰_i‖²_F |
| `nop` | number of parameters of the model |
| `pac_bayes@ε` | Σ_i ‖θᶠ_i − θ⁰_i‖²_F / σ_i², σ_i the largest feasible σ at α = 1 |
| `network_criticality@ε` | Σ_i μ_i(ε) |

`rank_measures` gives Kendall's τ and Spearman's ρ (with p-values) of each measure against GE.

The last two depend on the search settings (ε, α grid, noise draws, σ bisection, training subset,
`--fast`): every row carries them in `search` (`describe_search`), and a `note` says why a
measure is undefined (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .._utils.display import format_number, format_p, format_percent, text_table
from .._utils.stats import correlation_note
from ..errors import LayercritError
from ..training.checkpoints import Run
from ..units.layers import select_units
from .modcrit import describe_search, network_note, run_module_criticality
from .robustness import spectral_norm

__all__ = ["complexity_measures", "describe_search", "network_note", "rank_measures", "rank_runs"]


def _own_loss(value: float, loss: str) -> str:
    return f"{100 * value:.2f} %" if loss == "error" else f"{value:.4g}"


def complexity_measures(run: Run | str | Path, epsilon: Sequence[float] = (0.1,), progress: bool = False,
                        **modcrit_settings) -> tuple[dict, pd.DataFrame]:
    """The measures of one run's final model; also the per-module criticality table behind them.

    Args:
        run: a checkpoint folder written by `layercrit train` (with held-out test metrics).
        epsilon: error thresholds for the PAC-Bayes and network-criticality measures.
        progress: show progress bars.
        **modcrit_settings: further `ModcritConfig` fields (alphas, noise_draws, train_subset, ...).
    """
    run = run if isinstance(run, Run) else Run(run)
    metrics = run.checkpoint(run.final_epoch).get("metrics") or {}
    if "test_error" not in metrics:
        raise LayercritError(f"the final checkpoint of {str(run.path)!r} has no test error: train it with --test-data")
    model, theta0 = run.model(), run.state_dict(0)
    units = select_units(model, layers=modcrit_settings.get("layers"), include_norm=modcrit_settings.get("include_norm", False))
    params = dict(model.named_parameters())
    log_pfn = log_psn = dti = 0.0
    for u in units:
        log_pfn += math.log10(math.sqrt(sum(float(params[p].detach().double().pow(2).sum()) for p in u.params)))
        weight = max((params[p] for p in u.params), key=lambda t: (t.ndim, t.numel()))
        log_psn += math.log10(spectral_norm(weight))
        dti += sum(float((params[p].detach().double() - theta0[p].double()).pow(2).sum()) for p in u.params)
    row = {
        "model": run.path.name,
        "train_error": metrics["train_error"],
        "test_error": metrics["test_error"],
        "ge": metrics["test_error"] - metrics["train_error"],
        "log10_pfn": log_pfn,
        "log10_psn": log_psn,
        "dti": dti,
        "nop": sum(p.numel() for p in model.parameters()),
    }
    # Only μ and σ at α = 1 are needed here: the pruned search gives both without the whole curve.
    settings = {"curve": False} | modcrit_settings
    result = run_module_criticality(run, epsilon=list(epsilon), progress=progress, **settings)
    undefined = []
    for _, n in result.network.iterrows():
        row[f"pac_bayes@{n['epsilon']:g}"] = n["pac_bayes"]
        row[f"network_criticality@{n['epsilon']:g}"] = n["network_criticality"]
        if math.isnan(n["network_criticality"]):
            undefined.append(f"{n['epsilon']:g}")
    loss = result.config.get("loss", "error")
    row["evaluations"] = result.evaluations
    row["search"] = describe_search(result.config)
    row["note"] = (f"undefined at ε = {', '.join(undefined)}: modules infeasible (training {loss} above the threshold even at "
                   f"α = 1; the model's own: {_own_loss(result.config['base_train_loss'], loss)})" if undefined else "")
    return row, result.table


def rank_measures(models: pd.DataFrame, against: str = "ge") -> pd.DataFrame:
    """Kendall's τ and Spearman's ρ (with p-values) of every measure column against `against`.

    A measure that is NaN for some model is ranked over the models where it is defined (`n` says how
    many). `note` says why a correlation is undefined (fewer than 3 models, a constant) or why its
    p-value means little (fewer than 5 models).
    """
    from scipy import stats  # lazily: `import layercrit` should not pay for scipy.stats

    skip = {"model", against, "train_error", "test_error", "evaluations"}
    rows = []
    for col in [c for c in models.columns if c not in skip and pd.api.types.is_numeric_dtype(models[c])]:
        d = models[[col, against]].dropna()
        n = len(d)
        if n >= 3 and d[col].nunique() > 1 and d[against].nunique() > 1:
            tau, tau_p = stats.kendalltau(d[col], d[against])
            rho, rho_p = stats.spearmanr(d[col], d[against])
        else:  # a constant measure carries no ranking
            tau = tau_p = rho = rho_p = math.nan
        rows.append({"measure": col, "against": against, "n": n, "kendall_tau": float(tau), "kendall_p": float(tau_p),
                     "spearman_rho": float(rho), "spearman_p": float(rho_p),
                     "note": correlation_note(n, d[col].to_numpy(float), d[against].to_numpy(float))})
    return pd.DataFrame(rows)


def rank_runs(runs: Sequence[Run | str | Path], epsilon: Sequence[float] = (0.1,), progress: bool = False,
              **modcrit_settings) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Measures of every run and their rank correlation with the generalization error.

    Returns:
        (one row of measures per model, one row per measure with Kendall's τ and Spearman's ρ).
    """
    if len(runs) < 2:
        raise LayercritError(f"ranking needs at least two checkpoint folders, got {len(runs)}")
    rows = [complexity_measures(r, epsilon, progress=progress, **modcrit_settings)[0] for r in runs]
    names = [r["model"] for r in rows]
    if len(set(names)) != len(names):
        raise LayercritError(f"checkpoint folders must have distinct names, got {names}")
    models = pd.DataFrame(rows)
    return models, rank_measures(models)


def format_ranking(models: pd.DataFrame, ranking: pd.DataFrame) -> str:
    """The tables printed by `rank`: measures per model (errors in %), the search settings beside
    the module-criticality measures, notes for undefined values, and the rank correlations with GE
    (p-values below 0.001 as <0.001, small samples noted)."""
    errors = [c for c in ("train_error", "test_error", "ge") if c in models]
    lines = [text_table(models.drop(columns=[c for c in ("search", "note") if c in models]),
                    dict.fromkeys(errors, format_percent), {c: f"{c} %" for c in errors})]
    if "note" in models:
        lines += [f"note: {m}: {n}" for m, n in zip(models["model"], models["note"]) if isinstance(n, str) and n]
    if "search" in models:
        searches = dict(zip(models["model"], models["search"]))
        if len(set(searches.values())) == 1:
            lines.append(f"module-criticality search (pac_bayes@ε, network_criticality@ε): {models['search'].iloc[0]}")
        else:
            lines += [f"module-criticality search of {m}: {s}" for m, s in searches.items()]
    lines += ["", "rank correlation of each measure with the generalization error (GE = test − train error)"]
    signed = lambda v: format_number(v, 3, sign=True)  # noqa: E731
    lines.append(text_table(ranking, {"kendall_p": format_p, "spearman_p": format_p, "kendall_tau": signed,
                                  "spearman_rho": signed}))
    return "\n".join(lines)
