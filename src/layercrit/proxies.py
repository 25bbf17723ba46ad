"""Cheap block proxies of the layer-pruning literature, and how well they agree with real resets.

The pruning literature ranks the blocks of a residual network by similarity proxies computed in one
pass and drops the lowest: ShortGPT's Block Influence BI = 1 − cos(x_in, x_out) of each token, Gromov
et al.'s angular distance arccos(cos(x^ℓ, x^{ℓ+n}))/π at the last token. `proxies` computes them (and
the relative L2 change ‖x_out − x_in‖/‖x_in‖ and the effect of skipping each block) from hooks on the
blocks — the residual stream entering block ℓ (forward pre-hook) and its output (forward hook), never
the post-norm `hidden_states[-1]` — row-wise, clamped before `arccos`, in float64, padding masked.
`compare_proxies` puts them beside the real criticality of the same blocks on the same data.

Cosine with a zero vector: cos(a, b) = a·b / max(‖a‖‖b‖, eps), so a zero vector is orthogonal to
everything (cos 0, BI 1, angular distance 0.5) instead of NaN.

Hidden states are read batch-first: (B, T, D) gives T tokens per sample, (B, D) one, and a
(B, C, H, W) feature map (a ResNet stage) one vector of C·H·W per sample.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .errors import LayercritError, check_int
from .io import check_output_path
from .measures import sample_measures
from .results import UNMODIFIED, save_table

__all__ = [
    "EPS",
    "ProxyComparison",
    "ProxyResult",
    "angular_distance",
    "block_influence",
    "bootstrap_rank_correlations",
    "compare_proxies",
    "cosine",
    "format_proxies",
    "format_proxy_comparison",
    "last_positions",
    "paired_table",
    "proxies",
    "relative_l2",
    "sample_means",
]

EPS = 1e-12  # floor of ‖a‖‖b‖ in the cosine (and of ‖x_in‖ in the relative L2 change)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) in float64: tokens stay, (B, D) is one token, (B, C, H, W, …) one flat vector."""
    x = x.detach().double()
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        return x[:, None]
    if x.ndim >= 4:
        return x.flatten(1)[:, None]
    raise LayercritError(f"expected hidden states of shape (batch, …) with at least 2 dims, got {tuple(x.shape)}")


