"""The proxies' result objects (`ProxyResult`, `ProxyComparison`), their column vocabularies, and the
text tables the CLI prints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..._utils.io import check_output_path
from ...errors import LayercritError
from ...results import save_table

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


def _num(v, digits: int = 4) -> str:
    from ..._utils.display import format_number

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
    from ..._utils.display import format_number, format_p

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
