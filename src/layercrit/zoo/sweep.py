"""Sweeps over a model zoo: plan the missing work, run it locally or on Ray, store every result.

A *unit* is one (model, layer, probe, trial, shift); a *work item* is one (model, probe, trial,
shift) and a chunk of its layers, evaluated in one pass over the data. Under adaptive sampling
(`precision` or `rank_only` in the zoo, `layercrit.adaptive`) a work item is one (model, probe,
shift) and a chunk of its layers (all of them for `rank_only`, which ranks them together), run in
rounds; with the local backend each round's statistics are kept in the store (`rounds`), so an
interrupted sweep continues every unit's rounds where they stopped, with the numbers an
uninterrupted one gives (with Ray, a work item's rounds are kept when it finishes).

The driver validates every model (weights, data, labels, probes) before the store is created,
plans the items that still have units missing from the store (so a re-run does only what is
missing), runs them, and commits each item's rows as soon as it finishes: only the driver writes
the store. A commit is never cut by Ctrl-C or SIGTERM
(they are held until it ends), so an interrupted sweep keeps every finished item.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .._utils.io import logging_above_bars
from ..analyses.criticality import measure
from ..data import Dataset, load_data
from ..engine.probes import PROBES, Probe, build_probes
from ..errors import LayercritError
from ..results import UNMODIFIED
from ..training.checkpoints import build_model, load_state_dict
from ..units.layers import select_units
from .store import CLEAN, Store
from .zoofile import Zoo, ZooEntry, load_zoo

if TYPE_CHECKING:
    from ..analyses.adaptive import Checkpoint

__all__ = ["SweepReport", "WorkItem", "plan", "run_item", "sweep", "validate"]


@dataclass
class WorkItem:
    """One pass over the data: `units` of model `model` under `probe`, for `trials` (empty: adaptive
    sampling, as many rounds as the units need), on the clean data or a `shift`."""

    model: str
    probe: str
    trials: list[int]
    units: list[str]
    config_hash: str
    shift: str = CLEAN

    @property
    def size(self) -> int:
        return len(self.units) * max(len(self.trials), 1)


@dataclass
class SweepReport:
    total_units: int
    done_before: int
    added: int = 0
    items: int = 0
    failures: list[str] = field(default_factory=list)
    compute_seconds: float = 0.0
    store_seconds: float = 0.0
    elapsed: float = 0.0


@functools.lru_cache(maxsize=8)
def _digest(path: str | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4)
def _dataset(spec: str, images: int | None, data_seed: int) -> Dataset:
    """Evaluation data, loaded once per process (Ray workers reuse their process)."""
    return load_data(spec).subset(images, data_seed)


def _data_of(entry: ZooEntry) -> Dataset:
    s = entry.settings
    return _dataset(s["data"], s.get("images"), s.get("data_seed", 0))


def _adaptive(settings: dict) -> bool:
    return settings.get("precision") is not None or bool(settings.get("rank_only"))


def config_hash(entry: ZooEntry, probe: str, data: Dataset, shift: str = CLEAN) -> str:
    """What a unit's value depends on besides (layer, trial, shift): a stored unit is reused only under the same."""
    s = entry.settings
    key = {
        "factory": entry.factory, "weights": _digest(entry.weights), "model_args": s.get("model_args", {}),
        "data_identity": data.identity, "probe": probe, "seed": s.get("seed", 0),
        "reference": _digest(s.get("reference")) if probe == "reinit" else None,
        "include_norm": s.get("include_norm", False), "granularity": s.get("granularity", "layer"),
        "label_style": s.get("label_style", "auto"),
    }
    if s.get("autocast"):  # mixed precision changes the numbers (the executor does not); absent: earlier hashes hold
        key["autocast"] = s["autocast"]
    if _adaptive(s):  # the rounds depend on these: images come in whole batches, the first round has `trials`
        key["adaptive"] = {"precision": s.get("precision"), "max_trials": s.get("max_trials"),
                           "rank_only": bool(s.get("rank_only")), "trials": s.get("trials", 3),
                           "batch_size": s.get("batch_size", 256), "data_seed": s.get("data_seed", 0)}
    if shift != CLEAN:  # the corruption's noise is seeded by data_seed
        key["shift_seed"] = s.get("data_seed", 0)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _probe_is_random(name: str) -> bool:
    cls = PROBES.get(name)
    return bool(getattr(cls, "random", False)) if isinstance(cls, type) and issubclass(cls, Probe) else True


