"""`layercrit pruning-curve`: perplexity and next-token accuracy with the k least important blocks of each ranking skipped."""

from __future__ import annotations

from ..._utils.io import check_output_path
from ...errors import LayercritError
from .._args import (
    _add_model_args,
    _add_text_args,
    _load_data,
    _load_model,
    _out_path,
)


def format_curve(curve) -> str:
    """The table as text: one line per (ranking, k), the blocks by label and 0-based index."""
    t = curve.table.copy()
    t["blocks dropped"] = [", ".join(f"{lab} (#{i})" for lab, i in zip(d.split(";"), x.split(";"))) if d else "(none)"
                           for d, x in zip(t["dropped"], t["dropped_index"])]
    t["perplexity"] = t["perplexity"].map(lambda v: f"{v:.2f}")
    t["accuracy"] = t["accuracy"].map(lambda v: f"{100 * v:.1f} %")
    return t[["ranking", "k", "blocks dropped", "perplexity", "accuracy", "n_tokens"]].to_string(index=False)


def run(args) -> int:
    from ...analyses.proxies.result import ProxyResult
    from ...analyses.pruning import greedy_cost, pruning_curve, rankings_from_proxies

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    if args.figure is not None:
        check_output_path(args.figure, (".png", ".svg", ".pdf"))
    if args.greedy_max_k is not None and not args.greedy:
        raise LayercritError("--greedy-max-k needs --greedy")
    rankings = None
    if args.from_ is not None:
        rankings = rankings_from_proxies(ProxyResult.load(args.from_), probes=args.probe or [])
    elif args.probe:
        raise LayercritError("--probe reads a probe's criticality from a proxies file: it needs --from")
    if args.rankings:
        if rankings is None:
            raise LayercritError("--rankings chooses among the rankings of a proxies file: it needs --from")
        unknown = [r for r in args.rankings if r not in rankings]
        if unknown:
            raise LayercritError(f"unknown ranking {unknown[0]!r}; the proxies file gives {', '.join(rankings)}")
        rankings = {r: rankings[r] for r in args.rankings}
    data = _load_data(args)
    model, _ = _load_model(args, data)
    if args.greedy:
        from ...units.blocks import find_block_stack

        stack = find_block_stack(model)
        n = len(stack.names) if stack is not None else 0
        steps = args.greedy_max_k or args.max_k or n // 2
        print(f"greedy order: {steps} steps over {n} blocks cost {greedy_cost(n, steps)} evaluations of the data")
    curve = pruning_curve(model, data, rankings=rankings, max_k=args.max_k, greedy=args.greedy,
                          greedy_max_k=args.greedy_max_k, output=args.output, images=args.images,
                          data_seed=args.data_seed, batch_size=args.batch_size, device=args.device,
                          executor=args.executor, model_name=args.name or args.model, progress=not args.quiet)
    print(format_curve(curve))
    if args.out is not None:
        print(f"wrote {curve.save(args.out)}")
    if args.figure is not None:
        from ...viz import save_figure
        from ...viz.pruning import pruning_curve_plot

        fig, _ = pruning_curve_plot(curve)
        print(f"wrote {save_figure(fig, args.figure)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("pruning-curve", help="perplexity and next-token accuracy with the k least important blocks "
                                             "of each ranking skipped")
    _add_model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help="evaluation data: a data spec (forms below)")
    _add_text_args(p)
    p.add_argument("--from", dest="from_", metavar="PROXIES.csv",
                   help="rankings from a `layercrit proxies --out` file (default: measure the proxies and the "
                        "single-block skip on the same data first, L + 1 forwards)")
    p.add_argument("--rankings", nargs="+", metavar="NAME",
                   help="with --from: only these rankings (bi_token, angular_last, angular_all, relative_l2, skip, "
                        "and each --probe)")
    p.add_argument("--probe", action="append", metavar="PROBE",
                   help="with --from: also rank by this probe's mean criticality in the file (e.g. rerandomize)")
    p.add_argument("--max-k", type=int, metavar="K", help="skip up to K blocks (default: half the blocks)")
    p.add_argument("--greedy", action="store_true",
                   help="also the greedy order (skip, at each step, the block whose removal costs least given "
                        "those already removed): step j tries the L - j blocks left, Σ_{j<K}(L - j) evaluations")
    p.add_argument("--greedy-max-k", type=int, metavar="K", help="greedy steps (default --max-k)")
    p.add_argument("--output", default="next-token", metavar="NAME",
                   help="output adapter (default next-token: each position scored on the next input id)")
    p.add_argument("--images", type=int, metavar="N", help="seeded random evaluation subset of N samples")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the evaluation subset")
    p.add_argument("--batch-size", type=int, default=8, help="samples per forward pass (default 8)")
    p.add_argument("--device", help="e.g. cpu, cuda (default: the model's, i.e. cpu)")
    p.add_argument("--executor", default="prefix", choices=["prefix", "full"],
                   help="re-run only the blocks from the first skipped one on (prefix, default) or the whole model")
    p.add_argument("--name", help="model name in the results (default: the spec)")
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json", help="the table (a CSV gets FILE.config.json beside it)")
    p.add_argument("--figure", type=_out_path, metavar="FILE.png", help="perplexity against blocks skipped, one line per ranking")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run)
