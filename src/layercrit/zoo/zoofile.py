"""Zoo files (TOML): a set of models to measure, described once.

    [defaults]                 # shared settings; any of them can be overridden per model
    data = "test.npz"          # data spec; paths are relative to the zoo file
    probe = "rerandomize"      # or probes = ["rerandomize", "zero"]
    trials = 3
    seed = 0
    precision = 0.01           # adaptive sampling to ±1 point (optional; also max_trials, rank_only)
    shifts = ["contrast:5"]    # also measure on corrupted data (optional, layercrit.shifts)

    [[model]]
    id = "fcn-a"               # unique
    factory = "userfcn.py:make"
    weights = "a.pt"
    category = "baseline"
    accuracy = 95.1            # well-known metadata keys may stand here...
    [model.meta]               # ...any other metadata goes here
    lr = 0.1

The whole file is validated before any compute: every problem (unknown keys, missing files,
duplicate ids, wrong types) is reported on a line of its own.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.executors.base import EXECUTORS
from ..engine.probes import list_probes
from ..errors import LayercritError

__all__ = ["SETTINGS", "Zoo", "ZooEntry", "load_zoo"]

# Settings: name -> (check, description). Valid under [defaults] and in each [[model]].
SETTINGS: dict[str, tuple[Any, str]] = {
    "data": (str, "a data spec"),
    "probe": (str, "a probe name"),
    "probes": (list, "a list of probe names"),
    "trials": (int, "a positive integer"),
    "seed": (int, "a non-negative integer"),
    "images": (int, "a positive integer"),
    "data_seed": (int, "a non-negative integer"),
    "layers": (list, "a list of layer globs"),
    "include_norm": (bool, "true or false"),
    "granularity": (str, "'layer' or 'block'"),
    "label_style": (str, "'auto', 'name', 'gavrikov', 'figure' or 'zhang'"),
    "batch_size": (int, "a positive integer"),
    "executor": (str, "'auto', 'incremental' or 'full'"),
    "autocast": (str, "'bf16' or 'fp16'"),
    "compile": ((bool, str), "true, false or a torch.compile backend name"),
    "reference": (str, "a state-dict file for the reinit probe"),
    "model_args": (dict, "a table of constructor arguments"),
    "precision": ((int, float), "a positive half-width, a fraction (0.01 = one point)"),
    "max_trials": (int, "a positive integer"),
    "rank_only": (bool, "true or false"),
    "shifts": (list, "a list of corruptions NAME[:SEVERITY] (layercrit.shifts)"),
}
ENTRY_KEYS = {"id", "factory", "weights", "category", "meta"}
METADATA_KEYS = {"accuracy", "top5", "epsilon", "norm", "epochs", "arch", "dataset", "paper", "notes", "url", "source"}
_DATA_FORMATS = ("cifar10", "mnist", "imagefolder")


@dataclass
class ZooEntry:
    """One model of a zoo, with its settings resolved (defaults, then its own overrides).

    Attributes:
        id: unique model id.
        factory: model spec (`file.py:callable` paths made absolute).
        weights: absolute path of the weights file, or None (the untrained model).
        category: training category (e.g. "adversarial training").
        metadata: free metadata (accuracy, ε, norm, …).
        settings: resolved settings (see `SETTINGS`), paths absolute, `probes` a list.
    """

    id: str
    factory: str
    weights: str | None
    category: str
    metadata: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Zoo:
    path: Path
    defaults: dict[str, Any]
    entries: list[ZooEntry]

    def to_dict(self) -> dict:
        """The resolved zoo, for the results store's run record."""
        return {"path": str(self.path), "defaults": self.defaults,
                "models": [e.__dict__ for e in self.entries]}


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _resolve_data(base: Path, spec: str, where: str, problems: list[str]) -> str:
    """Make the path inside a data spec absolute and check it exists."""
    name, sep, rest = spec.partition(":")
    if name == "digits":
        return spec
    if name in _DATA_FORMATS and sep:
        folder, colon, split = rest.rpartition(":")
        if not colon or split not in ("train", "test"):
            folder, split = rest, ""
        path = _resolve(base, folder)
        resolved = f"{name}:{path}" + (f":{split}" if split else "")
    else:
        path = _resolve(base, spec)
        resolved = str(path)
    if not path.exists():
        problems.append(f"{where}: data {spec!r} not found (looked for {str(path)!r})")
    return resolved


def _check_setting(key: str, value: Any, where: str, problems: list[str]) -> None:
    kind, desc = SETTINGS[key]
    ok = isinstance(value, kind) and not (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)))
    if ok and kind is int:
        ok = value >= (0 if key in ("seed", "data_seed") else 1)
    if ok and key == "probe":
        ok = value in list_probes()
    if ok and key == "probes":
        ok = bool(value) and all(isinstance(p, str) and p in list_probes() for p in value)
    if ok and key == "granularity":
        ok = value in ("layer", "block")
    if ok and key == "executor":
        ok = value in EXECUTORS
    if ok and key == "autocast":
        ok = value in ("bf16", "fp16")
    if ok and key == "label_style":
        ok = value in ("auto", "name", "gavrikov", "figure", "zhang")
    if ok and key == "layers":
        ok = all(isinstance(g, str) for g in value)
    if ok and key == "precision":
        ok = math.isfinite(value) and value > 0
    if ok and key == "shifts":
        from ..data.corruptions import parse_shifts

        try:
            parse_shifts(value)
        except LayercritError as e:
            problems.append(f"{where}: `shifts`: {e.message}")
            return
    if not ok:
        extra = f" ({', '.join(list_probes())})" if key in ("probe", "probes") else ""
        problems.append(f"{where}: `{key}` should be {desc}{extra}, got {value!r}")


