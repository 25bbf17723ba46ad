"""`layercrit export`: write a results store as one tidy table."""

from __future__ import annotations

from pathlib import Path


def run(args) -> int:
    from ...zoo.export import export
    from ...zoo.store import Store

    with Store(args.store, create=False) as store:
        print(f"wrote {export(store, args.format, args.out, probe=args.probe)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a results store as one tidy table")
    p.add_argument("--store", type=Path, required=True, metavar="FILE", help="SQLite results store")
    p.add_argument("--format", default="csv", choices=["csv", "parquet"], help="csv (default) or parquet (needs pyarrow)")
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="output file ending in .csv or .parquet")
    p.add_argument("--probe", help="only this probe's rows")
    p.set_defaults(fn=run)
