"""Distribution shift: layer criticality on corrupted inputs, next to the clean inputs.

The corruptions themselves (ImageNet-C / CIFAR-10-C, seeded per image) are `data.corruptions`;
`analyses.criticality.measure_shifted` measures on them. This module summarizes the rows per
corruption and severity (`shift_summary`), correlates the layers' criticality on shifted and clean
data (`shift_correlations`) and formats both as the CLI prints them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..errors import LayercritError
from ..results import CLEAN


def _split_label(label: str) -> tuple[str, float]:
    name, _, rest = str(label).partition(":")
    sev = rest.partition(":")[0]
    return name, (float(sev) if sev.isdigit() else math.nan)


def _profiles(table: pd.DataFrame, probe: str | None, target: str | None) -> pd.DataFrame:
    """Per (model, probe, target, shift, layer): label and mean criticality over trials."""
    from ..results import UNMODIFIED

    if "shift" not in table.columns:
        raise LayercritError("results table has no `shift` column; measure with shifts (--shift NAME:SEVERITY) first")
    rows = table[table["layer"] != UNMODIFIED].copy()
    if probe is not None:
        rows = rows[rows["probe"] == probe]
        if rows.empty:
            raise LayercritError(f"no results for probe {probe!r}; probes present: "
                                 f"{', '.join(sorted(set(table['probe']) - {'none'}))}")
    if target is not None and "target" in rows.columns:
        rows = rows[rows["target"].fillna("") == target]
    rows["target"] = rows["target"].fillna("") if "target" in rows.columns else ""
    rows["label"] = rows["label"].fillna(rows["layer"]) if "label" in rows.columns else rows["layer"]
    keys = ["model", "probe", "target", "shift", "layer"]
    return rows.groupby(keys, sort=False, dropna=False).agg(label=("label", "first"),
                                                            criticality=("criticality", "mean")).reset_index()


def shift_summary(table, probe: str | None = None, target: str | None = None) -> pd.DataFrame:
    """Per (model, probe, target, shift, layer): criticality on clean and on shifted data and the
    difference (fractions, means over trials).

    Columns: model, probe, target, shift, corruption, severity, layer, label, clean, shifted, diff.
    """
    table = getattr(table, "table", table)
    prof = _profiles(table, probe, target)
    clean = prof[prof["shift"] == CLEAN].rename(columns={"criticality": "clean"})
    if clean.empty:
        raise LayercritError("results table has no clean rows (shift 'none') to compare the shifts with")
    shifted = prof[prof["shift"] != CLEAN].rename(columns={"criticality": "shifted"})
    out = shifted.merge(clean[["model", "probe", "target", "layer", "clean"]], on=["model", "probe", "target", "layer"],
                        how="left")
    out["diff"] = out["shifted"] - out["clean"]
    parts = [_split_label(s) for s in out["shift"]]
    out.insert(4, "corruption", [p[0] for p in parts])
    out.insert(5, "severity", pd.array([p[1] for p in parts], dtype="Float64").astype("Int64"))
    return out[["model", "probe", "target", "shift", "corruption", "severity", "layer", "label", "clean", "shifted",
                "diff"]].reset_index(drop=True)


def shift_correlations(table, probe: str | None = None, target: str | None = None) -> pd.DataFrame:
    """Per (model, probe, target, shift): how the layer profile under shift relates to the clean one.

    Columns: model, probe, target, shift, corruption, severity, n_layers, pearson_r, spearman_r,
    kendall_tau (between the clean and shifted per-layer mean criticality), mean_diff and
    max_abs_diff (shifted − clean, fractions), max_layer (the label of the largest change), and
    clean_accuracy, shifted_accuracy of the unmodified model.
    """
    from .._utils.stats import rank_correlation
    from ..results import UNMODIFIED

    table = getattr(table, "table", table)
    s = shift_summary(table, probe, target)
    base = table[table["layer"] == UNMODIFIED]
    acc = base.groupby(["model", "shift"])["accuracy"].mean() if "accuracy" in base.columns else pd.Series(dtype=float)
    rows = []
    for (model, pr, tg, shift), g in s.groupby(["model", "probe", "target", "shift"], sort=False):
        g = g.dropna(subset=["clean", "shifted"])
        x, y = g["clean"].to_numpy(float), g["shifted"].to_numpy(float)
        ranks = rank_correlation(x, y)
        pearson = float(np.corrcoef(x, y)[0, 1]) if len(x) >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0 else math.nan
        d = y - x
        k = int(np.argmax(np.abs(d))) if len(d) else None
        rows.append({
            "model": model, "probe": pr, "target": tg, "shift": shift, "corruption": g["corruption"].iloc[0],
            "severity": g["severity"].iloc[0], "n_layers": len(g), "pearson_r": pearson,
            "spearman_r": ranks["spearman_r"], "kendall_tau": ranks["kendall_tau"],
            "mean_diff": float(d.mean()) if len(d) else math.nan,
            "max_abs_diff": float(abs(d[k])) if k is not None else math.nan,
            "max_layer": g["label"].iloc[k] if k is not None else None,
            "clean_accuracy": float(acc.get((model, CLEAN), math.nan)),
            "shifted_accuracy": float(acc.get((model, shift), math.nan)),
        })
    return pd.DataFrame(rows)


def format_shift_table(result, probe: str | None = None) -> str:
    """Per layer: criticality % on clean data and per shift with the difference (Δ), the unmodified
    model's accuracy and the clean-vs-shifted profile correlation (Pearson r); one block per probe."""
    from .._utils.display import format_number, format_percent

    table = getattr(result, "table", result)
    s = shift_summary(table, probe)
    corr = shift_correlations(table, probe)
    blocks = []
    for (model, pr, tg), g in s.groupby(["model", "probe", "target"], sort=False):
        shifts = list(dict.fromkeys(g["shift"]))
        labels = list(dict.fromkeys(g["label"]))
        clean = g.drop_duplicates("label").set_index("label")["clean"]
        width = max(len("layer"), len("unmodified accuracy"), *(len(str(la)) for la in labels))
        cols = [max(8, len(sh)) for sh in shifts]
        head = f"{'layer'.ljust(width)}  {'clean':>7}" + "".join(f"  {sh:>{w}} {'Δ':>6}" for sh, w in zip(shifts, cols))
        probe_name = pr + (f":{tg}" if tg and tg != pr else "")
        lines = [f"{model}, probe {probe_name}: criticality % (mean over trials), clean and shifted, Δ = shifted − clean",
                 head]
        for la in labels:
            cells = "".join(
                f"  {format_percent(v, 1):>{w}} {format_number(dv, 1, scale=100, sign=True):>6}"
                for sh, w in zip(shifts, cols)
                for v, dv in [tuple(g[(g["shift"] == sh) & (g["label"] == la)][["shifted", "diff"]].iloc[0])
                              if ((g["shift"] == sh) & (g["label"] == la)).any() else (math.nan, math.nan)]
            )
            lines.append(f"{str(la).ljust(width)}  {format_percent(clean.get(la, math.nan), 1):>7}{cells}")
        c = corr[(corr["model"] == model) & (corr["probe"] == pr) & (corr["target"] == tg)].set_index("shift")
        acc_clean = c["clean_accuracy"].iloc[0] if len(c) else math.nan
        lines.append(f"{'unmodified accuracy'.ljust(width)}  {format_percent(acc_clean, 1):>7}"
                     + "".join(f"  {format_percent(c['shifted_accuracy'].get(sh), 1):>{w}} {'':>6}"
                               for sh, w in zip(shifts, cols)))
        lines.append(f"{'profile r (Pearson)'.ljust(width)}  {'':>7}"
                     + "".join(f"  {format_number(c['pearson_r'].get(sh), 3):>{w}} {'':>6}" for sh, w in zip(shifts, cols)))
        blocks.append("\n".join(line.rstrip() for line in lines))
    return "\n\n".join(blocks)


