"""`layercrit rank`: complexity measures of several runs ranked against their generalization error."""

from __future__ import annotations

from ..._utils.io import check_output_path
from ...analyses.generalization import format_ranking
from ...results import save_table
from .._args import (
    _modcrit_settings,
    add_modcrit_args,
)


def run(args) -> int:
    from ...analyses.generalization import rank_runs

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    settings = _modcrit_settings(args)
    models, ranking = rank_runs(args.runs, args.epsilon, progress=not args.quiet, **settings)
    print(format_ranking(models, ranking))
    if args.out is not None:
        config = {"runs": [str(r) for r in args.runs], "epsilon": args.epsilon,
                  "search": {k: v for k, v in settings.items() if k in ("alphas", "noise_draws", "train_subset",
                                                                        "data_seed", "seed", "loss", "relative")}}
        path = save_table(models, args.out, config)
        rpath = save_table(ranking, path.with_name(path.stem + ".ranking" + path.suffix))
        print(f"wrote {path} and {rpath}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("rank", help="complexity measures of several runs ranked against their generalization error")
    add_modcrit_args(p, "rank")
    p.set_defaults(fn=run)
