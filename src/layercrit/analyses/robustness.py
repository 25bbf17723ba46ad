"""Re-initialization robustness (Zhang, Bengio & Singer 2022) over a training run's checkpoints.

For every layer (or block, or joint group) and every saved checkpoint τ, the layer of the final
model is reset to its value at τ (target `Eτ`), or re-randomized from the architecture's own init
(target `rerandomize`); the test error and criticality of each such model form the paper's
layers × [Re-Rnd, E0, E1, …, ET] table. Weight distances of each layer to checkpoint 0 give its
Fig. 1b-c.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._utils.display import format_number
from ..data import Dataset, load_data
from ..engine.engine import Engine, Perturbation
from ..engine.probes import Reinit, Rerandomize
from ..errors import LayercritError
from ..results import ROW_COLUMNS, VALUE_COLUMNS, CriticalityResult, result_row
from ..training.checkpoints import Run
from ..units.labels import resnet_root
from ..units.layers import select_units
from .criticality import MeasureConfig, measure

__all__ = ["GROUPINGS", "builtin_groups", "robustness", "spectral_norm", "weight_distances"]

GROUPINGS = ("all-but-first-block-per-stage", "every-second-block")
_BLOCK = re.compile(r"^layer(\d+)\.(\d+)$")
CHECKPOINT = "(checkpoint)"


def builtin_groups(model: nn.Module, name: str) -> dict[str, list[str]]:
    """Zhang §4's joint groups for a torchvision-layout ResNet, as `{name: [glob, ...]}`.

    `all-but-first-block-per-stage`: every residual block except the first of each stage.
    `every-second-block`: the 2nd, 4th, … block of each stage (Zhang Fig. 6b).
    """
    if name not in GROUPINGS:
        raise LayercritError(f"unknown grouping {name!r}; expected one of {', '.join(GROUPINGS)} or NAME=GLOB,GLOB")
    root = resnet_root(model)
    if root is None:
        raise LayercritError(f"grouping {name!r} needs a ResNet with torchvision's module names (layerS.B)")
    prefix, net = root
    blocks = [tuple(map(int, m.groups())) for n, _ in net.named_modules() if (m := _BLOCK.match(n))]
    keep = (lambda b: b >= 1) if name == GROUPINGS[0] else (lambda b: b % 2 == 1)
    globs = [f"{prefix}layer{s}.{b}.*" for s, b in blocks if keep(b)]
    if not globs:
        raise LayercritError(f"grouping {name!r} selects no block: every stage has a single block")
    return {name: globs}


def parse_groups(model: nn.Module, specs: Sequence[str]) -> dict[str, list[str]]:
    """`NAME=GLOB,GLOB` or a built-in grouping name, each one joint group."""
    groups: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, globs = spec.partition("=")
        if sep:
            if not name or not globs:
                raise LayercritError(f"group {spec!r} should read NAME=GLOB[,GLOB…]")
            groups[name] = [g for g in globs.split(",") if g]
        else:
            groups |= builtin_groups(model, spec)
    return groups


class _CheckpointState(Mapping):
    """The state dict of one checkpoint, loaded on first use (the run keeps two in memory)."""

    def __init__(self, run: Run, epoch: int) -> None:
        self.run, self.epoch = run, epoch

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.run.state_dict(self.epoch)[key]

    def __iter__(self):
        return iter(self.run.state_dict(self.epoch))

    def __len__(self) -> int:
        return len(self.run.state_dict(self.epoch))


def _open(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else Run(run)


def robustness(
    run: Run | str | Path,
    data: Dataset | str | None = None,
    *,
    epochs: Sequence[int] | None = None,
    rerandomize: bool = True,
    groups: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    images: int | None = None,
    data_seed: int = 0,
    progress: bool = False,
    **settings,
) -> CriticalityResult:
    """The re-initialization robustness table of a training run.

    Args:
        run: a checkpoint folder written by `layercrit train` (or an opened `Run`).
        data: evaluation data (default: the run's held-out data).
        epochs: checkpoints to reset to (default: all saved).
        rerandomize: include the re-randomization column (the architecture's own init).
        groups: joint groups: built-in grouping names and/or `NAME=GLOB,…` strings, or a mapping.
        images, data_seed: a seeded evaluation subset.
        progress: show progress bars.
        **settings: further `MeasureConfig` fields (trials, seed, granularity, layers, include_norm, ...).

    Returns:
        A `CriticalityResult` whose table has one row per (layer, target, trial) with `target` in
        `rerandomize`, `E0`, `E1`, …, an `error` column (1 − accuracy), a row per checkpoint with the
        whole model at that checkpoint (layer `(checkpoint)`, buffers included), and the
        unmodified final model.
    """
    run = _open(run)
    spec = data if data is not None else run.test_data
    if spec is None:
        raise LayercritError(f"the run in {str(run.path)!r} has no held-out data of its own; pass the test data (--data)")
    dataset = (spec if isinstance(spec, Dataset) else load_data(spec)).subset(
        images, data_seed, strict=settings.get("strict_images", False))
    if dataset.y is None:
        raise LayercritError(f"robustness needs labelled data; {dataset.spec!r} has no labels")
    epochs = run.epochs if epochs is None else list(epochs)
    for e in epochs:
        run.checkpoint(e)  # fail early on missing, corrupt or foreign checkpoints
    model = run.model()
    if groups is not None and not isinstance(groups, Mapping):
        groups = parse_groups(model, groups)
    probes = ([Rerandomize(run.factory())] if rerandomize else []) + [
        Reinit(_CheckpointState(run, e), target=f"E{e}") for e in epochs
    ]
    name = run.path.name
    result = measure(model, dataset, factory=run.factory(), model_name=name, progress=progress, probes=probes,
                     groups=groups, **settings)
    # The paper's reference row: the whole model at each checkpoint, BN statistics included.
    engine = Engine.from_config(model, dataset.x, dataset.y, MeasureConfig(**settings), progress)
    whole = [Perturbation(e, (lambda e=e: run.state_dict(e))) for e in epochs]
    base, values = engine.evaluate(whole, desc=f"{name}: checkpoints")
    n_all = sum(p.numel() for p in model.parameters())
    rows = [result_row(name, CHECKPOINT, "whole model", "checkpoint", f"E{e}", 0, math.nan, len(dataset), n_all, values[e], base) for e in epochs]
    table = pd.concat([result.table, pd.DataFrame(rows, columns=ROW_COLUMNS + VALUE_COLUMNS)], ignore_index=True)
    table["seed"] = table["seed"].astype("Int64")
    table["error"] = 1.0 - table["accuracy"]
    result.table = table
    result.config |= {"run": str(run.path), "epochs": epochs, "final_epoch": run.final_epoch}
    return result


def spectral_norm(t: torch.Tensor) -> float:
    """Largest singular value of `t` reshaped to (out, rest); a vector acts as a diagonal operator (max |t|)."""
    t = t.detach().double()
    return float(t.abs().max()) if t.ndim < 2 else float(torch.linalg.matrix_norm(t.reshape(t.shape[0], -1), ord=2))


def weight_distances(
    run: Run | str | Path,
    *,
    epochs: Sequence[int] | None = None,
    granularity: str = "layer",
    layers: Sequence[str] | None = None,
    include_norm: bool = False,
    label_style: str = "auto",
    progress: bool = False,
) -> pd.DataFrame:
    """Distance of each layer's parameters at every checkpoint τ to checkpoint 0 (`progress`: a bar
    over the checkpoints × layers, spectral norms of large layers take a while).

    Columns `layer, label, epoch, l2, linf, spectral, n_params`: with Δ = θτ − θ⁰ over all of the
    unit's parameters, `l2` = ‖Δ‖₂/√dim and `linf` = ‖Δ‖∞ (Zhang Fig. 1b-c); `spectral` is the
    largest singular value of each parameter's Δ reshaped to (out, rest) — for a convolution the
    (out_channels, in_channels·kh·kw) weight matrix, not the convolution operator — the maximum
    over the unit's parameters (biases and other vectors count as diagonal operators: max |Δ|).
    """
    run = _open(run)
    model = run.model(0)
    units = select_units(model, layers=layers, include_norm=include_norm, granularity=granularity, label_style=label_style)
    theta0 = run.state_dict(0)
    rows = []
    epochs = run.epochs if epochs is None else list(epochs)
    bar = tqdm(total=len(epochs) * len(units), desc=f"{run.path.name}: distances", unit="layer", disable=not progress,
               leave=False)
    for e in epochs:
        state = run.state_dict(e)
        for u in units:
            deltas = [(state[p] - theta0[p]).double() for p in u.params]
            flat = torch.cat([d.flatten() for d in deltas])
            rows.append({
                "model": run.path.name, "layer": u.name, "label": u.label, "epoch": e,
                "l2": float(flat.norm() / math.sqrt(flat.numel())), "linf": float(flat.abs().max()),
                "spectral": max(spectral_norm(d) for d in deltas), "n_params": u.n_params,
            })
            bar.update()
    bar.close()
    return pd.DataFrame(rows)


def format_robustness(table: pd.DataFrame, value: str, scale: float = 100.0) -> str:
    order_rows = list(dict.fromkeys(table["label"]))
    order_cols = list(dict.fromkeys(table["target"]))
    grid = table.groupby(["label", "target"], sort=False)[value].mean().unstack("target")
    return (grid.reindex(index=order_rows, columns=order_cols) * scale).to_string(
        float_format=lambda v: f"{format_number(v, 1):>6}")
