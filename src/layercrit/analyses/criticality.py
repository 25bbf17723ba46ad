"""Layer criticality (Gavrikov et al. 2024): the library's main verb, `measure`, its configuration,
the shifted-data variant `measure_shifted`, and the text table the CLI prints (`format_summary`)."""

from __future__ import annotations

import functools
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import pandas as pd
import torch
import torch.nn as nn

from .._utils.display import bar, format_percent
from ..data import Dataset, as_dataset
from ..data.corruptions import Corruption, parse_shifts, pixel_normalization, shift_dataset
from ..engine.engine import Engine, Perturbation, RunSettings
from ..engine.outputs import create_output
from ..engine.probes import Probe, build_probes
from ..errors import LayercritError, check_int
from ..results import (
    ADAPTIVE_COLUMNS,
    CLEAN,
    INFO_COLUMNS,
    ROW_COLUMNS,
    UNMODIFIED,
    VALUE_COLUMNS,
    CriticalityResult,
    result_row,
)
from ..seeding import derive_seed
from ..units.layers import select_units


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
        lines.append(f"{r['label'].ljust(width)}  {probe:<12} {crit:<{cw}} {bar(r['criticality_mean'])}  {acc}  "
                     + (f"{int(r['trials']):>6}  {int(r['n']):>6}" if adaptive else f"{int(r['trials'])}") + (f"  {note}" if note else ""))
    if len(s) and s["accuracy_mean"].isna().all():
        output = str(result.config.get("output") or "")
        lines.append(f"accuracy —: {output} compares raw vectors, without labels" if output.startswith("hidden")
                     else "accuracy —: the data have no labels")
    if adaptive and "adaptive" in result.config:
        from .adaptive import format_adaptive

        lines.append(format_adaptive(result.config["adaptive"]))
    return "\n".join(lines)


if TYPE_CHECKING:
    from .adaptive import Checkpoint


@dataclass
class MeasureConfig(RunSettings):
    """Settings of one criticality measurement (saved next to its results); how it runs: `RunSettings`."""

    probes: list[str] = field(default_factory=lambda: ["rerandomize"])  # registered probe names
    trials: int = 3  # random draws per (layer, probe); deterministic probes run once
    seed: int = 0  # probe seed: trial t uses derive_seed(seed, t)
    images: int | None = None  # evaluation subset size (Gavrikov: 10,000); None = all samples
    strict_images: bool = False  # images above the data's size: error (True) or all samples with a warning
    data_seed: int = 0  # seed of the evaluation subset, separate from the probe seed
    layers: list[str] | None = None  # name/label globs; None = every layer
    types: list[str] | None = None  # module class names; None = every type
    include_norm: bool | str = False  # also reset normalization layers (off: Gavrikov §2); "stats": their running statistics too
    granularity: str = "layer"  # "layer", "block", "attn" or "mlp" (see `select_units`)
    groups: dict[str, list[str]] | None = None  # joint groups {name: [glob, ...]}, reset together
    label_style: str = "auto"  # "auto", "name", "gavrikov" or "zhang"
    units: list[str] | None = None  # exact unit names, after the selection (a sweep's layer chunk)
    trial_ids: list[int] | None = None  # run only these trials of random probes (default: 0..trials-1)
    output: str | None = None  # output adapter (layercrit.outputs): logits, next-token[:last|:every:K], hidden[:mean|:cls|:last]; None: automatic
    shifts: list[str] | None = None  # corruptions NAME:SEVERITY (layercrit.shifts), each measured next to the clean data
    precision: float | None = None  # adaptive sampling (layercrit.adaptive): stop a unit once its 95 % half-width ≤ this
    max_trials: int | None = None  # adaptive: most trials of a random probe (None: adaptive.MAX_TRIALS); `images` caps images
    rank_only: bool = False  # adaptive: stop once every unit's interval is clear of its ranking neighbours'

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.probes, str):
            self.probes = [self.probes]
        if self.output is not None:  # a bad name fails before any compute
            create_output(self.output)
        if self.shifts is not None:  # checked here: a bad name or severity fails before any compute
            from ..data.corruptions import parse_shifts

            self.shifts = [c.label for c in parse_shifts(self.shifts)]
        check_int("trials", self.trials)
        for name in ("seed", "data_seed"):
            check_int(name, getattr(self, name), low=0)
        if self.images is not None:
            check_int("images", self.images)
        self._check_adaptive()
        if not self.probes:
            raise LayercritError("Expected at least one probe")

    def _check_adaptive(self) -> None:
        p = self.precision
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0):
            raise LayercritError(f"Expected `precision` to be a positive half-width, a fraction (0.01 = one point), got {p!r}")
        adaptive = p is not None or self.rank_only
        if self.max_trials is not None:
            check_int("max_trials", self.max_trials)
            if not adaptive:
                raise LayercritError("`max_trials` caps adaptive sampling; give `precision` or `rank_only` too")
        if adaptive and self.trial_ids is not None:
            raise LayercritError("adaptive sampling (`precision`, `rank_only`) chooses the trials itself; drop `trial_ids`")

    @property
    def adaptive(self) -> bool:
        """Adaptive sampling (`layercrit.adaptive`): `precision` or `rank_only` given."""
        return self.precision is not None or self.rank_only