def _units_of(entry: ZooEntry, model: torch.nn.Module) -> list:
    s = entry.settings
    return select_units(model, layers=s.get("layers"), include_norm=s.get("include_norm", False),
                        granularity=s.get("granularity", "layer"), label_style=s.get("label_style", "auto"))


def _label_range_samples(data: Dataset) -> Dataset:
    """The samples with the smallest and the largest label (the first sample without labels): checking
    the model on them checks that it takes the inputs and has outputs for every label."""
    from ..data.inputs import take

    idx = sorted({int(data.y.argmin()), int(data.y.argmax())}) if data.y is not None and len(data.y) else [0]
    t = torch.tensor(idx)
    return replace(data, x=take(data.x, t), y=None if data.y is None else data.y[t], indices=None, meta=dict(data.meta))


def validate(zoo: Zoo) -> dict[str, list[str]]:
    """Check every model of `zoo` before anything is written: its weights load, it takes the data, its
    outputs cover the labels, its layer selection matches and its probes apply (run on two samples).

    Returns:
        Each model's units (layer names), in order.

    Raises:
        LayercritError: one problem per failing model.
    """
    units: dict[str, list[str]] = {}
    problems: list[str] = []
    for entry in zoo.entries:
        s = entry.settings
        try:
            data = _data_of(entry)
            model, factory = build_model(entry.factory, entry.weights, s.get("model_args"), data)
            selected = _units_of(entry, model)
            reference = load_state_dict(s["reference"]) if s.get("reference") else None
            for probe in build_probes(s["probes"], factory, reference):
                probe.check(model, selected)
            measure(model, _label_range_samples(data), factory=factory, reference=reference, model_name=entry.id,
                    probes=s["probes"], trials=1, units=[], batch_size=2, executor="full")
            if s.get("shifts"):  # the data are images with a known normalization
                from ..data.corruptions import shift_dataset

                for shift in s["shifts"]:
                    shift_dataset(_label_range_samples(data), shift, s.get("data_seed", 0))
            units[entry.id] = [u.name for u in selected]
        except LayercritError as e:
            problems.append(f"model {entry.id!r}: {e.message}")
    if len(problems) == 1:
        raise LayercritError(f"{problems[0]} (nothing was run)")
    if problems:
        raise LayercritError(f"{len(problems)} models of {str(zoo.path)!r} fail validation (nothing was run):", problems)
    return units


def plan(zoo: Zoo, store: Store, chunk_layers: int | None = None,
         units_of: dict[str, list[str]] | None = None) -> tuple[list[WorkItem], int, int]:
    """The work items with units still missing from `store`; also (total units, units already done).

    `units_of` (from `validate`) gives each model's units; without it each model is built once
    (untrained) to list them. Each data spec is loaded once.
    """
    items: list[WorkItem] = []
    total = done = 0
    for entry in zoo.entries:
        s = entry.settings
        data = _data_of(entry)
        if units_of is not None and entry.id in units_of:
            units = units_of[entry.id]
        else:
            model, _ = build_model(entry.factory, None, s.get("model_args"), data)
            units = [u.name for u in _units_of(entry, model)]
        for probe, shift in ((p, sh) for p in s["probes"] for sh in [CLEAN, *s.get("shifts", [])]):
            h = config_hash(entry, probe, data, shift)
            present = store.done_units(entry.id, h, shift)
            trials = list(range(s.get("trials", 3))) if _probe_is_random(probe) else [0]
            target = "reference" if probe == "reinit" else probe
            if _adaptive(s):  # a unit is done once its rows (as many trials as it took) are stored
                stored = {u for u, p, _, _ in present if p == probe}
                total += 1 + len(units)
                done += ((UNMODIFIED, "none", "", 0) in present) + sum(u in stored for u in units)
                missing = [u for u in units if u not in stored]
                if not missing and (UNMODIFIED, "none", "", 0) in present:
                    continue
                step = (len(missing) if s.get("rank_only") else chunk_layers or len(missing)) or 1
                for i in range(0, max(len(missing), 1), step):
                    items.append(WorkItem(entry.id, probe, [], missing[i : i + step], h, shift))
                continue
            total += 1 + len(units) * len(trials)
            done += ((UNMODIFIED, "none", "", 0) in present) + sum(
                (u, probe, target, t) in present for u in units for t in trials)
            for t in trials:
                missing = [u for u in units if (u, probe, target, t) not in present]
                if not missing and (UNMODIFIED, "none", "", 0) in present:
                    continue
                step = chunk_layers or len(missing) or 1
                for i in range(0, max(len(missing), 1), step):
                    items.append(WorkItem(entry.id, probe, [t], missing[i : i + step], h, shift))
    return items, total, done