def format_shift_correlations(corr: pd.DataFrame) -> str:
    """The table of `shift_correlations` as text (criticality and accuracy in %)."""
    from .._utils.display import format_number, format_percent

    if corr.empty:
        return "no shifted results"
    lines = ["Clean vs shifted layer profiles (per model; Δ = shifted − clean, %)",
             f"{'model':<16} {'probe':<12} {'shift':<22} {'layers':>6} {'r':>6} {'ρ':>6} {'τ':>6} "
             f"{'mean Δ':>7} {'max |Δ|':>8}  {'acc clean→shifted %':<20} layer of max |Δ|"]
    for _, r in corr.iterrows():
        pr = r["probe"] + (f":{r['target']}" if r["target"] and r["target"] != r["probe"] else "")
        acc = f"{format_percent(r['clean_accuracy'], 1)}→{format_percent(r['shifted_accuracy'], 1)}"
        lines.append(
            f"{str(r['model'])[:16]:<16} {pr[:12]:<12} {r['shift'][:22]:<22} {r['n_layers']:>6} "
            f"{format_number(r['pearson_r'], 2):>6} {format_number(r['spearman_r'], 2):>6} "
            f"{format_number(r['kendall_tau'], 2):>6} {format_number(r['mean_diff'], 1, scale=100, sign=True):>7} "
            f"{format_number(r['max_abs_diff'], 1, scale=100):>8}  {acc:<20} {r['max_layer']}"
        )
    return "\n".join(lines)