def measure(
    model: nn.Module,
    data: Dataset | str | torch.Tensor | Mapping | tuple,
    *,
    factory: Callable[[], nn.Module] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    reference_name: str = "reference",
    model_name: str = "model",
    progress: bool = False,
    probes: Sequence[str | Probe] | str | Probe = "rerandomize",
    checkpoint: Checkpoint | None = None,
    **settings,
) -> CriticalityResult:
    """Layer criticality of `model`: probe each layer (or block, or group), compare outputs.

    Args:
        model: a trained model: a classifier returning logits, a language model, an encoder
            (`output` says what of its output is compared; see `layercrit.outputs`).
        data: evaluation data (a `Dataset`, a data spec, a tensor, a dict of tensors passed as
            keyword arguments such as `{"input_ids": …, "attention_mask": …}`, or (inputs, labels)).
        factory: the untrained constructor, the faithful init source for "rerandomize".
        reference: state dict for "reinit" (e.g. checkpoint 0).
        reference_name: how the reference is named in result rows (`target` column).
        model_name: value of the `model` column.
        progress: show progress bars.
        probes: probe names or `Probe` objects.
        checkpoint: under adaptive sampling, where each round's statistics are kept so an
            interrupted measurement continues (a sweep's results store; `adaptive.Checkpoint`).
        **settings: fields of `MeasureConfig` (trials, seed, images, data_seed, layers, ...).

    Returns:
        A `CriticalityResult`; `.table` has one row per (layer, probe, trial) and one for the
        unmodified model, `.summary()` aggregates over trials.
    """
    if settings.get("shifts") or settings.get("shift"):  # once per shift, on shifted data (layercrit.shifts)
        args = dict(locals())  # every argument of this call, passed on unchanged
        pass  # (import removed)

        return measure_shifted(**{k: v for k, v in args.items() if k != "settings"}, **args["settings"])
    names = [probes] if isinstance(probes, (str, Probe)) else list(probes)
    config = MeasureConfig(probes=[p if isinstance(p, str) else p.name for p in names], **settings)
    dataset = as_dataset(data).subset(config.images, config.data_seed, strict=config.strict_images)
    if config.adaptive:  # images are taken in rounds, each a prefix of one seeded random order
        from .adaptive import evaluation_order

        dataset = evaluation_order(dataset, config.data_seed)
    units = select_units(
        model,
        layers=config.layers,
        types=config.types,
        include_norm=config.include_norm,
        granularity=config.granularity,
        groups=config.groups,
        label_style=config.label_style,
    )
    if config.units is not None:
        wanted = set(config.units)
        units = [u for u in units if u.name in wanted]
        if len(units) != len(wanted):
            raise LayercritError(f"unknown units {sorted(wanted - {u.name for u in units})}")
    probe_objs = build_probes(names, factory, reference, reference_name)
    for probe in probe_objs:
        probe.check(model, units)
    engine = Engine.from_config(model, dataset.x, dataset.y, config, progress)
    perturbations, meta = [], {}
    for probe in probe_objs:
        target = probe.describe().get("target", "")
        for unit in units:
            for trial in (config.trial_ids or range(config.trials)) if probe.random else [0]:
                seed = derive_seed(config.seed, trial)
                key = (probe.name, target, unit.name, trial)
                if key in meta:
                    raise LayercritError(f"probe {probe.name!r} {target} given twice; give each probe once")
                perturbations.append(Perturbation(key, functools.partial(probe.values, model, unit, seed)))
                meta[key] = (probe, unit, trial, seed)
    extra, bases, adaptive_stats = {}, {}, None
    if config.adaptive:  # rounds until each unit is precise enough (layercrit.adaptive)
        from .adaptive import evaluate as evaluate_adaptive

        run = evaluate_adaptive(engine, model, units, probe_objs, config, checkpoint, desc=model_name)
        base, bases, results, meta, extra, adaptive_stats = run.base, run.bases, run.results, run.meta, run.extra, run.stats
    else:
        base, results = engine.evaluate(perturbations, desc=f"{model_name}: {len(perturbations)} probes")
    output = engine.output.name
    n_base = adaptive_stats["images_used"] if adaptive_stats else len(dataset)
    rows = [result_row(model_name, UNMODIFIED, "unmodified", "none", "", 0, math.nan, n_base, 0, base, base, output)]
    for key, values in results.items():
        probe, unit, trial, seed = meta[key]
        target = probe.describe().get("target", "")
        n = extra[key]["n"] if key in extra else len(dataset)
        rows.append(result_row(model_name, unit.name, unit.label, probe.name, target, trial, seed, n, unit.n_params,
                         values, bases.get(n, base), output) | {k: v for k, v in extra.get(key, {}).items() if k != "n"})
    columns = ROW_COLUMNS + VALUE_COLUMNS + INFO_COLUMNS + (ADAPTIVE_COLUMNS if config.adaptive else [])
    table = pd.DataFrame(rows, columns=columns)
    if config.adaptive:
        table["trials_used"] = table["trials_used"].astype("Int64")
    table["seed"] = table["seed"].astype("Int64")
    resolved = asdict(config) | {
        "model": model_name,
        "data": dataset.spec,
        "data_identity": dataset.identity,
        "n": len(dataset),
        "probe_details": [p.describe() for p in probe_objs],
        "units": [u.name for u in units],
        "versions": _versions(),
        **engine.stats(),
    }
    if adaptive_stats is not None:
        from .adaptive import adaptive_config

        resolved["adaptive"] = adaptive_config(config, adaptive_stats)
    return CriticalityResult(table, resolved)


