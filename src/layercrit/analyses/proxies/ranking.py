"""Which blocks a ranking would drop first: the k least important blocks by one proxy or probe, read from
a `layercrit proxies` result or a `compare-proxies` output (for `layercrit prune --from`)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ...errors import LayercritError, check_int
from ...results import UNMODIFIED
from .result import ProxyResult

__all__ = ["least_important"]


def _lowest(values: pd.Series, k: int) -> list[str]:
    # the same order as compare_proxies: ascending, ties in block order (a stable sort)
    return list(values.sort_values(kind="stable").index[:k])


def _from_result(result: ProxyResult, name: str, k: int, source: str) -> list[str]:
    table = result.table
    if "n" in table.columns:
        table = table[table["n"].fillna(1) == 1]
    proxies = list(dict.fromkeys(table["proxy"]))
    crit = result.criticality
    probes = list(dict.fromkeys(crit["probe"])) if not crit.empty else []
    if name in proxies:
        values = table[table["proxy"] == name].groupby("layer", sort=False)["value"].mean()
    elif name in probes:
        rows = crit[(crit["probe"] == name) & (crit["layer"] != UNMODIFIED)]
        values = rows.groupby("layer", sort=False)["criticality"].mean()
    else:
        raise LayercritError(f"{source} has no proxy or probe {name!r}; it has {', '.join(proxies + probes) or 'none'}")
    values = values.astype(float).dropna()
    if k > len(values):
        raise LayercritError(f"--k {k} is more than the {len(values)} blocks {name!r} ranks in {source}")
    return _lowest(values, k)


def _from_comparison(pruning: pd.DataFrame, name: str, k: int, source: str) -> list[str]:
    for side in ("proxy", "probe"):
        rows = pruning[pruning[side] == name]
        if rows.empty:
            continue
        hit = rows[rows["k"] == k]
        if hit.empty:
            raise LayercritError(f"{source} ranks {name!r} for k = {int(rows['k'].min())} … {int(rows['k'].max())} only, "
                                 f"not {k} (compare-proxies covers up to half the blocks; use the proxies file)")
        return str(hit[f"blocks_by_{side}"].iloc[0]).split(";")
    names = list(dict.fromkeys([*pruning["proxy"], *pruning["probe"]]))
    raise LayercritError(f"{source} has no proxy or probe {name!r}; it has {', '.join(map(str, names)) or 'none'}")


def least_important(path: str | Path | ProxyResult, name: str, k: int) -> list[str]:
    """Module paths of the `k` blocks that proxy or probe `name` ranks least important (lowest first).

    Args:
        path: a `layercrit proxies` result (.csv or .json, or the `ProxyResult`), or a `compare-proxies`
            output (its .json, its .csv with the `.pruning.csv` beside it, or that `.pruning.csv`).
        name: a proxy (`bi_token`, `angular_last`, …; span n = 1) or a probe whose criticality the file
            holds (`skip`, `rerandomize`; the mean over trials).
        k: how many blocks.
    """
    check_int("k", k)
    if isinstance(path, ProxyResult):
        return _from_result(path, name, k, "the proxies result")
    path = Path(path)
    source = repr(str(path))
    if not path.is_file():
        raise LayercritError(f"ranking file {source} does not exist")
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(path.read_text())
            rows = pd.DataFrame(doc.get("rows", []))
            pruning = pd.DataFrame(doc.get("pruning", []))
        else:
            rows = pd.read_csv(path)
            sibling = path.with_name(f"{path.stem}.pruning.csv")
            pruning = pd.read_csv(sibling) if "spearman_r" in rows.columns and sibling.is_file() else rows
    except (ValueError, OSError, AttributeError) as e:
        raise LayercritError(f"cannot read ranking file {source}: {e}") from None
    if {"layer", "proxy", "value"} <= set(rows.columns):
        return _from_result(ProxyResult.load(path), name, k, source)
    if {"proxy", "probe", "k", "blocks_by_proxy", "blocks_by_probe"} <= set(pruning.columns):
        return _from_comparison(pruning, name, k, source)
    raise LayercritError(f"{source} is neither a `layercrit proxies` result nor a `compare-proxies` output "
                         f"(columns: {', '.join(map(str, rows.columns[:8]))})")
