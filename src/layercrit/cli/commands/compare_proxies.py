"""`layercrit compare-proxies`: rank correlation and pruning overlap of block proxies with real criticality."""

from __future__ import annotations

from pathlib import Path

from ..._utils.io import check_output_path
from ...results import CriticalityResult
from .._args import _out_path


def run(args) -> int:
    from ...analyses.proxies.compare import compare_proxies
    from ...analyses.proxies.result import ProxyResult, format_proxy_comparison

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    result = ProxyResult.load(args.proxies)
    criticality = CriticalityResult.load(args.criticality) if args.criticality else None
    c = compare_proxies(result, criticality, probes=args.probe, bootstrap=args.bootstrap, seed=args.seed)
    print(format_proxy_comparison(c))
    if args.out is not None:
        print(f"wrote {c.save(args.out)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("compare-proxies", help="rank correlation and pruning overlap of block proxies with real criticality")
    p.add_argument("--proxies", type=Path, required=True, metavar="FILE", help="a file written by `layercrit proxies --out`")
    p.add_argument("--criticality", type=Path, metavar="FILE",
                   help="results of `layercrit measure --granularity block` (default: the criticality the proxies file holds)")
    p.add_argument("--probe", action="append", metavar="PROBE", help="compare with this probe only (repeatable)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over samples (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json", help="correlations (and FILE.pruning.csv)")
    p.set_defaults(fn=run)
