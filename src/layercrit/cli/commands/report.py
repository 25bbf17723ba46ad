"""`layercrit report`: a self-contained HTML report of results, a store or a training run."""

from __future__ import annotations

from pathlib import Path

from ..._utils.io import check_output_dir


def run(args) -> int:
    from ...viz.report import build_report

    check_output_dir(args.out)
    path = build_report(args.out, store=args.store, results=args.results, checkpoints=args.checkpoints,
                        proxies=args.proxies, baseline=args.baseline, title=args.title, auxiliary=args.auxiliary, critical=args.critical,
                        progress=not args.quiet)
    print(f"report: {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="a self-contained HTML report of results, a store or a training run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="FILE", help="results store (cross-model report)")
    src.add_argument("--results", type=Path, metavar="FILE", help="results file of `layercrit measure`")
    src.add_argument("--checkpoints", type=Path, metavar="DIR", help="training run (robustness, distances, module criticality)")
    src.add_argument("--proxies", type=Path, metavar="FILE", help="file of `layercrit proxies --out` (proxies vs criticality)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for index.html (created with its parents)")
    p.add_argument("--baseline", metavar="MODEL", help="baseline model of a store report")
    p.add_argument("--title", help="the report's title (default: layercrit report)")
    p.add_argument("--auxiliary", type=float, default=10.0, help="%% below which a layer is called auxiliary (default 10)")
    p.add_argument("--critical", type=float, default=50.0, help="%% from which a layer is called critical (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run)
