"""`layercrit proxies`: the pruning literature's block proxies (BI, angular distance) beside real criticality."""

from __future__ import annotations

from ..._utils.io import check_output_path
from ...engine.probes import list_probes
from .._args import (
    _add_model_args,
    _add_text_args,
    _load_data,
    _load_model,
    _out_path,
)


def run(args) -> int:
    from ...analyses.proxies.compare import compare_proxies
    from ...analyses.proxies.measure import proxies
    from ...analyses.proxies.result import format_proxies, format_proxy_comparison

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    data = _load_data(args)
    model, factory = _load_model(args, data)
    result = proxies(model, data, max_n=args.max_n, output=args.output, skip=args.skip,
                     against=args.against or [], factory=factory, trials=args.trials, seed=args.seed, prune=args.prune,
                     images=args.images, data_seed=args.data_seed, batch_size=args.batch_size, device=args.device,
                     executor=args.executor, model_name=args.name or args.model, progress=not args.quiet)
    print(format_proxies(result))
    if not result.criticality.empty:
        print()
        print(format_proxy_comparison(compare_proxies(result, bootstrap=args.bootstrap, seed=args.seed)))
    if args.out is not None:
        print(f"wrote {result.save(args.out)}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("proxies", help="the pruning literature's block proxies (BI, angular distance) beside real criticality")
    _add_model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help="evaluation data: a data spec (forms below)")
    _add_text_args(p)
    p.add_argument("--output", metavar="NAME", help="what of the output the criticality compares (as for measure; "
                   "default: chosen from the output)")
    p.add_argument("--max-n", type=int, default=4, metavar="K", help="angular distance over n = 1 … K blocks (default 4)")
    p.add_argument("--against", action="append", choices=list_probes(), metavar="PROBE",
                   help="also measure this probe's criticality of every block, per sample (repeatable; skip always runs)")
    p.add_argument("--no-skip", dest="skip", action="store_false",
                   help="no forward per skipped block (no skip_loss, no skip criticality, no pruning)")
    p.add_argument("--no-prune", dest="prune", action="store_false",
                   help="do not measure the models with the k least important blocks of each ranking skipped")
    p.add_argument("--trials", type=int, default=1, help="draws of each random --against probe per block (default 1)")
    p.add_argument("--seed", type=int, default=0, help="probe and bootstrap seed")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the printed comparison (default 1000)")
    p.add_argument("--images", type=int, metavar="N", help="seeded random evaluation subset of N samples")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the evaluation subset")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default 32)")
    p.add_argument("--device", help="e.g. cpu, cuda (default: the model's, i.e. cpu)")
    p.add_argument("--executor", default="prefix", choices=["prefix", "full"],
                   help="probed forwards re-run only the blocks from the probed one on (prefix, default) or the whole model")
    p.add_argument("--name", help="model name in the results (default: the spec)")
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json",
                   help="the proxies (a CSV gets FILE.samples.csv, FILE.criticality.csv, … and FILE.config.json beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run)
