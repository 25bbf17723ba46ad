"""`layercrit distances`: weight distance of each layer to checkpoint 0."""

from __future__ import annotations

from ..._utils.io import check_output_path
from ...results import save_table
from .._args import add_robustness_args


def run(args) -> int:
    from ...analyses.robustness import weight_distances

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    table = weight_distances(args.run, epochs=args.epochs, granularity=args.granularity, layers=args.layers,
                             include_norm=args.include_norm, progress=not args.quiet)
    for value, title in (("l2", "‖θτ − θ⁰‖₂ / √dim"), ("linf", "‖θτ − θ⁰‖∞"), ("spectral", "spectral norm of θτ − θ⁰")):
        grid = table.pivot_table(index="label", columns="epoch", values=value, sort=False)
        print(f"{title}\n{grid.to_string(float_format=lambda v: f'{v:8.4f}')}\n")
    if args.out is not None:
        print(f"wrote {save_table(table, args.out, {'run': str(args.run)})}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("distances", help="weight distance of each layer to checkpoint 0")
    add_robustness_args(p, "distances")
    p.set_defaults(fn=run)
