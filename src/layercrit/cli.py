"""Command-line interface: a thin layer that parses, calls the library and prints.

Bad input is answered with one line `layercrit: error: …` and exit status 2; an unexpected
failure with one line and exit status 1 (set LAYERCRIT_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from . import __version__
from .checkpoints import build_model, load_state_dict
from .criticality import measure
from .data import Dataset, load_data
from .engine import EXECUTORS
from .errors import LayercritError
from .io import check_output_path
from .layers import list_layers
from .models import ModelFactory
from .probes import list_probes
from .results import UNMODIFIED, CriticalityResult, save_table

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise LayercritError(f"{self.prog}: {message} (see --help)")


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _out_path(text: str) -> Path:
    return Path(text)


def _int_list(text: str) -> list[int]:
    """`0,1,2,5` or ranges `0-10` (inclusive), mixed."""
    out: list[int] = []
    try:
        for part in filter(None, text.split(",")):
            lo, sep, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2,5 or 0-10, got {text!r}") from None
    return out


def _pivot(table: pd.DataFrame, value: str, scale: float = 100.0) -> str:
    order_rows = list(dict.fromkeys(table["label"]))
    order_cols = list(dict.fromkeys(table["target"]))
    grid = table.groupby(["label", "target"], sort=False)[value].mean().unstack("target")
    return (grid.reindex(index=order_rows, columns=order_cols) * scale).to_string(float_format=lambda v: f"{v:6.1f}")


def _add_engine_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    """How the evaluations run: batch size, device, executor and the speed options."""
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: the model's, i.e. cpu)")
    p.add_argument("--executor", default="auto", choices=EXECUTORS.list(),
                   help="auto (default): recompute only what each probe changes when the model traces with "
                        "torch.fx, else the whole model; full: the whole model for every probe")
    p.add_argument("--memory-budget", type=float, metavar="MiB",
                   help="intermediate values the incremental executor keeps per batch (default 1024 MiB)")
    p.add_argument("--batch-trials", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the draws of one layer in one vmapped pass (default: on CUDA only)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="CUDA mixed precision (measures stay fp32)")
    p.add_argument("--compile", nargs="?", const=True, default=False, metavar="BACKEND",
                   help="torch.compile the evaluated graphs (default backend inductor; needs a C++ compiler on the CPU)")


def _engine_settings(args) -> dict:
    budget = args.memory_budget
    if budget is not None and not budget > 0:
        raise LayercritError(f"--memory-budget should be a positive number of MiB, got {budget:g}")
    return {"batch_size": args.batch_size, "device": args.device, "executor": args.executor,
            "memory_budget": None if budget is None else max(1, int(budget * 2**20)),
            "batch_trials": args.batch_trials, "autocast": args.autocast, "compile": args.compile}


def _add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="SPEC", help="built-in name, package.module:callable or file.py:callable")
    p.add_argument("--model-arg", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="keyword argument for the model constructor (repeatable)")
    if weights:
        p.add_argument("--weights", metavar="FILE", help="state dict (.pt/.pth/.safetensors) or layercrit checkpoint")


def _load_model(args, data: Dataset | None) -> tuple[object, ModelFactory]:
    return build_model(args.model, getattr(args, "weights", None), dict(args.model_arg), data)


def _bar(value: float, width: int = 20) -> str:
    if not math.isfinite(value):
        return " " * width
    filled = max(0.0, min(1.0, value)) * width
    full = int(filled)
    return ("█" * full + ("▌" if filled - full >= 0.5 else "")).ljust(width, "·")


def format_summary(result: CriticalityResult) -> str:
    """The per-layer table printed by `measure` and `demo`."""
    s = result.summary()
    base = s[s["layer"] == UNMODIFIED]
    s = s[s["layer"] != UNMODIFIED]
    width = max([len("layer")] + [len(x) for x in s["label"]])
    lines = []
    if len(base) and math.isfinite(base["accuracy_mean"].iloc[0]):
        lines.append(f"unmodified model: accuracy {100 * base['accuracy_mean'].iloc[0]:.2f}% on n={int(result.table['n'].iloc[0])}")
    lines.append(f"{'layer'.ljust(width)}  {'probe':<12} {'criticality % (mean ± s.e.)':<28} {'':20}  {'accuracy %':>10}  trials")
    for _, r in s.iterrows():
        probe = r["probe"] + (f":{r['target']}" if isinstance(r.get("target"), str) and r["target"] and r["probe"] == "reinit" else "")
        sem = "" if not math.isfinite(r["criticality_sem"]) else f" ± {100 * r['criticality_sem']:.2f}"
        crit = f"{100 * r['criticality_mean']:6.2f}{sem}"
        acc = f"{100 * r['accuracy_mean']:10.2f}" if math.isfinite(r["accuracy_mean"]) else f"{'—':>10}"
        lines.append(f"{r['label'].ljust(width)}  {probe:<12} {crit:<28} {_bar(r['criticality_mean'])}  {acc}  {int(r['trials'])}")
    return "\n".join(lines)


def cmd_layers(args) -> int:
    data = load_data(args.data) if args.data else None
    model, _ = _load_model(args, data)
    layers = list_layers(model, include_norm=True, label_style=args.label_style)
    rows = [{"name": la.name or "(root)", "label": la.label, "type": la.kind, "params": la.n_params,
             "probed": "yes" if (args.include_norm or not la.is_norm) else "no (norm)"} for la in layers]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    df = pd.DataFrame(rows)
    print(df.to_string(index=False))
    print(f"{sum(r['probed'] == 'yes' for r in rows)} probe-able layers, {sum(r['params'] for r in rows):,} parameters")
    return 0


def cmd_measure(args) -> int:
    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    args.probe = args.probe or ["rerandomize"]
    if "reinit" in args.probe and not args.reference:
        raise LayercritError("--probe reinit needs --reference FILE (a state dict or checkpoint, e.g. checkpoint 0)")
    data = load_data(args.data)
    model, factory = _load_model(args, data)
    reference = load_state_dict(args.reference) if args.reference else None
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
        data_seed=args.data_seed,
        layers=args.layers or None,
        include_norm=args.include_norm,
        granularity=args.granularity,
        label_style=args.label_style,
        **_engine_settings(args),
    )
    print(format_summary(result))
    if args.out is not None:
        path = result.save(args.out)
        print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .training import TrainConfig, train

    config = TrainConfig(
        model=args.model, model_kwargs=dict(args.model_arg), data=args.data, test_data=args.test_data,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, momentum=args.momentum,
        weight_decay=args.weight_decay, milestones=args.milestones, gamma=args.gamma, seed=args.seed,
        augment=args.augment, save_epochs=args.save_epochs,
    )
    run = train(config, args.out, resume=args.resume, progress=not args.quiet, device=args.device)
    rows = pd.DataFrame(run.manifest["checkpoints"])
    print(rows.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"checkpoints and manifest.json in {run.out_dir}")
    return 0


def cmd_robustness(args) -> int:
    from .robustness import CHECKPOINT, robustness

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    result = robustness(
        args.run, args.data, epochs=args.epochs, groups=args.group, images=args.images, data_seed=args.data_seed,
        progress=not args.quiet, trials=args.trials, seed=args.seed, granularity=args.granularity,
        layers=args.layers, include_norm=args.include_norm, **_engine_settings(args),
    )
    t = result.table
    layer_rows = t[(t["probe"] != "none")]
    final = t[t["probe"] == "none"].iloc[0]
    print(f"test error (%) after resetting each row's layer to each column's values; n={int(final['n'])}, "
          f"final model: {100 * final['error']:.2f}%")
    print(_pivot(layer_rows.assign(label=layer_rows["label"].where(layer_rows["layer"] != CHECKPOINT, "(whole model)")), "error"))
    print("\ncriticality (%)")
    print(_pivot(layer_rows[layer_rows["layer"] != CHECKPOINT], "criticality"))
    if args.out is not None:
        print(f"wrote {result.save(args.out)}")
    return 0


def cmd_distances(args) -> int:
    from .robustness import weight_distances

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    table = weight_distances(args.run, epochs=args.epochs, granularity=args.granularity, layers=args.layers,
                             include_norm=args.include_norm)
    for value, title in (("l2", "‖θτ − θ⁰‖₂ / √dim"), ("linf", "‖θτ − θ⁰‖∞"), ("spectral", "spectral norm of θτ − θ⁰")):
        grid = table.pivot_table(index="label", columns="epoch", values=value, sort=False)
        print(f"{title}\n{grid.to_string(float_format=lambda v: f'{v:8.4f}')}\n")
    if args.out is not None:
        print(f"wrote {save_table(table, args.out, {'run': str(args.run)})}")
    return 0


def _modcrit_settings(args) -> dict:
    return {"alphas": args.alphas, "noise_draws": args.noise_draws, "train_subset": args.train_subset,
            "data_seed": args.data_seed, "seed": args.seed, "loss": args.loss, "relative": args.relative,
            "curve": not getattr(args, "fast", True), "layers": args.layers, **_engine_settings(args)}


def cmd_modcrit(args) -> int:
    from .modcrit import run_module_criticality

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    result = run_module_criticality(args.run, args.data, progress=not args.quiet, epsilon=args.epsilon,
                                    **_modcrit_settings(args))
    cols = ["label", "epsilon", "alpha", "sigma", "mu", "delta_norm", "n_params", "loss", "note"]
    print(result.table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print()
    print(result.network[["epsilon", "threshold", "network_criticality", "pac_bayes", "infeasible_modules"]]
          .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"{result.evaluations:,} full-model evaluations on n={result.config['n']} training samples "
          f"(training {args.loss} of the model itself: {result.config['base_train_loss']:.4g})")
    if args.out is not None:
        print(f"wrote {', '.join(map(str, result.save(args.out)))}")
    return 0


def cmd_rank(args) -> int:
    from .generalization import rank_runs

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    models, ranking = rank_runs(args.runs, args.epsilon, progress=not args.quiet, **_modcrit_settings(args))
    print(models.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("\nrank correlation of each measure with the generalization error (GE = test − train error)")
    print(ranking.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if args.out is not None:
        path = save_table(models, args.out, {"runs": [str(r) for r in args.runs], "epsilon": args.epsilon})
        rpath = save_table(ranking, path.with_name(path.stem + ".ranking" + path.suffix))
        print(f"wrote {path} and {rpath}")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import sweep

    report = sweep(args.zoo, args.store, backend=args.backend, address=args.address, workers=args.workers,
                   chunk_layers=args.chunk_layers, progress=not args.quiet)
    rate = report.added / report.elapsed if report.elapsed else 0.0
    print(f"{report.done_before + report.added}/{report.total_units} units in {args.store} "
          f"({report.added} new in {report.items} work items, {report.elapsed:.1f}s, {rate:.2f} units/s; "
          f"store writes {report.store_seconds:.3f}s of {report.compute_seconds:.1f}s compute)")
    for failure in report.failures:
        print(f"layercrit: error: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def cmd_import_reference(args) -> int:
    from .reference import import_reference
    from .store import Store

    with Store(args.store) as store:
        added = import_reference(args.results, args.metadata, store)
        print(f"imported {added} rows into {args.store} ({store.count()} in all)")
    return 0


def cmd_export(args) -> int:
    from .export import export
    from .store import Store

    with Store(args.store, create=False) as store:
        print(f"wrote {export(store, args.format, args.out, probe=args.probe)}")
    return 0


def cmd_summarize(args) -> int:
    from .compare import format_comparison, summarize
    from .store import Store

    with Store(args.store, create=False) as store:
        c = summarize(store, probe=args.probe, target=args.target, by=args.by, exclude_categories=args.exclude_category,
                      baseline=args.baseline)
    print(json.dumps(c.to_json(), indent=2, allow_nan=False) if args.format == "json" else format_comparison(c))
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    path = build_report(args.out, store=args.store, results=args.results, checkpoints=args.checkpoints,
                        baseline=args.baseline, title=args.title, auxiliary=args.auxiliary, critical=args.critical,
                        progress=not args.quiet)
    print(f"report: {path}")
    return 0


# Which table a plot kind reads from a results file, and the sibling file that holds it.
_PLOT_SIBLING = {"modcrit-curves": ("curve", "alpha"), "network-vs-epsilon": ("network", "epsilon"),
                 "ranking": ("ranking", "kendall_tau")}
_STORE_KINDS = {"heatmap", "difference", "spread", "vs-metadata", "vs-accuracy"}


def _read_rows(path: Path) -> tuple[pd.DataFrame, dict]:
    if not path.is_file():
        raise LayercritError(f"results file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".json":
            doc = json.loads(path.read_text())
            return pd.DataFrame(doc["rows"] if "rows" in doc else doc.get("modules", [])), doc
        return pd.read_csv(path), {}
    except (ValueError, KeyError, OSError) as e:
        raise LayercritError(f"cannot read results file {str(path)!r}: {e}") from None


def cmd_plot(args) -> int:
    from .plots import PLOTS, save_figure

    out = check_output_path(args.out, (".png", ".svg", ".pdf"))
    fn = PLOTS[args.kind]
    if args.store is not None:
        if args.kind not in _STORE_KINDS:
            raise LayercritError(f"plot {args.kind!r} reads a results file (--results), not a store; "
                                 f"store plots: {', '.join(sorted(_STORE_KINDS))}")
        from .compare import summarize
        from .store import Store

        with Store(args.store, create=False) as store:
            meta = store.models()
            by = [c for c in ("accuracy",) if c in meta.columns and meta[c].notna().sum() >= 3]
            c = summarize(store, probe=args.probe, by=by, baseline=args.baseline)
        if args.kind in ("vs-metadata", "vs-accuracy"):
            fig, _ = fn(c.models, metadata=meta)
        elif args.kind == "difference":
            fig, _ = fn(c, args.baseline)
        else:
            fig, _ = fn(c, baseline=args.baseline) if args.kind != "heatmap" or args.baseline else fn(c)
    else:
        table, doc = _read_rows(args.results)
        if args.kind in _PLOT_SIBLING:
            key, column = _PLOT_SIBLING[args.kind]
            if column not in table.columns:
                if key in doc:
                    table = pd.DataFrame(doc[key])
                else:
                    table, _ = _read_rows(args.results.with_suffix(f".{key}.csv"))
        fig, _ = fn(table, args.baseline) if args.kind == "difference" else fn(table)
    print(f"wrote {save_figure(fig, out)}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, epochs=args.epochs, trials=args.trials, seed=args.seed, quiet=args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layercrit", description="Which layers of a trained network its decisions depend on.")
    parser.add_argument("--version", action="version", version=f"layercrit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("layers", help="list the probe-able layers of a model")
    _add_model_args(p)
    p.add_argument("--data", metavar="SPEC", help="data the model takes (sizes built-in models)")
    p.add_argument("--include-norm", action="store_true", help="mark normalization layers as probed")
    p.add_argument("--label-style", default="auto", choices=["auto", "name", "gavrikov", "zhang"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_layers)

    p = sub.add_parser("measure", help="layer criticality of a model")
    _add_model_args(p)
    p.add_argument("--data", required=True, metavar="SPEC", help="'digits', 'digits:train' or file.npz")
    p.add_argument("--probe", action="append", choices=list_probes(), help="probe (repeatable; default rerandomize)")
    p.add_argument("--reference", metavar="FILE", help="state dict for --probe reinit (e.g. checkpoint 0)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="probe seed")
    p.add_argument("--images", type=int, help="random evaluation subset of N samples")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the evaluation subset")
    p.add_argument("--layers", nargs="+", metavar="GLOB", help="name or label globs")
    p.add_argument("--include-norm", action="store_true", help="also reset normalization layers")
    p.add_argument("--granularity", default="layer", choices=["layer", "block"])
    p.add_argument("--label-style", default="auto", choices=["auto", "name", "gavrikov", "zhang"])
    _add_engine_args(p, 256)
    p.add_argument("--name", help="model name in the results (default: the spec)")
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_measure)

    p = sub.add_parser("train", help="train a model, saving checkpoint 0 and the chosen epochs")
    _add_model_args(p, weights=False)
    p.add_argument("--data", default="digits:train", metavar="SPEC", help="training data (default digits:train)")
    p.add_argument("--test-data", metavar="SPEC", help="held-out data (default: the data's own test split)")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--out", type=_out_path, required=True, metavar="DIR")
    p.add_argument("--save-epochs", type=_int_list, metavar="LIST", help="e.g. 0,1,2,5,10-20 (default: every epoch)")
    p.add_argument("--lr", type=float, help="learning rate (default per data format, see README)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--milestones", type=_int_list, metavar="LIST", help="epochs where lr *= gamma (default 30/60/90%%)")
    p.add_argument("--gamma", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="pad-4 crop + flip (default: CIFAR only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_train)

    for name, helptext in (("robustness", "re-initialization robustness table of a training run"),
                           ("distances", "weight distance of each layer to checkpoint 0")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", type=Path, metavar="CKPT_DIR")
        p.add_argument("--epochs", type=_int_list, metavar="LIST", help="checkpoints to use (default: all)")
        p.add_argument("--granularity", default="layer", choices=["layer", "block"])
        p.add_argument("--layers", nargs="+", metavar="GLOB")
        p.add_argument("--include-norm", action="store_true")
        p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json")
        if name == "robustness":
            p.add_argument("--data", metavar="SPEC", help="evaluation data (default: the run's test data)")
            p.add_argument("--trials", type=int, default=3, help="re-randomization trials")
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--images", type=int)
            p.add_argument("--data-seed", type=int, default=0)
            p.add_argument("--group", nargs="+", metavar="GROUP",
                           help="joint groups: NAME=GLOB,GLOB or all-but-first-block-per-stage / every-second-block")
            _add_engine_args(p, 256)
            p.add_argument("--quiet", action="store_true")
        p.set_defaults(fn=cmd_robustness if name == "robustness" else cmd_distances)

    for name, helptext in (("modcrit", "module criticality (Chatterji et al.) of a training run"),
                           ("rank", "complexity measures of several runs ranked against their generalization error")):
        p = sub.add_parser(name, help=helptext)
        if name == "modcrit":
            p.add_argument("run", type=Path, metavar="CKPT_DIR")
            p.add_argument("--data", metavar="SPEC", help="training set (default: the run's own)")
        else:
            p.add_argument("runs", type=Path, nargs="+", metavar="CKPT_DIR")
        p.add_argument("--epsilon", type=float, nargs="+", default=[0.1], help="training-error thresholds (default 0.1)")
        p.add_argument("--relative", action="store_true", help="epsilon counts above the model's own training error")
        p.add_argument("--alphas", type=int, default=21, help="alpha grid points (default 21)")
        p.add_argument("--noise-draws", type=int, default=8, help="Monte-Carlo draws per (alpha, sigma) (default 8)")
        p.add_argument("--train-subset", type=int, metavar="N", help="seeded subset of the training set")
        p.add_argument("--data-seed", type=int, default=0)
        p.add_argument("--seed", type=int, default=0, help="noise seed")
        p.add_argument("--loss", default="error", choices=["error", "cross-entropy"])
        if name == "modcrit":  # rank needs only mu and sigma at alpha = 1: it always searches that way
            p.add_argument("--fast", action="store_true", help="only the alphas that can lower mu (no full curve)")
        p.add_argument("--layers", nargs="+", metavar="GLOB")
        _add_engine_args(p, 512)
        p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json")
        p.add_argument("--quiet", action="store_true")
        p.set_defaults(fn=cmd_modcrit if name == "modcrit" else cmd_rank)

    p = sub.add_parser("sweep", help="measure every model of a zoo file into a results store (resumable)")
    p.add_argument("zoo", type=Path, metavar="ZOO.toml")
    p.add_argument("--store", type=Path, required=True, metavar="FILE", help="SQLite results store (created if missing)")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--workers", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--chunk-layers", type=int, metavar="N", help="layers per work item (default: all of a trial)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("import-reference", help="import results of the Gavrikov et al. reference implementation")
    p.add_argument("results", type=Path, metavar="results.csv")
    p.add_argument("--metadata", type=Path, required=True, metavar="models.csv", help="model_id, category, accuracy, …")
    p.add_argument("--store", type=Path, required=True, metavar="FILE")
    p.set_defaults(fn=cmd_import_reference)

    p = sub.add_parser("export", help="write a results store as one tidy table")
    p.add_argument("--store", type=Path, required=True, metavar="FILE")
    p.add_argument("--format", default="csv", choices=["csv", "parquet"])
    p.add_argument("--out", type=Path, required=True, metavar="PATH")
    p.add_argument("--probe", help="only this probe's rows")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("summarize", help="cross-model analysis of a results store")
    p.add_argument("--store", type=Path, required=True, metavar="FILE")
    p.add_argument("--by", nargs="+", default=["accuracy"], metavar="COLUMN",
                   help="metadata columns to correlate with average criticality (default accuracy; base_accuracy = measured)")
    p.add_argument("--exclude-category", nargs="+", default=[], metavar="NAME", help="also correlate without these categories")
    p.add_argument("--baseline", metavar="MODEL", help="difference of every model's criticality to this model's")
    p.add_argument("--probe", default="rerandomize")
    p.add_argument("--target", help="the probe's target when it has several (e.g. E0)")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.set_defaults(fn=cmd_summarize)

    from .plots import list_plots

    kinds = list_plots()
    p = sub.add_parser("plot", help="draw one of the papers' figures",
                       description="Kinds: " + "; ".join(f"{k}: {v}" for k, v in kinds.items()))
    p.add_argument("kind", choices=list(kinds))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="FILE", help="results store (cross-model plots)")
    src.add_argument("--results", type=Path, metavar="FILE",
                     help="a results file of measure, robustness, distances, modcrit or rank")
    p.add_argument("--out", type=Path, default=Path("figure.png"), metavar="FILE.png|.svg|.pdf")
    p.add_argument("--baseline", metavar="MODEL", help="baseline model (heatmap order, difference plot)")
    p.add_argument("--probe", default="rerandomize", help="probe of a store plot")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("report", help="a self-contained HTML report of results, a store or a training run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="FILE", help="results store (cross-model report)")
    src.add_argument("--results", type=Path, metavar="FILE", help="results file of `layercrit measure`")
    src.add_argument("--checkpoints", type=Path, metavar="DIR", help="training run (robustness, distances, module criticality)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p.add_argument("--baseline", metavar="MODEL", help="baseline model of a store report")
    p.add_argument("--title")
    p.add_argument("--auxiliary", type=float, default=10.0, help="%% below which a layer is called auxiliary (default 10)")
    p.add_argument("--critical", type=float, default=50.0, help="%% from which a layer is called critical (default 50)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("demo", help="train an FCN-3x256 on digits and measure its layers")
    p.add_argument("--out", type=_out_path, default=Path("demo-out"), metavar="DIR")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.formatwarning = lambda msg, cat, *a, **k: f"layercrit: warning: {msg}\n"
            return args.fn(args)
    except LayercritError as e:
        print(f"layercrit: error: {e.message}", file=sys.stderr)
        for problem in e.problems:
            print(f"layercrit: error:   - {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layercrit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line unless debugging
        if os.environ.get("LAYERCRIT_DEBUG"):
            raise
        print(f"layercrit: internal error: {type(e).__name__}: {e} (set LAYERCRIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