def load_zoo(path: str | Path) -> Zoo:
    """Read and validate a zoo file.

    Raises:
        LayercritError: listing every problem found, one per line.
    """
    path = Path(path)
    if not path.is_file():
        raise LayercritError(f"zoo file {str(path)!r} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise LayercritError(f"zoo file {str(path)!r} is not valid TOML: {e}") from None
    base = path.resolve().parent
    problems: list[str] = []
    for key in doc:
        if key not in ("defaults", "model"):
            problems.append(f"unknown top-level key {key!r}; expected [defaults] and [[model]] entries")
    defaults = doc.get("defaults", {})
    if not isinstance(defaults, dict):
        problems.append("[defaults] should be a table")
        defaults = {}
    for key, value in defaults.items():
        if key not in SETTINGS:
            problems.append(f"[defaults]: unknown key {key!r}; expected one of {', '.join(sorted(SETTINGS))}")
        else:
            _check_setting(key, value, "[defaults]", problems)
    models = doc.get("model", [])
    if not isinstance(models, list) or not models:
        problems.append("no [[model]] entries")
        models = []
    entries, seen = [], set()
    for i, raw in enumerate(models):
        mid = raw.get("id") if isinstance(raw, dict) else None
        where = f"model {mid!r}" if isinstance(mid, str) and mid else f"[[model]] #{i + 1}"
        if not isinstance(raw, dict):
            problems.append(f"{where}: should be a table")
            continue
        if not isinstance(mid, str) or not mid:
            problems.append(f"{where}: needs an `id` (a non-empty string)")
        elif mid in seen:
            problems.append(f"{where}: duplicate id; every model needs its own")
        seen.add(mid)
        for key in raw:
            if key not in ENTRY_KEYS | set(SETTINGS) | METADATA_KEYS:
                problems.append(
                    f"{where}: unknown key {key!r}; settings are {', '.join(sorted(SETTINGS))}; "
                    f"put free metadata under [model.meta]"
                )
            elif key in SETTINGS:
                _check_setting(key, raw[key], where, problems)
        factory = raw.get("factory")
        if not isinstance(factory, str) or not factory:
            problems.append(f"{where}: needs a `factory` (a built-in model name, 'module:callable' or 'file.py:callable')")
            factory = ""
        else:
            target, colon, attr = factory.rpartition(":")
            if colon and (target.endswith(".py") or "/" in target):
                fpath = _resolve(base, target)
                if not fpath.is_file():
                    problems.append(f"{where}: factory file {target!r} not found (looked for {str(fpath)!r})")
                factory = f"{fpath}:{attr}"
        weights = raw.get("weights")
        if weights is not None:
            if not isinstance(weights, str):
                problems.append(f"{where}: `weights` should be a file path, got {weights!r}")
                weights = None
            else:
                wpath = _resolve(base, weights)
                if not wpath.is_file():
                    problems.append(f"{where}: weights {weights!r} not found (looked for {str(wpath)!r})")
                weights = str(wpath)
        category = raw.get("category", "uncategorized")
        if not isinstance(category, str):
            problems.append(f"{where}: `category` should be a string, got {category!r}")
        meta = raw.get("meta", {})
        if not isinstance(meta, dict):
            problems.append(f"{where}: [model.meta] should be a table")
            meta = {}
        settings = {k: v for k, v in defaults.items() if k in SETTINGS} | {k: v for k, v in raw.items() if k in SETTINGS}
        if "probe" in settings and "probes" in settings:
            problems.append(f"{where}: give either `probe` or `probes`, not both (after defaults and overrides)")
        probes = settings.pop("probes", None) or [settings.pop("probe", "rerandomize")]
        settings.pop("probe", None)
        settings["probes"] = probes if isinstance(probes, list) else [probes]
        if "data" not in settings:
            problems.append(f"{where}: no `data` (set it under [defaults] or in the entry)")
        elif isinstance(settings["data"], str):
            settings["data"] = _resolve_data(base, settings["data"], where, problems)
        if isinstance(settings.get("reference"), str):
            ref = _resolve(base, settings["reference"])
            if not ref.is_file():
                problems.append(f"{where}: reference {settings['reference']!r} not found (looked for {str(ref)!r})")
            settings["reference"] = str(ref)
        if settings.get("max_trials") is not None and settings.get("precision") is None and not settings.get("rank_only"):
            problems.append(f"{where}: `max_trials` caps adaptive sampling; set `precision` or `rank_only` too")
        if isinstance(settings.get("shifts"), list):  # bare names: all five severities, as `--shift`
            from ..data.corruptions import parse_shifts

            try:
                settings["shifts"] = [c.label for c in parse_shifts(settings["shifts"])]
            except LayercritError:
                pass  # reported above
        if "reinit" in settings["probes"] and not settings.get("reference"):
            problems.append(f"{where}: probe 'reinit' needs a `reference` state dict (e.g. checkpoint 0)")
        metadata = {k: v for k, v in raw.items() if k in METADATA_KEYS} | meta
        entries.append(ZooEntry(mid if isinstance(mid, str) else "", factory, weights,
                                category if isinstance(category, str) else "", metadata, settings))
    if problems:
        raise LayercritError(f"zoo file {str(path)!r} has {len(problems)} problem(s):", problems)
    return Zoo(path.resolve(), defaults, entries)
