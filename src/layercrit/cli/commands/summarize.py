"""`layercrit summarize`: cross-model analysis of a results store."""

from __future__ import annotations

import json
from pathlib import Path

from ...results import CriticalityResult


def run(args) -> int:
    from ..._utils.io import json_records
    from ...zoo.compare import format_comparison, summarize
    from ...zoo.store import Store

    if args.results is not None:  # a `measure --shift` file: clean vs shifted layer profiles per model
        from ...analyses.shifts import format_shift_correlations, shift_correlations

        corr = shift_correlations(CriticalityResult.load(args.results).table, probe=args.probe, target=args.target)
        print(json.dumps({"shift_correlations": json_records(corr)}, indent=2, allow_nan=False)
              if args.format == "json" else format_shift_correlations(corr))
        return 0
    with Store(args.store, create=False) as store:
        c = summarize(store, probe=args.probe, target=args.target, by=args.by, exclude_categories=args.exclude_category,
                      baseline=args.baseline)
    print(json.dumps(c.to_json(), indent=2, allow_nan=False) if args.format == "json" else format_comparison(c))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("summarize", help="cross-model analysis of a results store")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="FILE", help="SQLite results store")
    src.add_argument("--results", type=Path, metavar="FILE",
                     help="results file of `measure --shift`: per model and shift, the correlation of the clean and "
                          "shifted layer profiles")
    p.add_argument("--by", nargs="+", default=["accuracy"], metavar="COLUMN",
                   help="metadata columns to correlate with average criticality (default accuracy; base_accuracy = measured)")
    p.add_argument("--exclude-category", nargs="+", default=[], metavar="NAME", help="also correlate without these categories")
    p.add_argument("--baseline", metavar="MODEL", help="difference of every model's criticality to this model's")
    p.add_argument("--probe", default="rerandomize", help="the probe analysed (default rerandomize)")
    p.add_argument("--target", help="the probe's target when it has several (e.g. E0)")
    p.add_argument("--format", default="table", choices=["table", "json"], help="table (default) or json")
    p.set_defaults(fn=run)
