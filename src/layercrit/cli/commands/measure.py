"""`layercrit measure`: layer criticality of a model."""

from __future__ import annotations

from pathlib import Path

from ..._utils.io import check_output_path
from ...analyses.criticality import format_summary, measure
from ...engine.probes import list_probes
from ...errors import LayercritError
from ...results import CriticalityResult
from ...training.checkpoints import load_state_dict
from ...units.layers import GRANULARITIES
from .._args import (
    _add_engine_args,
    _add_model_args,
    _add_text_args,
    _engine_settings,
    _load_data,
    _load_model,
    _out_path,
    _stats,
)


def run(args) -> int:
    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    args.probe = args.probe or ["rerandomize"]
    for name in ("reinit", "interpolate"):
        if name in args.probe and not args.reference:
            raise LayercritError(f"--probe {name} needs --reference FILE (a state dict or checkpoint, e.g. checkpoint 0)")
    data = _load_data(args)
    model, factory = _load_model(args, data)
    reference = load_state_dict(args.reference) if args.reference else None
    if "interpolate" in args.probe:
        from ...engine.probes import Interpolate

        interpolate = Interpolate(reference, args.alpha, args.sigma)
        args.probe = [interpolate if p == "interpolate" else p for p in args.probe]
    if args.normalization:  # how the inputs relate to [0, 1] pixels, for --shift
        from ...data.corruptions import parse_normalization

        data.meta["normalization"] = parse_normalization(*args.normalization)
    result = measure(
        model,
        data,
        factory=factory,
        reference=reference,
        reference_name=Path(args.reference).stem if args.reference else "reference",
        model_name=args.name or args.model,
        progress=not args.quiet,
        probes=args.probe,
        trials=args.trials,
        seed=args.seed,
        images=args.images,
        strict_images=args.strict_images,
        data_seed=args.data_seed,
        layers=args.layers or None,
        include_norm=args.include_norm,
        granularity=args.granularity,
        label_style=args.label_style,
        shifts=args.shift,
        output=args.output,
        precision=args.precision,
        max_trials=args.max_trials,
        rank_only=args.rank_only,
        **_engine_settings(args),
    )
    if args.shift:
        from ...analyses.shifts import format_shift_table
        from ...results import CLEAN

        clean = CriticalityResult(result.table[result.table["shift"] == CLEAN], result.config)
        print(f"clean data:\n{format_summary(clean)}\n\n{format_shift_table(result)}")
    else:
        print(format_summary(result))
    if args.out is not None:
        path = result.save(args.out)
        print(f"wrote {path}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("measure", help="layer criticality of a model")
    _add_model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help="evaluation data: a data spec (forms below)")
    _add_text_args(p)
    p.add_argument("--output", metavar="NAME",
                   help="what of the model's output is compared: logits ((batch, classes)), next-token (every "
                        "non-padded position of a causal LM; next-token:last, next-token:every:K), hidden:mean, "
                        "hidden:cls, hidden:last (raw vectors of a model without a head: 1 - cos and relative L2); "
                        "default: chosen from the output where unambiguous")
    p.add_argument("--probe", action="append", choices=list_probes(), metavar="PROBE",
                   help=f"{', '.join(list_probes())} (repeatable; default rerandomize; each described below)")
    p.add_argument("--reference", metavar="FILE",
                   help="state dict or checkpoint for --probe reinit and interpolate (e.g. checkpoint 0)")
    p.add_argument("--alpha", type=float, default=0.0,
                   help="--probe interpolate: position on the path from the reference (0, the default) to the model (1)")
    p.add_argument("--sigma", type=float, default=0.0,
                   help="--probe interpolate: std of Gaussian noise added to the interpolated values (default 0: none)")
    p.add_argument("--trials", type=int, default=3,
                   help="draws of each random probe per layer (default 3; with --precision: of the first round, at least 6)")
    p.add_argument("--seed", type=int, default=0, help="probe seed")
    p.add_argument("--images", type=int, metavar="N",
                   help="seeded random evaluation subset of N samples (more than the data has: all of it, with a warning)")
    p.add_argument("--precision", type=float, metavar="H",
                   help="adaptive sampling: evaluate each layer in rounds (more images, more trials) until the 95 %% "
                        "half-width of its mean criticality is at most H (a fraction: 0.01 = one point); --images caps "
                        "the images, --max-trials the trials")
    p.add_argument("--max-trials", type=int, metavar="K", help="adaptive sampling: most draws per layer (default 50)")
    p.add_argument("--rank-only", action="store_true",
                   help="adaptive sampling until every layer's interval is clear of its neighbours' in the ranking "
                        "(with --precision: or at most H wide)")
    p.add_argument("--strict-images", action="store_true", help="an --images above the data's size is an error")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the evaluation subset (and of --shift's noise)")
    p.add_argument("--shift", action="append", metavar="NAME[:SEVERITY]",
                   help="also measure on data corrupted by an ImageNet-C corruption at severity 1-5 (bare NAME: all "
                        "five), next to the clean data (repeatable; results get a `shift` column): "
                        "brightness, contrast, defocus_blur, gaussian_blur, gaussian_noise, impulse_noise, "
                        "jpeg_compression, pixelate, shot_noise, speckle_noise")
    p.add_argument("--normalization", nargs=2, metavar=("MEAN", "STD"),
                   help="for --shift on data that does not say it (.npz): inputs are (pixels - MEAN) / STD with pixels "
                        "in [0, 1]; one value or one per channel, comma-separated (0 1: raw pixels)")
    p.add_argument("--layers", nargs="+", metavar="GLOB", help="name or label globs")
    p.add_argument("--include-norm", nargs="?", const=True, default=False, type=_stats, metavar="stats",
                   help="also reset normalization layers' affine parameters; `--include-norm stats`: their running "
                        "statistics too (BatchNorm's mean and variance, as the reference code resets them)")
    p.add_argument("--granularity", default="layer", choices=GRANULARITIES,
                   help="probe each layer (default), each block (residual block, transformer layer; a transformer's "
                        "embeddings and head are one unit each), or each transformer block's attn / mlp sub-layer")
    p.add_argument("--label-style", default="auto", choices=["auto", "name", "gavrikov", "figure", "zhang"],
                   help="layer labels: auto (default: the papers' names where the architecture is known), the module "
                        "name, or Gavrikov's / Zhang's naming")
    _add_engine_args(p, 256)
    p.add_argument("--name", help="model name in the results (default: the spec)")
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json",
                   help="the tidy table (a CSV gets FILE.config.json beside it; folders are created)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run)