def run_item(entry: ZooEntry, item: WorkItem, device: str | None = None, threads: int | None = None,
             checkpoint: Checkpoint | None = None) -> list[dict]:
    """Evaluate one work item; returns its result rows (the unmodified model's row included).

    `checkpoint` (adaptive items): where each round's statistics are kept (`adaptive.Checkpoint`).
    """
    if threads:
        torch.set_num_threads(threads)
    s = entry.settings
    data = _data_of(entry)
    if item.shift != CLEAN:
        from ..data.corruptions import shift_dataset

        data = shift_dataset(data, item.shift, s.get("data_seed", 0))
    model, factory = build_model(entry.factory, entry.weights, s.get("model_args"), data)
    reference = None
    if item.probe == "reinit":
        from ..training.checkpoints import load_state_dict

        reference = load_state_dict(s["reference"])
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if item.trials:
        sampling = {"trials": max(item.trials) + 1, "trial_ids": item.trials}
    else:  # adaptive sampling: the subset's seed also orders its images
        sampling = {"trials": s.get("trials", 3), "precision": s.get("precision"), "max_trials": s.get("max_trials"),
                    "rank_only": bool(s.get("rank_only")), "data_seed": s.get("data_seed", 0)}
    result = measure(
        model, data, factory=factory, reference=reference, model_name=entry.id, probes=[item.probe],
        checkpoint=checkpoint, **sampling, seed=s.get("seed", 0), layers=s.get("layers"),
        units=item.units, include_norm=s.get("include_norm", False), granularity=s.get("granularity", "layer"),
        label_style=s.get("label_style", "auto"), batch_size=s.get("batch_size", 256), device=device,
        executor=s.get("executor", "auto"), autocast=s.get("autocast"), compile=s.get("compile", False),
    )
    table = result.table.astype(object).where(result.table.notna(), None)
    rows = table.to_dict("records")
    for r in rows:
        r["data_identity"] = result.config["data_identity"]
        r["shift"] = item.shift
        r["precision"] = s.get("precision")
    return rows


@dataclass
class _StoreCheckpoint:
    """An adaptive work item's rounds, kept in the results store (`adaptive.Checkpoint`)."""

    store: Store
    item: WorkItem
    run_id: int | None

    def load(self) -> dict:
        return self.store.load_rounds(self.item.model, self.item.config_hash, self.item.shift)

    def save(self, states) -> None:
        with _signals_held():  # a round's statistics land whole
            self.store.save_rounds(self.item.model, self.item.config_hash, self.item.shift, states, self.run_id)


