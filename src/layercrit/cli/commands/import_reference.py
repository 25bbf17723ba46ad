"""`layercrit import-reference`: import results of the Gavrikov et al. reference implementation."""

from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    from ...zoo.reference import import_reference
    from ...zoo.store import Store

    with Store(args.store) as store:
        added = import_reference(args.results, args.metadata, store)
        print(f"imported {added} rows into {args.store} ({store.count()} in all)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("import-reference", help="import results of the Gavrikov et al. reference implementation")
    p.add_argument("results", type=Path, metavar="results.csv", help="results of the reference implementation")
    p.add_argument("--metadata", type=Path, required=True, metavar="models.csv", help="model_id, category, accuracy, …")
    p.add_argument("--store", type=Path, required=True, metavar="FILE", help="SQLite results store to add to (created if missing)")
    p.set_defaults(fn=run)
