"""`layercrit plot`: draw one of the papers' figures."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..._utils.io import check_output_path
from ...errors import LayercritError
from .._help import _first_sentence, _listing

# Plot kinds that read a companion table of a results file: (its key, a column only it has, the command
# writing it). `modcrit --out m.csv` writes m.curve.csv and m.network.csv beside m.csv (a JSON holds all);
# `rank --out r.csv` writes r.ranking.csv.
_PLOT_SIBLING = {"modcrit-curves": ("curve", "loss_no_noise", "modcrit"),
                 "network-vs-epsilon": ("network", "network_criticality", "modcrit"),
                 "ranking": ("ranking", "kendall_tau", "rank")}


_COMPANIONS = ("curve", "network", "ranking", "config")


def _companion(path: Path, key: str) -> Path:
    """`m.csv` (or `m.network.csv`) → `m.<key>.csv`."""
    stem = path.stem
    for k in _COMPANIONS:
        if stem.endswith(f".{k}"):
            stem = stem[: -len(k) - 1]
    return path.with_name(f"{stem}.{key}{path.suffix}")


def _sibling_table(kind: str, path: Path, table: pd.DataFrame, doc: dict) -> pd.DataFrame:
    """The table plot `kind` needs: `table` itself, the part of a JSON document, or the companion file."""
    key, column, command = _PLOT_SIBLING[kind]
    if column in table.columns:
        return table
    if key in doc:
        return pd.DataFrame(doc[key])
    sibling = _companion(path, key)
    if not sibling.is_file():
        raise LayercritError(
            f"plot {kind} reads the {key} table that `layercrit {command} --out FILE{path.suffix}` writes beside "
            f"its results as FILE.{key}{path.suffix}; {str(sibling)!r} does not exist "
            f"(give it with --results, or the .json output of {command}, which holds every table)")
    return _read_rows(sibling)[0]


def _metadata_column(kind: str, column: str | None, models: pd.DataFrame, meta: pd.DataFrame) -> str:
    """The x column of vs-metadata: `column`, else ε when the models have it, else an error naming the choices."""
    merged = models.merge(meta[[c for c in meta.columns if c == "model" or c not in models.columns]], on="model", how="left")
    numeric = [c for c in meta.columns if c not in ("model", "n") and pd.to_numeric(meta[c], errors="coerce").notna().any()]
    wanted = column or "epsilon"
    if wanted in merged.columns and pd.to_numeric(merged[wanted], errors="coerce").notna().any():
        return wanted
    what = f"column {wanted!r}" if column else "an 'epsilon' value (the default x axis)"
    raise LayercritError(f"plot {kind}: no model has {what}; choose a numeric column with --column NAME: "
                         f"{', '.join(numeric) or '(none)'}")


_STORE_KINDS = {"heatmap", "difference", "spread", "vs-metadata", "vs-accuracy"}


def _read_rows(path: Path) -> tuple[pd.DataFrame, dict]:
    if not path.is_file():
        raise LayercritError(f"results file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(path.read_text())
            return pd.DataFrame(doc["rows"] if "rows" in doc else doc.get("modules", [])), doc
        return pd.read_csv(path), {}
    except (ValueError, KeyError, OSError) as e:
        raise LayercritError(f"cannot read results file {str(path)!r}: {e}") from None


def run(args) -> int:
    from ...viz import PLOTS
    from ...viz._style import save_figure

    out = check_output_path(args.out, (".png", ".svg", ".pdf"))
    fn = PLOTS[args.kind]
    if args.column is not None and args.kind not in ("vs-metadata", "vs-accuracy"):
        raise LayercritError(f"--column chooses the x axis of vs-metadata and vs-accuracy, not of {args.kind}")
    if args.store is not None:
        if args.kind not in _STORE_KINDS:
            raise LayercritError(f"plot {args.kind!r} reads a results file (--results), not a store; "
                                 f"store plots: {', '.join(sorted(_STORE_KINDS))}")
        from ...zoo.compare import summarize
        from ...zoo.store import Store

        with Store(args.store, create=False) as store:
            meta = store.models()
            by = [c for c in ("accuracy",) if c in meta.columns and meta[c].notna().sum() >= 3]
            c = summarize(store, probe=args.probe, by=by, baseline=args.baseline)
        if args.kind == "vs-metadata":
            fig, _ = fn(c.models, x=_metadata_column(args.kind, args.column, c.models, meta), metadata=meta)
        elif args.kind == "vs-accuracy":
            fig, _ = fn(c.models, metadata=meta, **({"x": args.column} if args.column else {}))
        elif args.kind == "difference":
            fig, _ = fn(c, args.baseline)
        else:
            fig, _ = fn(c, baseline=args.baseline) if args.kind != "heatmap" or args.baseline else fn(c)
    elif args.kind in ("proxy-scatter", "proxy-bump"):  # a `layercrit proxies` file and the tables beside it
        from ...analyses.proxies.result import ProxyResult

        fig, _ = fn(ProxyResult.load(args.results))
    else:
        table, doc = _read_rows(args.results)
        if args.kind in _PLOT_SIBLING:
            table = _sibling_table(args.kind, args.results, table, doc)
        fig, _ = fn(table, args.baseline) if args.kind == "difference" else fn(table)
    print(f"wrote {save_figure(fig, out)}")
    return 0


def add_parser(sub) -> None:
    from ...viz import PLOTS

    p = sub.add_parser("plot", help="draw one of the papers' figures",
                       description="Draw one of the papers' figures from a results store or a results file.",
                       epilog=_listing("kinds", {k: _first_sentence(f.__doc__) for k, f in PLOTS.items()}))
    p.add_argument("kind", choices=list(PLOTS), metavar="KIND", help="the figure: one of the kinds below")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="FILE", help="results store (cross-model plots)")
    src.add_argument("--results", type=Path, metavar="FILE",
                     help="a results file of measure, robustness, distances, modcrit or rank")
    p.add_argument("--out", type=Path, default=Path("figure.png"), metavar="FILE.png|.svg|.pdf",
                   help="the figure (default figure.png; folders are created)")
    p.add_argument("--column", metavar="NAME",
                   help="x axis of vs-metadata (default epsilon) or vs-accuracy (default accuracy): a numeric metadata column")
    p.add_argument("--baseline", metavar="MODEL", help="baseline model (heatmap order, difference plot)")
    p.add_argument("--probe", default="rerandomize", help="probe of a store plot")
    p.set_defaults(fn=run)
