"""`layercrit modcrit`: module criticality (Chatterji et al.) of a training run."""

from __future__ import annotations

from ..._utils.io import check_output_path
from ...analyses.modcrit import format_modcrit
from .._args import (
    _modcrit_settings,
    add_modcrit_args,
)


def run(args) -> int:
    from ...analyses.modcrit import run_module_criticality

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    result = run_module_criticality(args.run, args.data, progress=not args.quiet, epsilon=args.epsilon,
                                    **_modcrit_settings(args))
    print(format_modcrit(result))
    if args.out is not None:
        print(f"wrote {', '.join(map(str, result.save(args.out)))}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("modcrit", help="module criticality (Chatterji et al.) of a training run")
    add_modcrit_args(p, "modcrit")
    p.set_defaults(fn=run)
