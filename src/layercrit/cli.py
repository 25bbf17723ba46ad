"""Command-line interface: a thin layer that parses, calls the library and prints.

Bad input is answered with one line `layercrit: error: …` and exit status 2; an unexpected
failure with one line and exit status 1 (set LAYERCRIT_DEBUG=1 for the traceback). Ctrl-C
(SIGINT) and SIGTERM stop any command the same way: one line `layercrit: interrupted …`, exit
status 130, finished results kept (a sweep's committed work items, a run's saved checkpoints).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import signal
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from . import __version__
from .checkpoints import build_model, load_state_dict
from .criticality import measure
from .data import Dataset, load_data
from .engine import EXECUTORS
from .errors import LayercritError
from .io import check_output_dir, check_output_path, logging_above_bars
from .layers import GRANULARITIES, list_layers
from .models import ModelFactory
from .probes import list_probes
from .results import UNMODIFIED, CriticalityResult, format_number, format_p, format_percent, save_table

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


def _stats(text: str) -> str:
    if text != "stats":
        raise argparse.ArgumentTypeError(f"expected nothing or 'stats', got {text!r}")
    return text


def _first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring, its lines joined (help texts show it whole, never cut)."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    m = re.search(r"(?<=[.!?])\s+(?=[A-Z`(])", para)
    return para[: m.start()] if m else para


def _listing(title: str, entries: dict[str, str]) -> str:
    """`title:` then one wrapped, indented paragraph per entry (for a help epilog)."""
    import shutil

    width = max(40, min(100, shutil.get_terminal_size().columns - 2))
    lines = [f"{title}:"]
    for name, text in entries.items():
        lines.append(textwrap.fill(f"{name}: {text}", width, initial_indent="  ", subsequent_indent="      ",
                                   break_on_hyphens=False))
    return "\n".join(lines)


def _probe_help() -> dict[str, str]:
    from .probes import PROBES

    needs = {"reinit": " Needs --reference.", "interpolate": " Needs --reference; --alpha, --sigma set α and σ."}
    return {name: _first_sentence(PROBES.get(name).__doc__) + needs.get(name, "") for name in list_probes()}


def _finish_help(sub) -> None:
    """Every command gets a description, and commands taking data or probes list every data spec and probe."""
    from .data import SPECS

    helps = {a.dest: a.help for a in sub._choices_actions}
    for name, p in sub.choices.items():
        p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the listings' lines; options still wrap
        if p.description is None:
            text = helps.get(name) or name
            p.description = text[0].upper() + text[1:] + "."
        options = {o for a in p._actions for o in a.option_strings}
        epilog = [p.epilog] if p.epilog else []
        if "--probe" in options and name == "measure":
            epilog.append(_listing("probes", _probe_help()))
        if options & {"--data", "--test-data"}:
            epilog.append(_listing("data specs", SPECS))
        p.epilog = "\n\n".join(epilog) or None


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
    return (grid.reindex(index=order_rows, columns=order_cols) * scale).to_string(
        float_format=lambda v: f"{format_number(v, 1):>6}")


def _add_engine_args(p: argparse.ArgumentParser, batch_size: int) -> None:
    """How the evaluations run: batch size, device, executor and the speed options."""
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"samples per forward pass (default {batch_size})")
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


def _add_text_args(p: argparse.ArgumentParser) -> None:
    """How `text:FILE` data is tokenized (a local Hugging Face tokenizer; nothing is downloaded)."""
    p.add_argument("--tokenizer", metavar="DIR", help="text:FILE data: a local Hugging Face tokenizer folder")
    p.add_argument("--seq-len", type=int, metavar="N", help="text:FILE data: tokens per window (default 128)")
    p.add_argument("--stride", type=int, metavar="N", help="text:FILE data: tokens between window starts (default: no overlap)")


def _load_data(args) -> Dataset:
    return load_data(args.data, tokenizer=args.tokenizer, seq_len=args.seq_len, stride=args.stride)


def _add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="SPEC", help="built-in name, torchvision:NAME, timm:NAME, package.module:callable or file.py:callable")
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
        ppl = base["perplexity_mean"].iloc[0] if "perplexity_mean" in base else math.nan  # next-token outputs
        lines.append(f"unmodified model: accuracy {format_percent(base['accuracy_mean'].iloc[0])}% on n={int(result.table['n'].iloc[0])}"
                     + (f", perplexity {ppl:.2f}" if math.isfinite(ppl) else ""))
    # Why a value is missing: the rows' own notes (if the table has them), joined per (layer, probe).
    t = result.table
    adaptive = "half_width" in s.columns  # adaptive sampling: ± the 95 % half-width over trials and images
    notes = ({} if "note" not in t else t[t["note"].fillna("").astype(str) != ""].groupby(
        ["layer", "probe"], sort=False)["note"].agg(lambda v: "; ".join(dict.fromkeys(map(str, v)))).to_dict())
    what, cw = ("criticality % (mean ± 95 % CI)", 30) if adaptive else ("criticality % (mean ± s.e.)", 28)
    lines.append(f"{'layer'.ljust(width)}  {'probe':<12} {what:<{cw}} {'':20}  {'accuracy %':>10}  trials"
                 + ("  images" if adaptive else "") + ("  note" if notes else ""))
    for _, r in s.iterrows():
        probe = r["probe"] + (f":{r['target']}" if isinstance(r.get("target"), str) and r["target"] and r["probe"] == "reinit" else "")
        spread = r["half_width"] if adaptive else r["criticality_sem"]
        sem = "" if not math.isfinite(spread) else f" ± {format_percent(spread)}"
        crit = f"{format_percent(r['criticality_mean']):>6}{sem}"
        acc = f"{format_percent(r['accuracy_mean']):>10}"
        note = notes.get((r["layer"], r["probe"]), "")
        lines.append(f"{r['label'].ljust(width)}  {probe:<12} {crit:<{cw}} {_bar(r['criticality_mean'])}  {acc}  "
                     + (f"{int(r['trials']):>6}  {int(r['n']):>6}" if adaptive else f"{int(r['trials'])}") + (f"  {note}" if note else ""))
    if len(s) and s["accuracy_mean"].isna().all():
        output = str(result.config.get("output") or "")
        lines.append(f"accuracy —: {output} compares raw vectors, without labels" if output.startswith("hidden")
                     else "accuracy —: the data have no labels")
    if adaptive and "adaptive" in result.config:
        from .adaptive import format_adaptive

        lines.append(format_adaptive(result.config["adaptive"]))
    return "\n".join(lines)


def _table(df: pd.DataFrame, formats: dict[str, Callable] | None = None, titles: dict[str, str] | None = None,
           digits: int = 4) -> str:
    """`df` as text: floats to `digits` significant digits (rounding noise prints as 0), NaN as "—",
    columns in `formats` by their own function, then renamed by `titles`."""
    def number(v) -> str:
        if pd.isna(v):
            return "—"
        return "0" if abs(v) < 1e-12 else f"{v:.{digits}g}"

    shown = df.copy()
    for col in shown.columns:
        fn = (formats or {}).get(col)
        if fn is not None:
            shown[col] = shown[col].map(fn)
        elif pd.api.types.is_float_dtype(shown[col]):
            shown[col] = shown[col].map(number)
    return shown.rename(columns=titles or {}).to_string(index=False)


def format_modcrit(result: ModcritResult) -> str:  # noqa: F821 (annotation only; modcrit is imported lazily)
    """The tables printed by `modcrit`: per module and per ε (training errors in %), with the
    search settings the numbers depend on and a note where a number is undefined."""
    from .generalization import describe_search, network_note

    loss = result.config.get("loss", "error")
    pct = {"epsilon": format_percent, "threshold": format_percent, "loss": format_percent} if loss == "error" else {}
    titles = {k: f"{k} %" for k in pct}
    t = result.table[["label", "epsilon", "alpha", "sigma", "mu", "delta_norm", "n_params", "loss", "note"]]
    net = result.network.assign(note=[network_note(r, loss) for _, r in result.network.iterrows()])
    net = net[["epsilon", "threshold", "network_criticality", "pac_bayes", "infeasible_modules", "note"]]
    if not net["note"].astype(bool).any():
        net = net.drop(columns="note")
    own = result.config["base_train_loss"]
    return "\n".join([
        _table(t, pct, titles), "", _table(net, pct, titles),
        f"search: {describe_search(result.config)}",
        f"{result.evaluations:,} full-model evaluations; training {loss} of the model itself: "
        + (f"{format_percent(own)} %" if loss == "error" else f"{own:.4g}"),
    ])


def format_ranking(models: pd.DataFrame, ranking: pd.DataFrame) -> str:
    """The tables printed by `rank`: measures per model (errors in %), the search settings beside
    the module-criticality measures, notes for undefined values, and the rank correlations with GE
    (p-values below 0.001 as <0.001, small samples noted)."""
    errors = [c for c in ("train_error", "test_error", "ge") if c in models]
    lines = [_table(models.drop(columns=[c for c in ("search", "note") if c in models]),
                    dict.fromkeys(errors, format_percent), {c: f"{c} %" for c in errors})]
    if "note" in models:
        lines += [f"note: {m}: {n}" for m, n in zip(models["model"], models["note"]) if isinstance(n, str) and n]
    if "search" in models:
        searches = dict(zip(models["model"], models["search"]))
        if len(set(searches.values())) == 1:
            lines.append(f"module-criticality search (pac_bayes@ε, network_criticality@ε): {models['search'].iloc[0]}")
        else:
            lines += [f"module-criticality search of {m}: {s}" for m, s in searches.items()]
    lines += ["", "rank correlation of each measure with the generalization error (GE = test − train error)"]
    signed = lambda v: format_number(v, 3, sign=True)  # noqa: E731
    lines.append(_table(ranking, {"kendall_p": format_p, "spearman_p": format_p, "kendall_tau": signed,
                                  "spearman_rho": signed}))
    return "\n".join(lines)


def cmd_layers(args) -> int:
    data = _load_data(args) if args.data else None
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
    for name in ("reinit", "interpolate"):
        if name in args.probe and not args.reference:
            raise LayercritError(f"--probe {name} needs --reference FILE (a state dict or checkpoint, e.g. checkpoint 0)")
    data = _load_data(args)
    model, factory = _load_model(args, data)
    reference = load_state_dict(args.reference) if args.reference else None
    if "interpolate" in args.probe:
        from .probes import Interpolate

        interpolate = Interpolate(reference, args.alpha, args.sigma)
        args.probe = [interpolate if p == "interpolate" else p for p in args.probe]
    if args.normalization:  # how the inputs relate to [0, 1] pixels, for --shift
        from .shifts import parse_normalization

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
        from .shifts import CLEAN, format_shift_table

        clean = CriticalityResult(result.table[result.table["shift"] == CLEAN], result.config)
        print(f"clean data:\n{format_summary(clean)}\n\n{format_shift_table(result)}")
    else:
        print(format_summary(result))
    if args.out is not None:
        path = result.save(args.out)
        print(f"wrote {path}")
    return 0


def cmd_train(args) -> int:
    from .training import TrainConfig, train

    check_output_dir(args.out)
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
        strict_images=args.strict_images,
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
                             include_norm=args.include_norm, progress=not args.quiet)
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
    print(format_modcrit(result))
    if args.out is not None:
        print(f"wrote {', '.join(map(str, result.save(args.out)))}")
    return 0


def cmd_rank(args) -> int:
    from .generalization import rank_runs

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
    from .compare import _records, format_comparison, summarize
    from .store import Store

    if args.results is not None:  # a `measure --shift` file: clean vs shifted layer profiles per model
        from .shifts import format_shift_correlations, shift_correlations

        corr = shift_correlations(CriticalityResult.load(args.results).table, probe=args.probe, target=args.target)
        print(json.dumps({"shift_correlations": _records(corr)}, indent=2, allow_nan=False)
              if args.format == "json" else format_shift_correlations(corr))
        return 0
    with Store(args.store, create=False) as store:
        c = summarize(store, probe=args.probe, target=args.target, by=args.by, exclude_categories=args.exclude_category,
                      baseline=args.baseline)
    print(json.dumps(c.to_json(), indent=2, allow_nan=False) if args.format == "json" else format_comparison(c))
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    check_output_dir(args.out)
    path = build_report(args.out, store=args.store, results=args.results, checkpoints=args.checkpoints,
                        proxies=args.proxies, baseline=args.baseline, title=args.title, auxiliary=args.auxiliary, critical=args.critical,
                        progress=not args.quiet)
    print(f"report: {path}")
    return 0


# Plot kinds that read a companion table of a results file: (its key, a column only it has, the command
# writing it). `modcrit --out m.csv` writes m.curve.csv and m.network.csv beside m.csv (a JSON holds all);
# `rank --out r.csv` writes r.ranking.csv.
_PLOT_SIBLING = {"modcrit-curves": ("curve", "loss_no_noise", "modcrit"),
                 "network-vs-epsilon": ("network", "network_criticality", "modcrit"),
                 "ranking": ("ranking", "kendall_tau", "rank")}
_COMPANIONS = ("curve", "network", "ranking", "config")


def _companion(path: Path, key: str) -> Path:
    """`m.csv` (or `m.network.csv`) → `m.<key>.csv`."""
    stem = path.stem
    for k in _COMPANIONS:
        if stem.endswith(f".{k}"):
            stem = stem[: -len(k) - 1]
    return path.with_name(f"{stem}.{key}{path.suffix}")


def _sibling_table(kind: str, path: Path, table: pd.DataFrame, doc: dict) -> pd.DataFrame:
    """The table plot `kind` needs: `table` itself, the part of a JSON document, or the companion file."""
    key, column, command = _PLOT_SIBLING[kind]
    if column in table.columns:
        return table
    if key in doc:
        return pd.DataFrame(doc[key])
    sibling = _companion(path, key)
    if not sibling.is_file():
        raise LayercritError(
            f"plot {kind} reads the {key} table that `layercrit {command} --out FILE{path.suffix}` writes beside "
            f"its results as FILE.{key}{path.suffix}; {str(sibling)!r} does not exist "
            f"(give it with --results, or the .json output of {command}, which holds every table)")
    return _read_rows(sibling)[0]


def _metadata_column(kind: str, column: str | None, models: pd.DataFrame, meta: pd.DataFrame) -> str:
    """The x column of vs-metadata: `column`, else ε when the models have it, else an error naming the choices."""
    merged = models.merge(meta[[c for c in meta.columns if c == "model" or c not in models.columns]], on="model", how="left")
    numeric = [c for c in meta.columns if c not in ("model", "n") and pd.to_numeric(meta[c], errors="coerce").notna().any()]
    wanted = column or "epsilon"
    if wanted in merged.columns and pd.to_numeric(merged[wanted], errors="coerce").notna().any():
        return wanted
    what = f"column {wanted!r}" if column else "an 'epsilon' value (the default x axis)"
    raise LayercritError(f"plot {kind}: no model has {what}; choose a numeric column with --column NAME: "
                         f"{', '.join(numeric) or '(none)'}")
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
    if args.column is not None and args.kind not in ("vs-metadata", "vs-accuracy"):
        raise LayercritError(f"--column chooses the x axis of vs-metadata and vs-accuracy, not of {args.kind}")
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
        if args.kind == "vs-metadata":
            fig, _ = fn(c.models, x=_metadata_column(args.kind, args.column, c.models, meta), metadata=meta)
        elif args.kind == "vs-accuracy":
            fig, _ = fn(c.models, metadata=meta, **({"x": args.column} if args.column else {}))
        elif args.kind == "difference":
            fig, _ = fn(c, args.baseline)
        else:
            fig, _ = fn(c, baseline=args.baseline) if args.kind != "heatmap" or args.baseline else fn(c)
    elif args.kind in ("proxy-scatter", "proxy-bump"):  # a `layercrit proxies` file and the tables beside it
        from .proxies import ProxyResult

        fig, _ = fn(ProxyResult.load(args.results))
    else:
        table, doc = _read_rows(args.results)
        if args.kind in _PLOT_SIBLING:
            table = _sibling_table(args.kind, args.results, table, doc)
        fig, _ = fn(table, args.baseline) if args.kind == "difference" else fn(table)
    print(f"wrote {save_figure(fig, out)}")
    return 0


def cmd_proxies(args) -> int:
    from .proxies import compare_proxies, format_proxies, format_proxy_comparison, proxies

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


def cmd_compare_proxies(args) -> int:
    from .proxies import ProxyResult, compare_proxies, format_proxy_comparison

    if args.out is not None:
        check_output_path(args.out, (".csv", ".json"))
    result = ProxyResult.load(args.proxies)
    criticality = CriticalityResult.load(args.criticality) if args.criticality else None
    c = compare_proxies(result, criticality, probes=args.probe, bootstrap=args.bootstrap, seed=args.seed)
    print(format_proxy_comparison(c))
    if args.out is not None:
        print(f"wrote {c.save(args.out)}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    check_output_dir(args.out)
    run_demo(args.out, epochs=args.epochs, trials=args.trials, seed=args.seed, quiet=args.quiet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="layercrit", description="Which layers of a trained network its decisions depend on.")
    parser.add_argument("--version", action="version", version=f"layercrit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("layers", help="list the probe-able layers of a model")
    _add_model_args(p)
    p.add_argument("--data", metavar="SPEC", help="data the model takes (sizes built-in models)")
    _add_text_args(p)
    p.add_argument("--include-norm", action="store_true", help="mark normalization layers as probed")
    p.add_argument("--label-style", default="auto", choices=["auto", "name", "gavrikov", "figure", "zhang"],
                   help="layer labels: auto (default: the papers' names where the architecture is known), the module "
                        "name, or Gavrikov's / Zhang's naming")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(fn=cmd_layers)

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
    p.set_defaults(fn=cmd_measure)

    p = sub.add_parser("train", help="train a model, saving checkpoint 0 and the chosen epochs")
    _add_model_args(p, weights=False)
    p.add_argument("--data", default="digits:train", metavar="SPEC", help="training data: a data spec (default digits:train; forms below)")
    p.add_argument("--test-data", metavar="SPEC", help="held-out data (default: the data's own test split)")
    p.add_argument("--epochs", type=int, default=40, help="epochs to train (default 40)")
    p.add_argument("--out", type=_out_path, required=True, metavar="DIR",
                   help="folder for the checkpoints and manifest.json (created with its parents)")
    p.add_argument("--save-epochs", type=_int_list, metavar="LIST", help="e.g. 0,1,2,5,10-20 (default: every epoch)")
    p.add_argument("--lr", type=float, help="learning rate (default per data format, see README)")
    p.add_argument("--batch-size", type=int, default=128, help="samples per SGD step (default 128)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="L2 weight decay (default 0)")
    p.add_argument("--milestones", type=_int_list, metavar="LIST", help="epochs where lr *= gamma (default 30/60/90%%)")
    p.add_argument("--gamma", type=float, default=0.2, help="learning-rate factor at each milestone (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, shuffling and augmentation (default 0)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="pad-4 crop + flip (default: CIFAR only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--device", help="e.g. cpu, cuda (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_train)

    for name, helptext in (("robustness", "re-initialization robustness table of a training run"),
                           ("distances", "weight distance of each layer to checkpoint 0")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("run", type=Path, metavar="CKPT_DIR", help="a checkpoint folder written by `layercrit train`")
        p.add_argument("--epochs", type=_int_list, metavar="LIST", help="checkpoints to use, e.g. 0,1,5-10 (default: all)")
        p.add_argument("--granularity", default="layer", choices=GRANULARITIES,
                       help="each layer (default), each block (residual block, transformer layer) or each "
                            "transformer block's attn / mlp sub-layer")
        p.add_argument("--layers", nargs="+", metavar="GLOB", help="name or label globs (default: every layer)")
        p.add_argument("--include-norm", action="store_true", help="also normalization layers")
        p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json", help="the tidy table (folders are created)")
        if name == "robustness":
            p.add_argument("--data", metavar="SPEC", help="evaluation data: a data spec (default: the run's test data; forms below)")
            p.add_argument("--trials", type=int, default=3, help="re-randomization trials (default 3)")
            p.add_argument("--seed", type=int, default=0, help="probe seed (default 0)")
            p.add_argument("--images", type=int, metavar="N",
                           help="seeded random evaluation subset (more than the data has: all of it, with a warning)")
            p.add_argument("--strict-images", action="store_true", help="an --images above the data's size is an error")
            p.add_argument("--data-seed", type=int, default=0, help="seed of the evaluation subset (default 0)")
            p.add_argument("--group", nargs="+", metavar="GROUP",
                           help="joint groups: NAME=GLOB,GLOB or all-but-first-block-per-stage / every-second-block")
            _add_engine_args(p, 256)
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(fn=cmd_robustness if name == "robustness" else cmd_distances)

    for name, helptext in (("modcrit", "module criticality (Chatterji et al.) of a training run"),
                           ("rank", "complexity measures of several runs ranked against their generalization error")):
        p = sub.add_parser(name, help=helptext)
        if name == "modcrit":
            p.add_argument("run", type=Path, metavar="CKPT_DIR", help="a checkpoint folder written by `layercrit train`")
            p.add_argument("--data", metavar="SPEC", help="training set: a data spec (default: the run's own; forms below)")
        else:
            p.add_argument("runs", type=Path, nargs="+", metavar="CKPT_DIR", help="checkpoint folders of `layercrit train`")
        p.add_argument("--epsilon", type=float, nargs="+", default=[0.1], help="training-error thresholds (default 0.1)")
        p.add_argument("--relative", action="store_true", help="epsilon counts above the model's own training error")
        p.add_argument("--alphas", type=int, default=21, help="alpha grid points (default 21)")
        p.add_argument("--noise-draws", type=int, default=8, help="Monte-Carlo draws per (alpha, sigma) (default 8)")
        p.add_argument("--train-subset", type=int, metavar="N",
                       help="seeded subset of N training samples (faster; more than the set has: all of it)")
        p.add_argument("--data-seed", type=int, default=0, help="seed of the training subset (default 0)")
        p.add_argument("--seed", type=int, default=0, help="noise seed")
        p.add_argument("--loss", default="error", choices=["error", "cross-entropy"],
                       help="training loss compared with epsilon: 0-1 error (default, the paper's) or cross-entropy")
        if name == "modcrit":  # rank needs only mu and sigma at alpha = 1: it always searches that way
            p.add_argument("--fast", action="store_true", help="only the alphas that can lower mu (no full curve)")
        p.add_argument("--layers", nargs="+", metavar="GLOB", help="modules: name or label globs (default: every layer)")
        _add_engine_args(p, 512)
        p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json",
                       help="the results; a CSV gets FILE.config.json and (modcrit) FILE.curve.csv, FILE.network.csv "
                            "or (rank) FILE.ranking.csv beside it")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(fn=cmd_modcrit if name == "modcrit" else cmd_rank)

    p = sub.add_parser("sweep", help="measure every model of a zoo file into a results store (resumable)")
    p.add_argument("zoo", type=Path, metavar="ZOO.toml", help="zoo file: the models and their settings (see README)")
    p.add_argument("--store", type=Path, required=True, metavar="FILE", help="SQLite results store (created if missing)")
    p.add_argument("--backend", default="local", choices=["local", "ray"],
                   help="local (default: in this process) or ray (a local Ray instance, or --address)")
    p.add_argument("--address", help="Ray cluster to join (default: start a local Ray)")
    p.add_argument("--workers", type=int, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--chunk-layers", type=int, metavar="N", help="layers per work item (default: all of a trial)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("import-reference", help="import results of the Gavrikov et al. reference implementation")
    p.add_argument("results", type=Path, metavar="results.csv", help="results of the reference implementation")
    p.add_argument("--metadata", type=Path, required=True, metavar="models.csv", help="model_id, category, accuracy, …")
    p.add_argument("--store", type=Path, required=True, metavar="FILE", help="SQLite results store to add to (created if missing)")
    p.set_defaults(fn=cmd_import_reference)

    p = sub.add_parser("export", help="write a results store as one tidy table")
    p.add_argument("--store", type=Path, required=True, metavar="FILE", help="SQLite results store")
    p.add_argument("--format", default="csv", choices=["csv", "parquet"], help="csv (default) or parquet (needs pyarrow)")
    p.add_argument("--out", type=Path, required=True, metavar="PATH", help="output file ending in .csv or .parquet")
    p.add_argument("--probe", help="only this probe's rows")
    p.set_defaults(fn=cmd_export)

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
    p.set_defaults(fn=cmd_summarize)

    from .plots import PLOTS

    p = sub.add_parser("plot", help="draw one of the papers' figures",
                       description="Draw one of the papers' figures from a results store or a results file.",
                       epilog=_listing("kinds", {k: _first_sentence(f.__doc__) for k, f in PLOTS.items()}))
    p.add_argument("kind", choices=list(PLOTS), metavar="KIND", help="the figure: one of the kinds below")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="FILE", help="results store (cross-model plots)")
    src.add_argument("--results", type=Path, metavar="FILE",
                     help="a results file of measure, robustness, distances, modcrit or rank")
    p.add_argument("--out", type=Path, default=Path("figure.png"), metavar="FILE.png|.svg|.pdf",
                   help="the figure (default figure.png; folders are created)")
    p.add_argument("--column", metavar="NAME",
                   help="x axis of vs-metadata (default epsilon) or vs-accuracy (default accuracy): a numeric metadata column")
    p.add_argument("--baseline", metavar="MODEL", help="baseline model (heatmap order, difference plot)")
    p.add_argument("--probe", default="rerandomize", help="probe of a store plot")
    p.set_defaults(fn=cmd_plot)

    p = sub.add_parser("report", help="a self-contained HTML report of results, a store or a training run")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", type=Path, metavar="FILE", help="results store (cross-model report)")
    src.add_argument("--results", type=Path, metavar="FILE", help="results file of `layercrit measure`")
    src.add_argument("--checkpoints", type=Path, metavar="DIR", help="training run (robustness, distances, module criticality)")
    src.add_argument("--proxies", type=Path, metavar="FILE", help="file of `layercrit proxies --out` (proxies vs criticality)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for index.html (created with its parents)")
    p.add_argument("--baseline", metavar="MODEL", help="baseline model of a store report")
    p.add_argument("--title", help="the report's title (default: layercrit report)")
    p.add_argument("--auxiliary", type=float, default=10.0, help="%% below which a layer is called auxiliary (default 10)")
    p.add_argument("--critical", type=float, default=50.0, help="%% from which a layer is called critical (default 50)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_report)

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
    p.set_defaults(fn=cmd_proxies)

    p = sub.add_parser("compare-proxies", help="rank correlation and pruning overlap of block proxies with real criticality")
    p.add_argument("--proxies", type=Path, required=True, metavar="FILE", help="a file written by `layercrit proxies --out`")
    p.add_argument("--criticality", type=Path, metavar="FILE",
                   help="results of `layercrit measure --granularity block` (default: the criticality the proxies file holds)")
    p.add_argument("--probe", action="append", metavar="PROBE", help="compare with this probe only (repeatable)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples over samples (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", type=_out_path, metavar="FILE.csv|FILE.json", help="correlations (and FILE.pruning.csv)")
    p.set_defaults(fn=cmd_compare_proxies)

    p = sub.add_parser("demo", help="train an FCN-3x256 on digits and measure its layers")
    p.add_argument("--out", type=_out_path, default=Path("demo-out"), metavar="DIR", help="output folder (default demo-out)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    p.add_argument("--trials", type=int, default=3, help="re-randomization trials (default 3)")
    p.add_argument("--seed", type=int, default=0, help="training and probe seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)
    _finish_help(sub)
    return parser


# What an interrupted command keeps, said on its one `interrupted` line.
_INTERRUPTED = {
    "sweep": lambda a: f"; the finished work items are in {str(a.store)!r}: run the same command again to do the rest",
    "train": lambda a: f"; the saved checkpoints are in {str(a.out)!r}: add --resume to continue",
}


def _sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a command exactly as Ctrl-C does: cleanup runs, one line, exit 130


def _warn(message, category, filename, lineno, file=None, line=None) -> None:
    from tqdm.auto import tqdm

    tqdm.write(f"layercrit: warning: {message}", file=sys.stderr)  # above any progress bar, not inside it


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 internal error or failed models, 2 bad input, 130 interrupted)."""
    parser = build_parser()
    args = None
    main_thread = _is_main_thread()  # signal handlers can only be set there (tests may call main in a thread)
    previous = signal.signal(signal.SIGTERM, _sigterm) if main_thread else None
    try:
        args = parser.parse_args(argv)
        # Log records of libraries (Ray, transformers, …) and warnings print above progress bars.
        with warnings.catch_warnings(), logging_above_bars():
            warnings.simplefilter("default")
            warnings.showwarning = _warn
            return args.fn(args)
    except LayercritError as e:
        print(f"layercrit: error: {e.message}", file=sys.stderr)
        for problem in e.problems:
            print(f"layercrit: error:   - {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = _INTERRUPTED.get(getattr(args, "command", None))
        print(f"layercrit: interrupted{hint(args) if hint else ''}", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line unless debugging
        if os.environ.get("LAYERCRIT_DEBUG"):
            raise
        print(f"layercrit: internal error: {type(e).__name__}: {e} (set LAYERCRIT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
