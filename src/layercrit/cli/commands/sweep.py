"""`layercrit sweep`: measure every model of a zoo file into a results store (resumable)."""

from __future__ import annotations

import sys
from pathlib import Path


def run(args) -> int:
    from ...zoo.sweep import sweep

    report = sweep(args.zoo, args.store, backend=args.backend, address=args.address, workers=args.workers,
                   chunk_layers=args.chunk_layers, progress=not args.quiet)
    rate = report.added / report.elapsed if report.elapsed else 0.0
    print(f"{report.done_before + report.added}/{report.total_units} units in {args.store} "
          f"({report.added} new in {report.items} work items, {report.elapsed:.1f}s, {rate:.2f} units/s; "
          f"store writes {report.store_seconds:.3f}s of {report.compute_seconds:.1f}s compute)")
    for failure in report.failures:
        print(f"layercrit: error: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def add_parser(sub) -> None:
    p = sub.add_parser("sweep", help="measure every model of a zoo file into a results store (resumable)")
    p.add_argument("zoo", type=Path, metavar="ZOO.toml", help="zoo file: the models and their settings (see README)")
    p.add_argument("--store", type=Path, required=True, metavar="FILE", help="SQLite results store (created if missing)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local (default: in this process) or ray (a local Ray instance, or --address)")
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--workers", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--chunk-layers", type=int, metavar="N", help="layers per work item (default: all of a trial)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run)
