"""Block proxies beside real criticality: paired tables, rank correlations with bootstrap intervals,
and the pruning overlap of the rankings (`compare_proxies`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ...errors import LayercritError, check_int
from ...results import UNMODIFIED
from .result import CRIT_SAMPLE_COLUMNS, ProxyComparison, ProxyResult, _empty


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's ρ of each row pair of (R, L) arrays (average ranks for ties); NaN for a constant row."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _kendall_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's τ-b of each row pair of (R, L) arrays (scipy's default variant); NaN for a constant row."""
    i, j = np.triu_indices(x.shape[1], 1)
    sx, sy = np.sign(x[:, i] - x[:, j]), np.sign(y[:, i] - y[:, j])
    den = np.sqrt(np.abs(sx).sum(1) * np.abs(sy).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (sx * sy).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def _resample_means(values: np.ndarray, weights: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Weighted means per column for each resample: values, weights (N, L), counts (R, N) → (R, L)."""
    ok = (weights > 0) & np.isfinite(values)  # a sample without tokens (or rows) counts for nothing
    weights = np.where(ok, weights, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ (weights * np.where(ok, values, 0.0))) / (counts @ weights)


def bootstrap_rank_correlations(x_values: np.ndarray, x_weights: np.ndarray, y_values: np.ndarray,
                                y_weights: np.ndarray, resamples: int = 1000, seed: int = 0,
                                level: float = 0.95) -> dict[str, float]:
    """Percentile bootstrap intervals of Spearman's ρ and Kendall's τ between two per-unit rankings.

    Both sides hold per-sample values of the same N samples for the same L units, (N, L), and the
    weight of each (a token count, or 1): a unit's value is Σ w·v / Σ w over the samples. The N
    samples are drawn with replacement, the same draw for both sides (they are paired), from a
    NumPy generator seeded with `seed`; resamples whose ranking is constant are left out.
    """
    n = x_values.shape[0]
    rng = np.random.default_rng(seed)
    rho, tau = [], []
    for start in range(0, resamples, 256):  # chunks bound the (R, N) count matrix
        r = min(256, resamples - start)
        counts = np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(r)]).astype(float)
        xm = _resample_means(x_values, x_weights, counts)
        ym = _resample_means(y_values, y_weights, counts)
        rho.append(_spearman_rows(xm, ym))
        tau.append(_kendall_rows(xm, ym))
    rho, tau = np.concatenate(rho), np.concatenate(tau)
    q = [50 * (1 - level), 50 * (1 + level)]

    def interval(v: np.ndarray) -> tuple[float, float]:
        v = v[~np.isnan(v)]
        return tuple(float(a) for a in np.percentile(v, q)) if len(v) else (math.nan, math.nan)

    (rl, rh), (tl, th) = interval(rho), interval(tau)
    return {"spearman_low": rl, "spearman_high": rh, "kendall_low": tl, "kendall_high": th,
            "bootstrap": int((~np.isnan(rho)).sum())}


def _proxy_inputs(proxies: ProxyResult | pd.DataFrame) -> ProxyResult:
    if isinstance(proxies, ProxyResult):
        return proxies
    if isinstance(proxies, pd.DataFrame):
        return ProxyResult(proxies)
    raise LayercritError(f"Expected proxies as a ProxyResult or a DataFrame, got {type(proxies).__name__}")


def _criticality_inputs(criticality, result: ProxyResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The criticality table (measure's or `proxies`' own) and its per-sample values (maybe empty)."""
    if criticality is None:
        if result.criticality.empty:
            raise LayercritError("no criticality to compare with: pass a criticality table (from `measure`) or "
                                 "proxies computed with `against`")
        return result.criticality, result.criticality_samples
    if isinstance(criticality, ProxyResult):
        return criticality.criticality, criticality.criticality_samples
    table = getattr(criticality, "table", criticality)
    if not isinstance(table, pd.DataFrame):
        raise LayercritError(f"Expected criticality as a CriticalityResult or a DataFrame, got {type(criticality).__name__}")
    return table, _empty(CRIT_SAMPLE_COLUMNS)  # measure's tables hold means only: no bootstrap over samples


def paired_table(proxies: ProxyResult | pd.DataFrame, criticality=None, value: str = "criticality") -> pd.DataFrame:
    """Each single-block proxy beside each probe's criticality (mean over trials) of the same block:
    model, layer, label, proxy, value, probe, criticality — the rows the proxy plots draw."""
    result = _proxy_inputs(proxies)
    crit, _ = _criticality_inputs(criticality, result)
    table = result.table
    if "n" in table.columns:
        table = table[table["n"].fillna(1) == 1]
    crit = crit[crit["layer"] != UNMODIFIED]
    keys = [k for k in ("model", "layer") if k in table.columns and k in crit.columns]
    real = crit.groupby(keys + ["probe"], sort=False)[value].mean().rename("criticality").reset_index()
    cols = [c for c in ("model", "layer", "label", "proxy", "value") if c in table.columns]
    return table[cols].merge(real, on=keys, how="inner")


def _per_sample(df: pd.DataFrame, column: str, layers: list[str],
                weight: str = "weight") -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(sample ids, values (N, L), weights (N, L)) of long per-sample rows, averaged over trials; None if
    a layer has no rows."""
    if df.empty or set(layers) - set(df["layer"]):
        return None
    df = df[df["layer"].isin(layers)]
    g = df.groupby(["sample", "layer"], sort=True).agg(value=(column, "mean"), weight=(weight, "mean"))
    values = g["value"].unstack("layer").reindex(columns=layers)
    weights = g["weight"].unstack("layer").reindex(columns=layers).fillna(0.0)  # NaN values weigh nothing
    return values.index.to_numpy(), values.to_numpy(float), weights.to_numpy(float)


def _lowest(values: pd.Series, k: int) -> list[str]:
    """The k layers with the lowest values (ties in block order: a stable sort)."""
    return list(values.sort_values(kind="stable").index[:k])


def compare_proxies(
    proxies: ProxyResult | pd.DataFrame,
    criticality=None,
    *,
    probes: Sequence[str] | None = None,
    value: str = "criticality",
    bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ProxyComparison:
    """How well each proxy ranks the blocks as their real criticality does.

    For every single-block proxy (n = 1) and every probe: Spearman's ρ and Kendall's τ over the blocks
    (scipy, with p-values), percentile bootstrap intervals over samples (the per-sample values of both
    sides resampled together, seeded; only where both sides have them), and for k = 1 … L/2 the overlap
    of the k least important blocks by the proxy and by the criticality, with the measured effect of
    skipping each set at once where `proxies` measured it.

    Args:
        proxies: a `ProxyResult` (or its table).
        criticality: `measure`'s result or table (mean over trials per block and probe); None: the
            criticality `proxies` measured itself (`skip`, and the probes in its `against`).
        probes: which probes to compare with (default: every probe in the criticality table).
        value: the criticality column to rank by.
        bootstrap: resamples (0: no intervals).
        seed: seed of the resampling.
        level: coverage of the intervals.
    """
    from ..._utils.stats import rank_correlation

    check_int("bootstrap", bootstrap, low=0)
    if not 0 < level < 1:
        raise LayercritError(f"Expected `level` to be between 0 and 1, got {level!r}")
    result = _proxy_inputs(proxies)
    crit, crit_samples = _criticality_inputs(criticality, result)
    for name, df, cols in (("proxies", result.table, ("layer", "proxy", "value")), ("criticality", crit, ("layer", "probe", value))):
        missing = set(cols) - set(df.columns)
        if missing:
            raise LayercritError(f"{name} table lacks columns {', '.join(sorted(missing))}")
    crit = crit[crit["layer"] != UNMODIFIED]
    table = result.table
    for name, df in (("proxies", table), ("criticality", crit)):
        models = list(dict.fromkeys(df["model"])) if "model" in df.columns else []
        if len(models) > 1:
            raise LayercritError(f"the {name} table holds {len(models)} models ({', '.join(map(str, models[:4]))}); "
                                 "compare one model at a time")
    if "n" in table.columns:
        table = table[table["n"].fillna(1) == 1]
    labels = dict(zip(table["layer"], table.get("label", table["layer"])))
    available = list(dict.fromkeys(crit["probe"]))
    probes = available if probes is None else list(probes)
    unknown = [p for p in probes if p not in available]
    if unknown:
        raise LayercritError(f"no criticality of probe(s) {', '.join(unknown)}; the table has {', '.join(available) or 'none'}")
    measured = _pruned_lookup(result.pruning)
    corr_rows, prune_rows = [], []
    for probe in probes:
        real = crit[crit["probe"] == probe].groupby("layer", sort=False)[value].mean()
        real_samples = crit_samples[crit_samples["probe"] == probe] if not crit_samples.empty else crit_samples
        for proxy in dict.fromkeys(table["proxy"]):
            mine = table[table["proxy"] == proxy].set_index("layer")["value"].astype(float)
            layers = [la for la in mine.index if la in real.index and np.isfinite(mine[la]) and np.isfinite(real[la])]
            x, y = mine[layers].to_numpy(float), real[layers].to_numpy(float)
            stats = rank_correlation(x, y)
            row = {"proxy": proxy, "probe": probe, "blocks": stats.pop("n")} | stats
            row |= {"spearman_low": math.nan, "spearman_high": math.nan, "kendall_low": math.nan,
                    "kendall_high": math.nan, "bootstrap": 0}
            if bootstrap and np.isfinite(row["spearman_r"]):
                row |= _bootstrap(result.samples, real_samples, proxy, value, layers, bootstrap, seed, level, row)
            corr_rows.append(row)
            mine_s, real_s = mine[layers], real[layers]
            for k in range(1, len(layers) // 2 + 1):
                a, b = _lowest(mine_s, k), _lowest(real_s, k)
                prow = {"proxy": proxy, "probe": probe, "k": k, "overlap": len(set(a) & set(b)) / k,
                        "pruned_by_proxy": ";".join(labels.get(la, la) for la in a),
                        "pruned_by_probe": ";".join(labels.get(la, la) for la in b),
                        "blocks_by_proxy": ";".join(a), "blocks_by_probe": ";".join(b)}
                for side, blocks in (("proxy", a), ("probe", b)):
                    effect = measured.get(frozenset(blocks), {})
                    prow |= {f"{m}_{side}": effect.get(m, math.nan) for m in ("criticality", "loss")}
                prune_rows.append(prow)
    correlations = pd.DataFrame(corr_rows, columns=CORRELATION_COLUMNS)
    pruning = pd.DataFrame(prune_rows, columns=PRUNE_COLUMNS)
    config = {"probes": probes, "value": value, "bootstrap": bootstrap, "seed": seed, "level": level,
              "model": result.config.get("model")}
    return ProxyComparison(correlations, pruning, config)


CORRELATION_COLUMNS = ["proxy", "probe", "blocks", "spearman_r", "spearman_p", "spearman_low", "spearman_high",
                       "kendall_tau", "kendall_p", "kendall_low", "kendall_high", "bootstrap", "note"]


PRUNE_COLUMNS = ["proxy", "probe", "k", "overlap", "pruned_by_proxy", "pruned_by_probe", "criticality_proxy",
                 "loss_proxy", "criticality_probe", "loss_probe", "blocks_by_proxy", "blocks_by_probe"]


def _pruned_lookup(pruning: pd.DataFrame) -> dict[frozenset, dict[str, float]]:
    if pruning is None or pruning.empty:
        return {}
    return {frozenset(str(r["blocks"]).split(";")): {m: float(r[m]) for m in ("criticality", "loss") if m in r}
            for _, r in pruning.iterrows()}


def _bootstrap(samples: pd.DataFrame, real_samples: pd.DataFrame, proxy: str, value: str, layers: list[str],
               resamples: int, seed: int, level: float, row: dict) -> dict:
    """Bootstrap intervals where both sides have per-sample values of the same samples, else a note."""
    mine = samples[(samples["proxy"] == proxy) & (samples["n"].fillna(1) == 1)] if not samples.empty else samples
    a = _per_sample(mine, "value", layers)
    weight = "loss_weight" if value == "loss" else "weight"
    b = _per_sample(real_samples, value, layers, weight) if value in real_samples.columns else None
    if a is None or b is None:
        side = "the proxy" if a is None else "the criticality"
        return {"note": _join(row["note"], f"no per-sample values of {side}: no bootstrap interval")}
    if not np.array_equal(a[0], b[0]):
        raise LayercritError(f"proxy {proxy!r} and the criticality were measured on different samples; "
                             "compare them on the same data (same data spec, images and data seed)")
    return bootstrap_rank_correlations(a[1], a[2], b[1], b[2], resamples, seed, level)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)