def _valid(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: which tokens of `x` (already (B, T, D)) count; `mask` is an attention mask."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise LayercritError(f"mask of shape {tuple(mask.shape)} does not fit hidden states {tuple(x.shape)}")
    return mask.to(x.device) != 0


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Row-wise cosine along the last dimension, in float64, clamped to [−1, 1].

    a·b / max(‖a‖‖b‖, eps): a zero vector gives 0, not NaN; the clamp keeps round-off (1 + 1e-16) out
    of `arccos`'s domain error. Never a matrix product of all rows against all rows.
    """
    a, b = a.detach().double(), b.detach().double()
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return (dot / norms.clamp_min(eps)).clamp(-1.0, 1.0)


def _masked(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(~valid, math.nan)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ShortGPT's Block Influence of each token, 1 − cos(x_in, x_out): (B, T) float64, NaN where padded.

    Args:
        x_in: the residual stream entering the block.
        x_out: the block's output.
        mask: (B, T) attention mask (1 = token, 0 = padding), or None.
    """
    a, b = _tokens(x_in), _tokens(x_out)
    return _masked(1.0 - cosine(a, b), _valid(mask, a))


def angular_distance(x_a: torch.Tensor, x_b: torch.Tensor, mask: torch.Tensor | None = None,
                     last_only: bool = False) -> torch.Tensor:
    """Gromov et al.'s angular distance arccos(cos(x_a, x_b))/π ∈ [0, 1] of each token.

    Args:
        x_a: the residual stream entering block ℓ.
        x_b: the output of block ℓ+n−1 (the stream entering block ℓ+n).
        mask: (B, T) attention mask, or None.
        last_only: only the last non-padded token of each sample (Gromov et al.): shape (B,);
            else (B, T), NaN where padded.
    """
    a, b = _tokens(x_a), _tokens(x_b)
    valid = _valid(mask, a)
    if last_only:
        rows = torch.arange(len(a), device=a.device)
        last = last_positions(valid)
        return torch.arccos(cosine(a[rows, last], b[rows, last])) / math.pi
    return _masked(torch.arccos(cosine(a, b)) / math.pi, valid)


def relative_l2(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None,
                eps: float = EPS) -> torch.Tensor:
    """‖x_out − x_in‖ / max(‖x_in‖, eps) of each token: (B, T) float64, NaN where padded."""
    a, b = _tokens(x_in), _tokens(x_out)
    return _masked((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(eps), _valid(mask, a))


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padded token of each row of a (B, T) mask (right or left padding)."""
    valid = mask != 0
    if not bool(valid.any(1).all()):
        raise LayercritError("a sample has no tokens: every position of its attention mask is 0")
    t = valid.shape[1]
    return (t - 1) - valid.flip(1).int().argmax(1)


def sample_means(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample of a (B, T) table with NaN at padding: the mean over its tokens and their number.

    The mean over all tokens of a data set is then Σ count·mean / Σ count (a ratio the bootstrap
    can resample sample by sample), the mean over sequences the plain mean of the means.
    """
    if values.ndim == 1:
        values = values[:, None]
    valid = ~values.isnan()
    count = valid.sum(1)
    return values.nan_to_num(0.0).sum(1) / count.clamp_min(1), count


# --- rank statistics, vectorized over bootstrap resamples ------------------------------------------


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


# --- results --------------------------------------------------------------------------------------

PROXY_COLUMNS = ["model", "layer", "label", "proxy", "n", "value", "samples", "tokens", "note"]
SAMPLE_COLUMNS = ["sample", "layer", "proxy", "n", "value", "weight"]
CRITICALITY_COLUMNS = ["model", "layer", "label", "probe", "trial", "seed", "n", "criticality", "loss"]
CRIT_SAMPLE_COLUMNS = ["sample", "layer", "probe", "trial", "criticality", "loss", "weight", "loss_weight"]
PRUNING_COLUMNS = ["blocks", "k", "criticality", "loss"]
_PARTS = ("samples", "criticality", "criticality_samples", "pruning")


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(columns=columns)


@dataclass
class ProxyResult:
    """Result of `proxies`.

    Attributes:
        table: one row per (block, proxy, n): the proxy's value over the data, the number of samples and
            tokens it averages, and a note where it is undefined (shapes that differ, …).
        samples: the per-sample values behind `table` (sample, layer, proxy, n, value, weight), so that
            `compare_proxies` can bootstrap over samples; a proxy's value is Σ weight·value / Σ weight.
        criticality: real criticality of the same blocks on the same data, one row per (block, probe,
            trial): `skip` always (it is what `skip_loss` needs), and the probes in `against`.
        criticality_samples: its per-sample values (sample, layer, probe, trial, criticality, loss, weight).
        pruning: the model with several blocks skipped at once (blocks ";"-joined, k): its criticality
            and, with labels, its loss — for every set of the k least important blocks of some ranking.
        config: the resolved settings.
    """

    table: pd.DataFrame
    samples: pd.DataFrame = field(default_factory=lambda: _empty(SAMPLE_COLUMNS))
    criticality: pd.DataFrame = field(default_factory=lambda: _empty(CRITICALITY_COLUMNS))
    criticality_samples: pd.DataFrame = field(default_factory=lambda: _empty(CRIT_SAMPLE_COLUMNS))
    pruning: pd.DataFrame = field(default_factory=lambda: _empty(PRUNING_COLUMNS))
    config: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write `.csv` (the other tables as `<stem>.<part>.csv` beside it, the config as
        `<stem>.config.json`) or one `.json` holding everything."""
        path = check_output_path(path, (".csv", ".json"))
        extra = {k: getattr(self, k) for k in _PARTS}
        if path.suffix.lower() == ".json":
            return save_table(self.table, path, self.config, extra)
        for k, df in extra.items():
            save_table(df, path.with_name(f"{path.stem}.{k}.csv"))
        return save_table(self.table, path, self.config)

    @classmethod
    def load(cls, path: str | Path) -> ProxyResult:
        """Read a result written by `save` (sibling tables that are missing are empty)."""
        path = Path(path)
        if not path.is_file():
            raise LayercritError(f"proxies file {str(path)!r} does not exist")
        try:
            if path.suffix.lower() == ".json":
                doc = json.loads(path.read_text())
                parts = {k: pd.DataFrame(doc.get(k, [])) for k in _PARTS}
                table, config = pd.DataFrame(doc["rows"]), doc.get("config", {})
            else:
                table = pd.read_csv(path)
                parts = {}
                for k in _PARTS:
                    p = path.with_name(f"{path.stem}.{k}.csv")
                    parts[k] = pd.read_csv(p) if p.is_file() and p.stat().st_size > 1 else pd.DataFrame()
                c = path.with_suffix(".config.json")
                config = json.loads(c.read_text()) if c.is_file() else {}
        except (ValueError, KeyError, OSError) as e:
            raise LayercritError(f"cannot read proxies file {str(path)!r}: {e}") from None
        missing = {"layer", "proxy", "value"} - set(table.columns)
        if missing:
            raise LayercritError(f"proxies file {str(path)!r} lacks columns {', '.join(sorted(missing))}: "
                                 "expected a file written by `layercrit proxies`")
        columns = {"samples": SAMPLE_COLUMNS, "criticality": CRITICALITY_COLUMNS,
                   "criticality_samples": CRIT_SAMPLE_COLUMNS, "pruning": PRUNING_COLUMNS}
        parts = {k: (v if len(v.columns) else _empty(columns[k])) for k, v in parts.items()}
        if "n" not in table.columns:
            table["n"] = 1
        return cls(table, config=config, **parts)


@dataclass
class ProxyComparison:
    """Result of `compare_proxies`.

    Attributes:
        correlations: per (proxy, probe): blocks, Spearman's ρ and Kendall's τ with p-values and
            bootstrap intervals over samples (`spearman_low`/`high`, `kendall_low`/`high`, the number of
            resamples used), and a note where a value is undefined or means little.
        pruning: per (proxy, probe, k): the k least important blocks by the proxy and by the probe's
            criticality, their overlap |A ∩ B| / k, and the criticality (and loss) of the model with
            each set skipped at once, where measured.
        config: the settings.
    """

    correlations: pd.DataFrame
    pruning: pd.DataFrame
    config: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """`.csv` (correlations; pruning as `<stem>.pruning.csv`) or `.json` with both."""
        path = check_output_path(path, (".csv", ".json"))
        if path.suffix.lower() == ".json":
            return save_table(self.correlations, path, self.config, {"pruning": self.pruning})
        save_table(self.pruning, path.with_name(f"{path.stem}.pruning.csv"))
        return save_table(self.correlations, path, self.config)


# --- proxy validation -----------------------------------------------------------------------------


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
    from .compare import _correlate

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
            stats = _correlate(x, y)
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


# --- the pass over the data -----------------------------------------------------------------------


def _stream_in(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The residual stream a block is called with: its first positional tensor, else `hidden_states`
    (or the first tensor) among its keyword arguments."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "x", "input", "hidden_state"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)


def _stream_out(value) -> torch.Tensor | None:
    """The residual stream in a block's output: the tensor itself, or the first element of a tuple."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping) and value:
        return _stream_out(next(iter(value.values())))
    return None


class _Sums:
    """Per-sample values of named quantities, collected batch by batch (concatenated at the end)."""

    def __init__(self) -> None:
        self.parts: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, key: tuple, values: torch.Tensor, weights: torch.Tensor) -> None:
        self.parts.setdefault(key, []).append((values.detach().double().cpu(), weights.detach().double().cpu()))

    def get(self, key: tuple) -> tuple[np.ndarray, np.ndarray] | None:
        if key not in self.parts:
            return None
        v, w = zip(*self.parts[key])
        return torch.cat(v).numpy(), torch.cat(w).numpy()


class _Recorder:
    """Forward (pre-)hooks on the blocks computing the proxies of one unmodified batch as it runs.

    Only the inputs of the last `max_n` blocks are held at once (for the angular distance over n
    blocks); every handle is removed on exit, also after an error.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], max_n: int, sums: _Sums) -> None:
        self.model, self.names, self.max_n, self.sums = model, list(names), max_n, sums
        self.notes: dict[tuple, str] = {}
        self.shapes: dict[str, tuple[tuple, tuple]] = {}
        self.active = False
        self.mask: torch.Tensor | None = None
        self._inputs: dict[int, torch.Tensor] = {}  # float64 (B, T, D) streams entering the blocks
        self._shapes_in: dict[int, tuple] = {}  # their shapes as the blocks got them
        self._calls: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> _Recorder:
        try:
            for i, name in enumerate(self.names):
                block = self.model.get_submodule(name)
                self._handles.append(block.register_forward_pre_hook(self._pre(i), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._post(i)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._inputs.clear()

    def start(self, mask: torch.Tensor | None) -> None:
        self.active, self.mask = True, mask
        self._inputs.clear()
        self._calls.clear()

    def stop(self) -> None:
        self.active = False
        self._inputs.clear()
        missing = [self.names[i] for i in range(len(self.names)) if i not in self._calls]
        if missing:
            raise LayercritError(f"block {missing[0]} did not run in the model's forward; proxies need every block of the stack")

    def _pre(self, i: int):
        def hook(module, args, kwargs):
            if not self.active:
                return None
            self._calls[i] = self._calls.get(i, 0) + 1
            if self._calls[i] > 1:
                raise LayercritError(f"block {self.names[i]} runs more than once per forward (shared weights?); "
                                     "proxies need a chain of blocks that each run once")
            x = _stream_in(args, kwargs)
            if x is None:
                raise LayercritError(f"block {self.names[i]} was called without a tensor input")
            # A float64 copy: a block may change its input in place (ReLU(inplace=True), +=) and
            # the input of block i is needed until block i + max_n − 1 has run.
            self._inputs[i] = _tokens(x).clone() if x.dtype == torch.float64 else _tokens(x)
            self._shapes_in[i] = tuple(x.shape)
            return None

        return hook

    def _post(self, i: int):
        def hook(module, args, output):
            if not self.active:
                return None
            out = _stream_out(output)
            if out is None:
                raise LayercritError(f"block {self.names[i]} returned {type(output).__name__}; expected a tensor "
                                     "or a tuple starting with one")
            self._measure(i, out.detach())
            for j in [j for j in self._inputs if j <= i - self.max_n + 1]:
                del self._inputs[j]  # no longer needed by any span
            if i == len(self.names) - 1:
                self.active = False  # one forward recorded (an executor may run the model again, e.g. to check itself)
            return None

        return hook

    def _mask_for(self, shape: tuple) -> torch.Tensor | None:
        """The attention mask, for (B, T, D) streams whose (B, T) it fits (not for image maps)."""
        m = self.mask
        return m if m is not None and len(shape) == 3 and tuple(shape[:2]) == tuple(m.shape) else None

    def _measure(self, i: int, out: torch.Tensor) -> None:
        """The proxies of block i and of the spans ending at it. Each pair of streams is converted to
        float64 once and its cosine computed once: BI, both angular distances and the relative L2
        change share it."""
        name = self.names[i]
        shape_in = self._shapes_in[i]
        self.shapes[name] = (shape_in[1:], tuple(out.shape[1:]))
        b = _tokens(out)
        for n in range(1, self.max_n + 1):
            j = i - n + 1
            if j < 0:
                break
            first, a, shape_a = self.names[j], self._inputs[j], self._shapes_in[j]
            if shape_a != tuple(out.shape):
                note = f"the stream entering {first} {shape_a[1:]} and leaving {name} {tuple(out.shape[1:])} differ in shape"
                self.notes[(first, "angular", n)] = note
                if n == 1:
                    self.notes[(name, "bi", 1)] = self.notes[(name, "relative_l2", 1)] = note
                continue
            valid = _valid(self._mask_for(shape_a), a)
            cos = cosine(a, b)
            if n == 1:
                self.sums.add((name, "bi", 1), *sample_means(_masked(1.0 - cos, valid)))
                rel = (b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(EPS)
                self.sums.add((name, "relative_l2", 1), *sample_means(_masked(rel, valid)))
            angle = torch.arccos(cos) / math.pi
            self.sums.add((first, "angular_all", n), *sample_means(_masked(angle, valid)))
            last = angle[torch.arange(len(angle), device=angle.device), last_positions(valid)]
            self.sums.add((first, "angular_last", n), last, torch.ones_like(last))


class _ValuesCache:
    """A probe's values of each (block, trial), drawn once and reused by every batch while they fit."""

    BUDGET = 512 << 20  # bytes

    def __init__(self) -> None:
        self.values: dict[tuple, Mapping[str, torch.Tensor]] = {}
        self.bytes = 0

    def get(self, probe, model: nn.Module, unit, seed: int) -> Mapping[str, torch.Tensor]:
        key = (id(probe), unit.name, seed)
        if key in self.values:
            return self.values[key]
        values = probe.values(model, unit, seed)
        size = sum(v.numel() * v.element_size() for v in values.values())
        if self.bytes + size <= self.BUDGET:
            self.values[key] = values
            self.bytes += size
        return values


def _executor(model: nn.Module, name: str):
    """The executor running the probed forwards: "prefix" re-runs only the blocks from the probed one
    on (from the block outputs kept in the unmodified pass), "full" the whole model."""
    from .engine import FullForward

    if name == "full":
        return FullForward(model)
    if name == "prefix":
        from .prefix import PrefixExecutor

        return PrefixExecutor(model)
    raise LayercritError(f"Expected `executor` to be 'prefix' or 'full', got {name!r}")


def _skip(blocks: Sequence[str]):
    """The structural change that skips `blocks` of the stack (each returns the residual stream it was given)."""
    from .probes import Change

    return Change({}, skip=frozenset(blocks), modes=dict.fromkeys(blocks, "input"))


def _row_samples(rows, n_rows: int, batch: int, device: torch.device) -> torch.Tensor:
    """The sample (row of the batch) each compared output row belongs to."""
    if rows.index is None:
        return torch.arange(n_rows, device=device) * batch // max(n_rows, 1)
    per = max(n_rows // batch, 1)  # a flattened (B·T, V) output: T rows per sample
    return rows.index.to(device) // per


def _sample_mean(values: torch.Tensor, sample_of: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the mean of its finite row values (NaN when none) and how many there were."""
    ok = ~values.isnan()
    sums = torch.zeros(batch, dtype=torch.float64, device=values.device).index_add_(0, sample_of[ok], values[ok])
    counts = torch.bincount(sample_of[ok], minlength=batch).double()
    return torch.where(counts > 0, sums / counts.clamp_min(1), math.nan), counts


def _compare_rows(adapter, rows, p_values: torch.Tensor, q_out, batch: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-sample criticality (and loss, with labels) of a probed output against the unmodified one."""
    q_values = adapter.values(q_out, rows)
    m = sample_measures(p_values, q_values, rows.labels, ("criticality", "loss"), softmax=adapter.softmax, rows=rows.index)
    n_rows = len(rows.index) if rows.index is not None else len(q_values)
    sample_of = _row_samples(rows, len(q_values), batch, q_values.device)
    if rows.index is None:
        sample_of = sample_of[:n_rows]
    out = {"criticality": _sample_mean(m["criticality"], sample_of, batch)}
    if "loss" in m and rows.labels is not None:
        labelled = rows.labels.to(sample_of.device) >= 0
        out["loss"] = _sample_mean(m["loss"], sample_of[labelled], batch)
    return out


@contextlib.contextmanager
def _device_model(model: nn.Module, device) -> Iterator[torch.device]:
    first = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    if first is not None and first.device != dev:
        model.to(dev)  # as the engine does: the model moves to the device it is evaluated on
    yield dev


def proxies(
    model: nn.Module,
    data,
    *,
    max_n: int = 4,
    output: str | None = None,
    skip: bool = True,
    against: Sequence[str] = (),
    factory: Callable[[], nn.Module] | None = None,
    trials: int = 1,
    seed: int = 0,
    prune: bool = True,
    images: int | None = None,
    data_seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    executor: str = "prefix",
    model_name: str = "model",
    progress: bool = False,
) -> ProxyResult:
    """The pruning literature's proxies of every block, from one pass over the data.

    Per block (the stack `blocks.find_block_stack` finds: transformer layers, ResNet residual blocks
    across stages, ViT blocks): `bi_token` and `bi_sequence` (Block Influence 1 − cos(x_in, x_out),
    averaged over all non-padded tokens, or per sequence first), `relative_l2` (‖x_out − x_in‖/‖x_in‖
    per token), `angular_last` and `angular_all` for n = 1 … `max_n` (the angular distance between
    the stream entering block ℓ and the stream leaving block ℓ+n−1, at each sequence's last
    non-padded token, or averaged over all of them; a row per n, named by block ℓ), and the effect
    of skipping the block: `skip_loss`, the change of the loss (data with labels or a language
    model), else `skip_criticality`. Blocks whose input and output differ in shape (a downsampling
    ResNet block) get no similarity proxies (NaN, with a note) and cannot be skipped.

    The same pass measures the real criticality of each block under `skip` and the probes in
    `against` (e.g. "rerandomize"), per sample, and, with `prune`, the model with the k least
    important blocks of every ranking skipped at once, k = 1 … L/2: `compare_proxies(result)` then
    needs nothing else.

    Args:
        model: the model (unchanged afterwards; hooks are removed also after an error).
        data: a `Dataset`, a data spec, a tensor or a dict of tensors (token ids, attention mask).
        max_n: the longest span of the angular distance.
        output: output adapter (`outputs.create_output`); None: chosen from the output.
        skip: run one forward per block with the block skipped (`skip_loss`, the `skip` criticality).
        against: further probes whose criticality to measure (e.g. ["rerandomize"]).
        factory: the untrained constructor, for "rerandomize".
        trials: draws per block of random probes.
        seed: probe seed (trial t uses `derive_seed(seed, t)`).
        prune: measure the pruned models (needs `skip`).
        images: random evaluation subset of this many samples (None: all).
        data_seed: seed of that subset.
        batch_size: samples per forward.
        device: where to compute (default: the model's device).
        executor: how the probed forwards run: "prefix" (default; only the blocks from the probed one
            on, see `prefix.PrefixExecutor`) or "full" (the whole model each time; the same numbers).
        model_name: the `model` column.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    from .blocks import find_block_stack
    from .criticality import _as_dataset, build_probes
    from .engine import eval_mode
    from .inputs import attention_mask, num_samples, take, to_device
    from .layers import select_units
    from .outputs import resolve_output
    from .seeding import derive_seed

    for name, value, low in (("max_n", max_n, 1), ("trials", trials, 1), ("seed", seed, 0), ("batch_size", batch_size, 1),
                             ("data_seed", data_seed, 0)):
        check_int(name, value, low=low)
    against = [against] if isinstance(against, str) else list(against)
    dataset = _as_dataset(data).subset(images, data_seed)
    stack = find_block_stack(model)
    if stack is None or len(stack.names) < 2:
        raise LayercritError(f"{type(model).__name__} has no stack of repeated blocks (transformer layers, residual "
                             "blocks): block proxies need one")
    names = list(stack.names)
    max_n = min(max_n, len(names))
    units = {u.name: u for u in select_units(model, granularity="block")}
    labels = {n: units[n].label if n in units else n for n in names}
    probe_objs = [p for p in build_probes([a for a in against if a != "skip"], factory) if p.name != "skip"]
    for p in probe_objs:
        p.check(model, [units[n] for n in names if n in units])
    proxy_sums, crit_sums = _Sums(), _Sums()
    cache = _ValuesCache()
    n_samples = num_samples(dataset.x)
    adapter = why = None
    trial_ids = {p.name: range(trials) if p.random else [0] for p in probe_objs}
    forwards = 1 + (len(names) if skip else 0) + sum(len(names) * len(t) for t in trial_ids.values())
    ex = _executor(model, executor)
    # What the probed forwards will change, for the executor's plan (it reads the names, not the values:
    # the values are drawn when their block runs).
    ex.prepare(([_skip([n]) for n in names] if skip else [])
               + [dict.fromkeys(units[n].params) for p in probe_objs for n in names if n in units])
    bar = tqdm(total=forwards * -(-n_samples // batch_size), desc=f"{model_name}: proxies", unit="fwd",
               disable=not progress, leave=False)
    try:
        with torch.no_grad(), eval_mode(model), _device_model(model, device) as dev, \
                _Recorder(model, names, max_n, proxy_sums) as rec:
            for start in range(0, n_samples, batch_size):
                idx = slice(start, start + batch_size)
                x = to_device(take(dataset.x, idx), dev)
                y = None if dataset.y is None else dataset.y[idx].to(dev)
                try:
                    rec.start(attention_mask(x))
                    try:
                        p_out = ex.start_batch(x)
                    finally:
                        rec.active = False
                    rec.stop()
                    batch = num_samples(x)
                    if adapter is None:
                        adapter, why = resolve_output(output, model, p_out)
                        adapter.check(x, dataset.y, p_out)
                    rows = adapter.rows(x, y, p_out)
                    p_values = adapter.values(p_out, rows)
                    base = _compare_rows(adapter, rows, p_values, p_out, batch)
                    bar.update(1)
                    for name in names if skip else []:
                        shape_in, shape_out = rec.shapes[name]
                        if shape_in == shape_out:  # a block that changes the shape has no identity to skip
                            q = _compare_rows(adapter, rows, p_values, ex.run(_skip([name])), batch)
                            _add_probe(crit_sums, proxy_sums, name, "skip", 0, q, base)
                        bar.update(1)
                    for probe in probe_objs:
                        for name in names:
                            if name in units:  # the draws of one block together (the executor may batch them)
                                draws = [cache.get(probe, model, units[name], derive_seed(seed, t)) for t in trial_ids[probe.name]]
                                for trial, out in zip(trial_ids[probe.name], ex.run_many(draws)):
                                    q = _compare_rows(adapter, rows, p_values, out, batch)
                                    _add_probe(crit_sums, None, name, probe.name, trial, q, base)
                            bar.update(len(trial_ids[probe.name]))
                finally:
                    ex.end_batch()
    finally:
        bar.close()
    config = {"model": model_name, "data": dataset.spec, "data_identity": dataset.identity, "n": n_samples,
              "max_n": max_n, "output": adapter.name, "output_reason": why, "skip": skip, "against": against,
              "trials": trials, "seed": seed, "images": images, "data_seed": data_seed, "batch_size": batch_size,
              "blocks": names, "stack": stack.path, "executor": ex.name}
    result = _tables(model_name, names, labels, max_n, rec, proxy_sums, crit_sums, probe_objs, trial_ids, seed,
                     n_samples, has_loss=any(k[3] == "loss" for k in crit_sums.parts), skip=skip, config=config)
    if prune and skip:
        result.pruning = _prune(model, dataset, names, rec.shapes, result, adapter, batch_size, device, executor)
    return result


def _add_probe(crit_sums: _Sums, proxy_sums: _Sums | None, name: str, probe: str, trial: int,
               q: dict[str, tuple[torch.Tensor, torch.Tensor]], base: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Record one probed forward: its criticality (and loss) per sample, and for `skip` the proxy."""
    for measure, (values, counts) in q.items():
        crit_sums.add((name, probe, trial, measure), values, counts)
    if proxy_sums is None:
        return
    if "loss" in q:
        (lq, cq), (lp, _) = q["loss"], base["loss"]
        proxy_sums.add((name, "skip_loss", 1), lq - lp, cq)
    else:
        proxy_sums.add((name, "skip_criticality", 1), *q["criticality"])


def _weighted(values: np.ndarray, weights: np.ndarray) -> float:
    ok = (weights > 0) & np.isfinite(values)
    return float((weights[ok] * values[ok]).sum() / weights[ok].sum()) if ok.any() else math.nan


def _tables(model_name: str, names: list[str], labels: dict[str, str], max_n: int, rec: _Recorder, proxy_sums: _Sums,
            crit_sums: _Sums, probe_objs: list, trial_ids: dict, seed: int, n_samples: int, *, has_loss: bool,
            skip: bool, config: dict) -> ProxyResult:
    from .seeding import derive_seed

    sample_ids = np.arange(n_samples)
    # (proxy name, key in the sums, token-weighted)
    specs = [("bi_token", "bi", True), ("bi_sequence", "bi", False), ("relative_l2", "relative_l2", True)]
    rows, sample_parts = [], []
    for i, name in enumerate(names):
        wanted = [(p, key, 1, tok) for p, key, tok in specs]
        for n in range(1, min(max_n, len(names) - i) + 1):
            wanted += [("angular_last", "angular_last", n, False), ("angular_all", "angular_all", n, True)]
        if skip:
            wanted.append(("skip_loss" if has_loss else "skip_criticality",) * 2 + (1, True))
        for proxy, key, n, tokens in wanted:
            got = proxy_sums.get((name, key, n))
            note_key = (name, "angular" if key.startswith("angular") else key, n)
            if got is None:
                note = rec.notes.get(note_key, "input and output differ in shape: the block cannot be skipped"
                                     if key.startswith("skip") else "not measured")
                rows.append({"model": model_name, "layer": name, "label": labels[name], "proxy": proxy, "n": n,
                             "value": math.nan, "samples": 0, "tokens": 0, "note": note})
                continue
            values, counts = got
            weights = counts if tokens else (counts > 0).astype(float)
            rows.append({"model": model_name, "layer": name, "label": labels[name], "proxy": proxy, "n": n,
                         "value": _weighted(values, weights), "samples": int((counts > 0).sum()),
                         "tokens": int(counts.sum()), "note": ""})
            sample_parts.append(pd.DataFrame({"sample": sample_ids, "layer": name, "proxy": proxy, "n": n,
                                              "value": values, "weight": weights}))
    table = pd.DataFrame(rows, columns=PROXY_COLUMNS)
    samples = pd.concat(sample_parts, ignore_index=True) if sample_parts else _empty(SAMPLE_COLUMNS)
    crit_rows, crit_parts = [], []
    probes = ([("skip", False, [0])] if skip else []) + [(p.name, p.random, list(trial_ids[p.name])) for p in probe_objs]
    for probe, random, trials in probes:
        for name in names:
            for trial in trials:
                got = crit_sums.get((name, probe, trial, "criticality"))
                if got is None:
                    continue
                values, counts = got
                loss = crit_sums.get((name, probe, trial, "loss"))
                crit_rows.append({"model": model_name, "layer": name, "label": labels[name], "probe": probe, "trial": trial,
                                  "seed": derive_seed(seed, trial) if random else None, "n": n_samples,
                                  "criticality": _weighted(values, counts),
                                  "loss": math.nan if loss is None else _weighted(*loss)})
                crit_parts.append(pd.DataFrame({
                    "sample": sample_ids, "layer": name, "probe": probe, "trial": trial, "criticality": values,
                    "loss": math.nan if loss is None else loss[0], "weight": counts,
                    "loss_weight": 0.0 if loss is None else loss[1]}))
    criticality = pd.DataFrame(crit_rows, columns=CRITICALITY_COLUMNS)
    criticality["seed"] = criticality["seed"].astype("Int64")
    crit_samples = pd.concat(crit_parts, ignore_index=True) if crit_parts else _empty(CRIT_SAMPLE_COLUMNS)
    return ProxyResult(table, samples, criticality, crit_samples, config=config)


def _prune(model: nn.Module, dataset, names: list[str], shapes: dict, result: ProxyResult, adapter, batch_size: int,
           device, executor: str) -> pd.DataFrame:
    """Criticality (and loss) of the model with every set of k least important blocks skipped at once."""
    from .engine import eval_mode
    from .inputs import num_samples, take, to_device

    if result.criticality.empty:
        return _empty(PRUNING_COLUMNS)
    plan = compare_proxies(result, bootstrap=0).pruning
    order = {n: i for i, n in enumerate(names)}
    skippable = {n for n, (a, b) in shapes.items() if a == b}
    sets: dict[frozenset, int] = {}
    for column in ("blocks_by_proxy", "blocks_by_probe"):
        for blocks, k in zip(plan[column], plan["k"]):
            chosen = frozenset(blocks.split(";"))
            if chosen <= skippable:
                sets.setdefault(chosen, int(k))
    if not sets:
        return _empty(PRUNING_COLUMNS)
    keyed = [sorted(s, key=order.__getitem__) for s in sets]
    sums = _Sums()
    n_samples = num_samples(dataset.x)
    ex = _executor(model, executor)
    ex.prepare([_skip(blocks) for blocks in keyed])
    with torch.no_grad(), eval_mode(model), _device_model(model, device) as dev:
        for start in range(0, n_samples, batch_size):
            idx = slice(start, start + batch_size)
            x = to_device(take(dataset.x, idx), dev)
            y = None if dataset.y is None else dataset.y[idx].to(dev)
            try:
                p_out = ex.start_batch(x)
                rows = adapter.rows(x, y, p_out)
                p_values = adapter.values(p_out, rows)
                batch = num_samples(x)
                for blocks in keyed:
                    q = _compare_rows(adapter, rows, p_values, ex.run(_skip(blocks)), batch)
                    for measure, (values, counts) in q.items():
                        sums.add((";".join(blocks), measure), values, counts)
            finally:
                ex.end_batch()
    out = []
    for blocks in keyed:
        key = ";".join(blocks)
        loss = sums.get((key, "loss"))
        out.append({"blocks": key, "k": len(blocks), "criticality": _weighted(*sums.get((key, "criticality"))),
                    "loss": math.nan if loss is None else _weighted(*loss)})
    return pd.DataFrame(out, columns=PRUNING_COLUMNS).sort_values(["k", "blocks"], ignore_index=True)


# --- text output ----------------------------------------------------------------------------------


def _num(v, digits: int = 4) -> str:
    from .results import format_number

    return format_number(v, digits)


def format_proxies(result: ProxyResult) -> str:
    """The per-block table printed by `layercrit proxies`: single-block proxies, angular distances over
    longer spans, and the criticality measured in the same pass."""
    t = result.table
    lines = [f"{result.config.get('model', 'model')}: {len(result.config.get('blocks', []))} blocks of "
             f"{result.config.get('stack', '?')}, n={result.config.get('n')} samples, output {result.config.get('output')}"]
    one = t[t["n"] == 1]
    grid = one.pivot_table(index="label", columns="proxy", values="value", sort=False, dropna=False)
    labels = list(dict.fromkeys(one["label"]))
    if not result.criticality.empty:
        crit = result.criticality.groupby(["label", "probe"], sort=False)["criticality"].mean().unstack("probe")
        grid = grid.join(crit.rename(columns=lambda c: f"{c} crit."), how="left")
    lines.append(grid.reindex(labels).to_string(float_format=lambda v: _num(v)))
    longer = t[t["n"] > 1]
    if not longer.empty:
        span = longer.pivot_table(index="label", columns=["proxy", "n"], values="value", sort=False, dropna=False)
        lines += ["", "angular distance over n blocks (row: the first block of the span)",
                  span.reindex([la for la in labels if la in span.index]).to_string(float_format=lambda v: _num(v))]
    notes = t[t["note"].fillna("").astype(str) != ""]
    for (label, note), _ in notes.groupby(["label", "note"], sort=False):
        lines.append(f"note: {label}: {note}")
    return "\n".join(lines)


def format_proxy_comparison(c: ProxyComparison) -> str:
    """The tables printed by `layercrit compare-proxies`: rank correlations with intervals, and the
    overlap of the blocks each ranking would prune first."""
    from .results import format_number, format_p

    def signed(v) -> str:
        return format_number(v, 2, sign=True)

    lines = [f"rank correlation over blocks of each proxy with the real criticality "
             f"(bootstrap {int(100 * c.config.get('level', 0.95))} % intervals over samples)"]
    for _, r in c.correlations.iterrows():
        interval = lambda lo, hi: "" if pd.isna(lo) else f" [{signed(lo)}, {signed(hi)}]"  # noqa: E731
        lines.append(f"  {r['proxy']:<17} vs {r['probe']:<12} blocks={int(r['blocks']):<3} "
                     f"ρ={signed(r['spearman_r'])}{interval(r['spearman_low'], r['spearman_high'])} (p={format_p(r['spearman_p'])})  "
                     f"τ={signed(r['kendall_tau'])}{interval(r['kendall_low'], r['kendall_high'])} (p={format_p(r['kendall_p'])})"
                     + (f"  note: {r['note']}" if isinstance(r["note"], str) and r["note"] else ""))
    if not c.pruning.empty:
        lines += ["", "prune the k least important blocks: overlap of the proxy's choice with the real one, and the "
                  "criticality (loss) of the model with each set skipped"]
        for _, r in c.pruning.iterrows():
            effect = "".join(
                f"  {side}: crit {_num(r[f'criticality_{side}'], 3)}" + (
                    f" loss {_num(r[f'loss_{side}'], 3)}" if pd.notna(r[f"loss_{side}"]) else "")
                for side in ("proxy", "probe") if pd.notna(r[f"criticality_{side}"]))
            lines.append(f"  {r['proxy']:<17} vs {r['probe']:<12} k={int(r['k']):<2} overlap {format_number(r['overlap'], 2)}  "
                         f"proxy: {r['pruned_by_proxy']}  real: {r['pruned_by_probe']}{effect}")
    return "\n".join(lines)
