"""`layercrit robustness`: re-initialization robustness table of a training run."""

from __future__ import annotations

from ..._utils.io import check_output_path
from ...analyses.robustness import format_robustness
from .._args import (
    _engine_settings,
    add_robustness_args,
)


def run(args) -> int:
    from ...analyses.robustness import CHECKPOINT, robustness

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    result = robustness(
        args.run, args.data, epochs=args.epochs, groups=args.group, images=args.images, data_seed=args.data_seed,
        strict_images=args.strict_images,
        progress=not args.quiet, trials=args.trials, seed=args.seed, granularity=args.granularity,
        layers=args.layers, include_norm=args.include_norm, **_engine_settings(args),
    )
    t = result.table
    layer_rows = t[(t["probe"] != "none")]
    final = t[t["probe"] == "none"].iloc[0]
    print(f"test error (%) after resetting each row's layer to each column's values; n={int(final['n'])}, "
          f"final model: {100 * final['error']:.2f}%")
    print(format_robustness(layer_rows.assign(label=layer_rows["label"].where(layer_rows["layer"] != CHECKPOINT, "(whole model)")), "error"))
    print("\ncriticality (%)")
    print(format_robustness(layer_rows[layer_rows["layer"] != CHECKPOINT], "criticality"))
    if args.out is not None:
        print(f"wrote {result.save(args.out)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("robustness", help="re-initialization robustness table of a training run")
    add_robustness_args(p, "robustness")
    p.set_defaults(fn=run)
