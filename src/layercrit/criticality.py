"""Layer criticality (Gavrikov et al. 2024): the library's main verb, `measure`."""

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

from .data import Dataset, load_data
from .engine import Engine, Perturbation, RunSettings
from .errors import LayercritError, check_int
from .inputs import as_inputs
from .layers import select_units
from .outputs import create_output
from .probes import PROBES, Interpolate, Probe, Reinit, Rerandomize
from .results import ADAPTIVE_COLUMNS, INFO_COLUMNS, ROW_COLUMNS, UNMODIFIED, VALUE_COLUMNS, CriticalityResult
from .seeding import derive_seed

if TYPE_CHECKING:
    from .adaptive import Checkpoint

__all__ = ["MeasureConfig", "build_probes", "measure"]


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
            from .shifts import parse_shifts

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


def build_probes(
    names: Sequence[str | Probe],
    factory: Callable[[], nn.Module] | None = None,
    reference: Mapping[str, torch.Tensor] | None = None,
    reference_name: str = "reference",
) -> list[Probe]:
    """Probe objects for names, wiring the init source (`factory`) and `reference` state dict."""
    probes = []
    for p in names:
        if isinstance(p, Probe):
            probes.append(p)
        elif p == "rerandomize":
            probes.append(Rerandomize(factory))
        elif p == "reinit":
            if reference is None:
                raise LayercritError("probe 'reinit' needs a reference state dict (--reference FILE), e.g. checkpoint 0")
            probes.append(Reinit(reference, reference_name))
        elif p == "interpolate":
            if reference is None:
                raise LayercritError("probe 'interpolate' needs the initial state dict θ⁰ (--reference FILE), e.g. checkpoint 0")
            probes.append(Interpolate(reference))
        else:
            probes.append(PROBES.create(p))
    return probes


def _api_inputs(x: torch.Tensor | Mapping[str, torch.Tensor]):
    """Inputs given to the API: floating tensors as float32 (as the data loaders give them), integer
    tensors (token ids, masks) unchanged."""
    x = as_inputs(x)

    def one(t: torch.Tensor) -> torch.Tensor:
        return t.float() if t.is_floating_point() else t

    return {k: one(v) for k, v in x.items()} if isinstance(x, dict) else one(x)


def _as_dataset(data: Dataset | str | torch.Tensor | Mapping | tuple) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str):
        return load_data(data)
    if isinstance(data, (torch.Tensor, Mapping)):
        return Dataset(_api_inputs(data), None, spec="tensor")
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], (torch.Tensor, Mapping)):
        return Dataset(_api_inputs(data[0]), None if data[1] is None else data[1].long(), spec="tensor")
    raise LayercritError(
        f"Expected data as a Dataset, a data spec, a tensor, a dict of tensors or (inputs, labels), got {type(data).__name__}"
    )


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
        from .shifts import measure_shifted

        return measure_shifted(**{k: v for k, v in args.items() if k != "settings"}, **args["settings"])
    names = [probes] if isinstance(probes, (str, Probe)) else list(probes)
    config = MeasureConfig(probes=[p if isinstance(p, str) else p.name for p in names], **settings)
    dataset = _as_dataset(data).subset(config.images, config.data_seed, strict=config.strict_images)
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
    rows = [_row(model_name, UNMODIFIED, "unmodified", "none", "", 0, math.nan, n_base, 0, base, base, output)]
    for key, values in results.items():
        probe, unit, trial, seed = meta[key]
        target = probe.describe().get("target", "")
        n = extra[key]["n"] if key in extra else len(dataset)
        rows.append(_row(model_name, unit.name, unit.label, probe.name, target, trial, seed, n, unit.n_params,
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


def _row(model, layer, label, probe, target, trial, seed, n, n_params, values, base, output: str = "") -> dict:
    row = {"model": model, "layer": layer, "label": label, "probe": probe, "target": target, "trial": trial,
           "seed": seed, "n": n, "n_params": n_params}
    row |= {k: values[k] for k in VALUE_COLUMNS if k in values}
    row["accuracy_drop"] = base["accuracy"] - values["accuracy"]
    # Perplexity of the mean next-token loss (exp of the mean, not the mean of exps); a trial mean
    # in `summary()` is then the mean of the trials' perplexities.
    loss = values["loss"]
    row["perplexity"] = (math.exp(loss) if loss <= 709.0 else math.inf) \
        if output.startswith("next-token") and not math.isnan(loss) else math.nan
    bad = values.get("n_nonfinite", 0)
    row["output"] = output
    row["n_nonfinite"] = bad
    row["note"] = (f"output non-finite on {bad} of {values.get('n_rows')} compared rows; measures are means over the others"
                   if bad else "")
    return row


def _versions() -> dict[str, str]:
    from . import __version__

    return {"layercrit": __version__, "torch": torch.__version__, "python": platform.python_version()}