def sweep(
    zoo: str | Path | Zoo,
    store: str | Path | Store,
    *,
    backend: str = "local",
    address: str | None = None,
    workers: int | None = None,
    chunk_layers: int | None = None,
    progress: bool = True,
) -> SweepReport:
    """Run every missing unit of a zoo into a results store.

    Args:
        zoo: a zoo file (validated before any compute) or a loaded `Zoo`.
        store: the results store (created if missing).
        backend: "local" (in this process) or "ray" (a local Ray instance when `address` is None,
            else the cluster at `address`).
        address: Ray cluster address (e.g. "auto" or "ray://host:10001").
        workers: CPUs of the local Ray instance (default: all).
        chunk_layers: layers per work item (default: all layers of a (model, probe, trial)).
        progress: show units done / total, rate and ETA.
    """
    if backend not in ("local", "ray"):
        raise LayercritError(f"Expected `backend` to be 'local' or 'ray', got {backend!r}")
    if workers is not None and workers < 1:
        raise LayercritError(f"Expected `workers` to be a positive integer, got {workers!r}")
    if chunk_layers is not None and chunk_layers < 1:
        raise LayercritError(f"Expected `chunk_layers` to be a positive integer, got {chunk_layers!r}")
    zoo = zoo if isinstance(zoo, Zoo) else load_zoo(zoo)
    units_of = validate(zoo)  # before the store exists: a zoo that cannot run leaves no file behind
    own_store = not isinstance(store, Store)
    store = Store(store) if own_store else store
    t0 = time.perf_counter()
    try:
        items, total, done = plan(zoo, store, chunk_layers, units_of)
        report = SweepReport(total, done)
        entries = {e.id: e for e in zoo.entries}
        for e in zoo.entries:
            data = _data_of(e)
            store.put_model(e.id, e.category, e.metadata, spec=e.factory, weights=e.weights, config=e.settings,
                            data=e.settings["data"], data_identity=data.identity, n=len(data))
        run_id = store.start_run(str(zoo.path), zoo.to_dict() | {"backend": backend, "chunk_layers": chunk_layers})

        def commit(item: WorkItem, rows: list[dict], seconds: float) -> None:
            t = time.perf_counter()
            with _signals_held():  # an interrupt waits for the commit: a finished item is never lost
                added = store.add_results(rows, item.config_hash, run_id)
            if added and not item.trials:  # adaptive: a unit has a row per trial it took; count units
                added = len({r["layer"] for r in rows})
            report.store_seconds += time.perf_counter() - t
            report.compute_seconds += seconds
            report.added += added
            report.items += 1
            bar.update(added)  # units newly stored (an item's unmodified row counts once per model and probe)

        # Ray starts before the bar, so its start-up messages print above it; log records (Ray's
        # included) print through tqdm while the bar is shown.
        with _ray_session(backend, items, address, workers) as ray, logging_above_bars():
            bar = tqdm(total=total, initial=done, desc="sweep", unit="unit", disable=not progress, smoothing=0.1)
            try:
                if backend == "local":
                    for item in items:
                        t = time.perf_counter()
                        try:
                            rows = run_item(entries[item.model], item,
                                            checkpoint=None if item.trials else _StoreCheckpoint(store, item, run_id))
                        except LayercritError as e:
                            report.failures.append(f"model {item.model!r}: {e}")
                            continue
                        commit(item, rows, time.perf_counter() - t)
                elif items:  # (nothing left to do: Ray was not started)
                    _run_ray(ray, items, entries, commit, report)
            finally:
                bar.close()
                store.finish_run(run_id)
        report.failures = list(dict.fromkeys(report.failures))  # one line per failing model, not per work item
        report.elapsed = time.perf_counter() - t0
        return report
    finally:
        if own_store:
            store.close()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (then act as usual); a no-op off the main thread."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _timed_item(entry: ZooEntry, item: WorkItem, threads: int | None) -> tuple[list[dict], float]:
    t = time.perf_counter()
    return run_item(entry, item, threads=threads), time.perf_counter() - t


@contextlib.contextmanager
def _ray_session(backend: str, items: Sequence[WorkItem], address: str | None, workers: int | None):
    """Ray, started (or joined) when the ray backend has work, shut down after if started here; else None."""
    if backend != "ray" or not items:
        yield None
        return
    try:
        import ray
    except ImportError:
        raise LayercritError("the ray backend needs Ray: pip install 'layercrit[ray]'") from None
    started = not ray.is_initialized()
    if started:
        # Workers' output stays in their log files (log_to_driver=False); the driver's own log
        # records go through the logging module (configure_logging=False), which prints them above bars.
        kwargs = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        try:
            with logging_above_bars():
                if address:
                    ray.init(address=address, **kwargs)
                else:
                    ray.init(num_cpus=workers, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise LayercritError(f"cannot start or join Ray{f' at {address!r}' if address else ''}: {e}") from None
        finally:
            if sigterm is not None:  # ray.init replaces the SIGTERM handler with sys.exit: keep the caller's
                signal.signal(signal.SIGTERM, sigterm)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _run_ray(ray, items: Sequence[WorkItem], entries: dict, commit, report: SweepReport) -> None:
    gpus = 1 if torch.cuda.is_available() else 0
    # One CPU (and GPU, where there is one) per task; a task whose worker dies is retried.
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=3)(_timed_item)
    pending = {task.remote(entries[i.model], i, None if gpus else 1): i for i in items}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # wakes up for Ctrl-C / SIGTERM
            if not ready:
                continue
            item = pending.pop(ready[0])
            try:
                rows, seconds = ray.get(ready[0])
            except Exception as e:  # the task's own error, wrapped by Ray
                cause = getattr(e, "cause", None)
                report.failures.append(f"model {item.model!r}: {cause if isinstance(cause, LayercritError) else e}")
                continue
            commit(item, rows, seconds)
    finally:
        for ref in pending:  # interrupted: the tasks still running are not wanted any more
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