def _versions() -> dict[str, str]:
    from .._version import __version__

    return {"layercrit": __version__, "torch": torch.__version__, "python": platform.python_version()}


def measure_shifted(model, data, shifts: str | Sequence[str | Corruption] | None = None, *,
                    shift: str | Sequence[str | Corruption] | None = None, **kwargs):
    """`layercrit.measure` on the clean data and on each shifted copy of it; one table.

    The evaluation subset is drawn once; each shift corrupts it (seeded by `data_seed`) and the whole
    measurement runs on it, so every output compared — unmodified and probed model alike — is the
    model's output on the same shifted input. Rows carry a `shift` column ("none" for the clean data).
    Called by `measure(..., shifts=[...])` (or `shift=`); `kwargs` are `measure`'s.
    """
    from ..data import as_dataset
    from ..results import CriticalityResult

    if shifts is not None and shift is not None:
        raise LayercritError("give the shifts once, as shifts= or shift=, not both")
    parsed = parse_shifts(shifts if shifts is not None else shift)
    strict = {"strict": kwargs["strict_images"]} if "strict_images" in kwargs else {}
    dataset = as_dataset(data).subset(kwargs.get("images"), kwargs.get("data_seed", 0), **strict)
    seed = int(kwargs.get("data_seed", 0))
    if parsed:
        norm = pixel_normalization(dataset)  # refused before any compute
        shifted = [(s, shift_dataset(dataset, s, seed, norm)) for s in parsed]
    else:
        shifted = []
    runs = [(CLEAN, measure(model, dataset, **kwargs))]
    runs += [(s.label, measure(model, d, **kwargs)) for s, d in shifted]
    tables = []
    for label, r in runs:
        t = r.table.copy()
        t.insert(t.columns.get_loc("model") + 1, "shift", label)
        tables.append(t)
    config = dict(runs[0][1].config)
    config["shifts"] = [s.label for s in parsed]
    config["shift_seed"] = seed
    config["shift_details"] = [
        d.meta["shift_details"] | {"data_identity": r.config.get("data_identity")}
        for (_, d), (_, r) in zip(shifted, runs[1:])
    ]
    return CriticalityResult(pd.concat(tables, ignore_index=True), config)
