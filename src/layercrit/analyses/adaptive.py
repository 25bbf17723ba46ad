"""Adaptive sampling: evaluate each unit in rounds until its mean criticality is known to ±H.

A *cell* is one (probe, target, unit). Its criticality values form a crossed design: trial t
(a random draw, seed `derive_seed(seed, t)`) on image i gives c[t, i], every trial of a cell on
the same images, modelled as c[t, i] = μ + a_t + b_i + e_ti (trial effect, image effect, residual).
The estimate of μ is the mean of the T per-trial means over n images; its variance
σ²_a/T + σ²_b/n + σ²_e/(Tn) is bounded from above by

    s²_trials/T + s²_images/n,

s²_trials the variance of the T per-trial means, s²_images the variance over images of the
per-image means over trials (each estimates its own term plus the residual's share, so the sum
counts the residual twice: conservative). The 95 % half-width is

    h = sqrt(t²(T−1; 97 %) · s²_trials/T + t²(n−1; 95 %) · s²_images/n),

t(d; γ) the two-sided γ quantile of Student's t with d degrees of freedom: Banerjee's (1960)
conservative bound for a sum of two independently estimated variances, which holds its coverage
for any ratio of the two, where Welch–Satterthwaite's estimated degrees of freedom undercover with
few trials (91.7 % at 3 trials when the trial term dominates). The trial term's quantile is taken
at 97 % and a random probe's first round has at least `FIRST_TRIALS` draws because a cell stops on
the round whose trial variance happens to be low, which a fixed-size quantile does not allow for;
with both, the reported intervals of the sequential procedure hold μ ≥ 94 % of the time in
`tests/test_adaptive.py`'s simulations. A deterministic probe (reinit, zero, skip) has one trial
and only the image term.

Rounds: every cell starts with max(`trials`, `FIRST_TRIALS`) draws (1 for a deterministic probe) on
the first `FIRST_IMAGES` images (rounded up to whole batches), then each round grows the cells whose
interval is still wider than asked: trials and images are chosen to make the two terms equal at
the target (which minimizes trials × images), with a 20 % margin, at most doubling either per
round, always whole batches of images. New trials run on every image seen so far, old trials on
the new images only, so a cell's result is that of a fixed run on the same images and trials: the
same batches summed in the same order. Images come in a seeded random order of the evaluation
subset (`evaluation_order`), so every prefix is a simple random sample of it. A cell stops when
its half-width is at most the target, or at the caps (`images`, `max_trials`); with `rank_only`, when
its interval is disjoint from those of its neighbours in the ranking of its probe (or, with a
`precision`, at most that wide); a cell whose neighbour later moves into its interval resumes.
"""

from __future__ import annotations

import base64
import functools
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from ..data import Dataset
from ..data.inputs import num_samples, take
from ..engine.engine import Engine, Perturbation
from ..engine.measures import MeasureSums
from ..seeding import derive_seed

__all__ = ["FIRST_IMAGES", "FIRST_TRIALS", "LEVEL", "MAX_TRIALS", "AdaptiveRun", "Cell", "Checkpoint", "Interval",
           "adaptive_config", "evaluate", "evaluation_order", "format_adaptive", "interval", "next_size", "run_rounds"]

LEVEL = 0.95  # confidence level of the reported half-width
FIRST_IMAGES = 512  # images of the first round (rounded up to whole batches)
FIRST_TRIALS = 6  # fewest trials of a random probe's first round (fewer stop on a lucky variance: see tests)
MAX_TRIALS = 50  # default cap on the trials of a random probe
TRIAL_ALPHA = 0.6  # the trial term's quantile is taken at 1 − 0.6 α: 97 % for a 95 % interval
GROWTH = 2.0  # most a round multiplies a cell's trials or images by
SAFETY = 1.2  # variance margin when planning the next round (fewer looks: better coverage, see tests)


@dataclass(frozen=True)
class Interval:
    """The estimate of a cell's mean criticality and its confidence half-width.

    Attributes:
        mean: mean of the per-trial means.
        half_width: 95 % half-width (inf when it cannot be estimated yet; 0 when every value agrees).
        trials, images: T and n.
        trial_var: s² of the per-trial means (0 with one trial).
        image_var: s² over images of the per-image means over trials.
    """

    mean: float
    half_width: float
    trials: int
    images: int
    trial_var: float
    image_var: float


def _trial_level(level: float) -> float:
    """The trial term's quantile level: 97 % for a 95 % interval (see the module docstring)."""
    return 1.0 - (1.0 - level) * TRIAL_ALPHA


def _q(df: float, level: float = LEVEL) -> float:
    from scipy import stats  # deferred: scipy.stats costs a second at import

    return float(stats.t.ppf(0.5 + level / 2, df))


def interval(trial_means: Sequence[float] | np.ndarray, image_sums: np.ndarray, *, random: bool = True,
             level: float = LEVEL) -> Interval:
    """The conservative two-level interval (module docstring) of a cell.

    Args:
        trial_means: each trial's mean criticality over the cell's images.
        image_sums: per image, the sum over trials of its criticality.
        random: the probe draws (a deterministic probe has no trial term).
        level: confidence level.
    """
    tm = np.asarray(trial_means, dtype=np.float64)
    t, n = len(tm), len(image_sums)
    mean = float(np.mean(tm)) if t else math.nan
    per_image = np.asarray(image_sums, dtype=np.float64) / max(t, 1)
    per_image = per_image[~np.isnan(per_image)]  # images where some trial's output was not finite
    image_var = float(np.var(per_image, ddof=1)) if len(per_image) > 1 else math.nan
    trial_var = float(np.var(tm, ddof=1)) if t > 1 else 0.0
    if math.isnan(mean) or math.isnan(trial_var):
        return Interval(mean, math.nan, t, n, trial_var, image_var)
    if (random and t < 2) or len(per_image) < 2:
        return Interval(mean, math.inf, t, n, trial_var, image_var)
    a = _q(t - 1, _trial_level(level)) ** 2 * trial_var / t if random and trial_var > 0 else 0.0
    b = _q(len(per_image) - 1, level) ** 2 * image_var / len(per_image) if image_var > 0 else 0.0
    return Interval(mean, math.sqrt(a + b), t, n, trial_var, image_var)


def _whole(x: float, step: int, cap: int) -> int:
    """`x` rounded up to a multiple of `step`, at most `cap`."""
    if not math.isfinite(x) or x >= cap:
        return cap
    return min(cap, max(step, math.ceil(x / step) * step))


def next_size(iv: Interval, target: float, *, random: bool, images_cap: int, trials_cap: int, step: int,
              level: float = LEVEL) -> tuple[int, int]:
    """(trials, images) of the next round of a cell whose interval `iv` is wider than `target`.

    The two variance terms are planned equal at the target (the cheapest split of trials × images),
    with a `SAFETY` margin; when one dimension is at its cap the other takes the rest. Each grows at
    most `GROWTH`-fold, images in whole `step`s; at least one of them grows while below its cap.
    """
    t, n = iv.trials, iv.images
    t_cap = trials_cap if random else 1
    most_t, most_n = min(t_cap, math.ceil(t * GROWTH)), _whole(n * GROWTH, step, images_cap)
    if random and t < 2:
        a = math.inf
    else:
        a = SAFETY * _q(t - 1, _trial_level(level)) ** 2 * iv.trial_var if random and iv.trial_var > 0 else 0.0
    b = SAFETY * _q(n - 1, level) ** 2 * iv.image_var if n > 1 and not math.isnan(iv.image_var) else math.inf
    h2 = target * target
    if h2 > 0 and math.isfinite(a) and math.isfinite(b):
        want_t, want_n = 2 * a / h2, 2 * b / h2
        if want_n > images_cap:
            rest = h2 - b / images_cap
            want_n, want_t = images_cap, (a / rest if rest > 0 else math.inf)
        if want_t > t_cap:
            rest = h2 - a / t_cap
            want_t, want_n = t_cap, (b / rest if rest > 0 else math.inf)
    else:  # an unknown term grows as far as a round allows; a known one as if it had half the target
        want_t = math.inf if a > 0 and (h2 == 0 or math.isinf(a)) else (2 * a / h2 if a > 0 else t)
        want_n = math.inf if b > 0 and (h2 == 0 or math.isinf(b)) else (2 * b / h2 if b > 0 else n)
    new_t = max(t, min(most_t, math.ceil(want_t) if math.isfinite(want_t) else most_t))
    new_n = max(n, min(most_n, _whole(want_n, step, images_cap)))
    if (new_t, new_n) == (t, n):  # the plan says enough but the interval disagrees: grow the larger term
        if t < t_cap and (n >= images_cap or a / t >= b / n):
            new_t = t + 1
        elif n < images_cap:
            new_n = _whole(n + step, step, images_cap)
    return new_t, new_n


@dataclass(eq=False)
class Cell:
    """One (probe, target, unit) under adaptive sampling.

    Attributes:
        key: identifies the cell (e.g. (probe, target, unit)).
        group: cells ranked together by `rank_only` (e.g. (probe, target)).
        random: the probe draws (else one trial).
        trials, images: trials and images evaluated so far (every trial on the first `images`).
        trial_means: each trial's mean criticality.
        image_sums: per image, the sum over trials of its criticality (float64).
        sums: per trial, whatever the evaluator accumulates (the engine: `MeasureSums`).
        interval: the interval after the last round.
    """

    key: Hashable
    group: Hashable = None
    random: bool = True
    trials: int = 0
    images: int = 0
    trial_means: list[float] = field(default_factory=list)
    image_sums: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sums: dict[int, object] = field(default_factory=dict)
    interval: Interval | None = None

    def add(self, trials: int, images: int, new: Mapping[int, tuple[float, np.ndarray]]) -> None:
        """Extend to `trials` trials on `images` images.

        Args:
            new: per trial that ran this round, (its mean over all `images`, its per-image values on
                the images it had not seen: the new ones for an old trial, all for a new one). Old
                trials run iff `images` grew.
        """
        sums = np.zeros(images, dtype=np.float64)
        sums[: self.images] = self.image_sums
        means = list(self.trial_means) + [math.nan] * (trials - self.trials)
        for t in range(trials):
            if t < self.trials and images == self.images:
                continue
            mean, values = new[t]
            start = self.images if t < self.trials else 0
            sums[start:images] += np.asarray(values, dtype=np.float64)
            means[t] = float(mean)
        self.trials, self.images, self.trial_means, self.image_sums = trials, images, means, sums

    def state(self) -> dict:
        """The cell's statistics as JSON-ready values, bit-exact (`restore` reads them back)."""
        return {"trials": self.trials, "images": self.images, "trial_means": [float(m).hex() for m in self.trial_means],
                "image_sums": base64.b64encode(np.ascontiguousarray(self.image_sums, "<f8").tobytes()).decode()}

    def restore(self, state: Mapping) -> None:
        self.trials, self.images = int(state["trials"]), int(state["images"])
        self.trial_means = [float.fromhex(m) for m in state["trial_means"]]
        self.image_sums = np.frombuffer(base64.b64decode(state["image_sums"]), dtype="<f8").astype(np.float64)


Request = tuple[Cell, int, int]  # (cell, trials, images) to reach in this round


def _capped(cell: Cell, images_cap: int, trials_cap: int) -> bool:
    return cell.images >= images_cap and (not cell.random or cell.trials >= trials_cap)


def _targets(cells: Sequence[Cell], precision: float | None, rank_only: bool) -> dict[Cell, float]:
    """The half-width each unfinished cell still has to reach (cells not listed are finished)."""
    out: dict[Cell, float] = {}
    if not rank_only:
        for c in cells:
            iv = c.interval
            if not math.isnan(iv.mean) and not iv.half_width <= precision:
                out[c] = precision
        return out
    groups: dict[Hashable, list[Cell]] = {}
    for c in cells:
        if not math.isnan(c.interval.mean):
            groups.setdefault(c.group, []).append(c)
    for members in groups.values():
        order = sorted(members, key=lambda c: c.interval.mean)
        for i, c in enumerate(order):
            iv = c.interval
            if precision is not None and iv.half_width <= precision:
                continue
            gaps = []
            for d in (order[i - 1] if i else None, order[i + 1] if i + 1 < len(order) else None):
                if d is None:
                    continue
                gap = abs(iv.mean - d.interval.mean)
                tied_exactly = gap == 0 and iv.half_width == 0 and d.interval.half_width == 0
                if not (gap > iv.half_width + d.interval.half_width or tied_exactly):
                    gaps.append(gap)
            if gaps:
                out[c] = max(min(gaps) / 2, precision or 0.0)
    return out


def run_rounds(
    cells: Sequence[Cell],
    evaluate: Callable[[list[Request]], None],
    *,
    precision: float | None,
    rank_only: bool = False,
    images_cap: int,
    trials_cap: int,
    step: int,
    first_trials: int = FIRST_TRIALS,
    first_images: int = FIRST_IMAGES,
    level: float = LEVEL,
    on_round: Callable[[Sequence[Cell]], None] | None = None,
) -> int:
    """Evaluate `cells` in rounds until each is finished (module docstring); returns the rounds run.

    Args:
        cells: the cells; a cell restored from a checkpoint (`images` > 0) continues from there.
        evaluate: runs one round: for each (cell, trials, images) request, the new trials on all
            `images` and the old ones on the new images, then `cell.add(...)` with their values.
        precision: target half-width (absolute), or None (with `rank_only`: separation only).
        rank_only: finish a cell once its interval is disjoint from its ranking neighbours'.
        images_cap, trials_cap: most images and trials per cell.
        first_trials: trials of a random probe's first round.
        step: images come in multiples of this (the batch size), up to `images_cap`.
        first_images: images of the first round (rounded up to whole steps).
        on_round: called after each round with every cell (e.g. to checkpoint them).
    """
    first_n = _whole(first_images, step, images_cap)
    todo = [(c, min(first_trials, trials_cap) if c.random else 1, first_n) for c in cells if c.images == 0]
    rounds = 0
    while True:
        if todo:
            evaluate(todo)
            rounds += 1
            if on_round is not None:
                on_round(cells)
        for c in cells:
            c.interval = interval(c.trial_means, c.image_sums, random=c.random, level=level)
        targets = _targets(cells, precision, rank_only)
        todo = []
        for c, target in targets.items():
            if _capped(c, images_cap, trials_cap):
                continue
            t, n = next_size(c.interval, target, random=c.random, images_cap=images_cap, trials_cap=trials_cap,
                             step=step, level=level)
            todo.append((c, t, n))
        if not todo:
            return rounds


# --- adaptive `measure`: the round loop on the engine ------------------------------------------


class Checkpoint(Protocol):
    """Where a measurement keeps its cells' statistics between rounds (a sweep: its results store),
    so an interrupted run continues each cell's rounds instead of restarting them."""

    def load(self) -> Mapping[tuple[str, str, str], Mapping]:
        """The saved state of each cell, by (probe, target, unit)."""
        ...

    def save(self, states: Mapping[tuple[str, str, str], Mapping]) -> None:
        """Keep the states of the cells that changed in the last round."""
        ...


@dataclass
class AdaptiveRun:
    """What `evaluate` measured: the unmodified model's measures on all images used (`base`) and on
    the first n (`bases[n]`, for each n a unit stopped at); per perturbation key (probe, target,
    unit, trial) the measures as `Engine.evaluate` gives them, and each row's `n`, `trials_used` and
    `half_width`."""

    base: dict[str, float]
    bases: dict[int, dict[str, float]]
    results: dict[tuple, dict[str, float]]
    meta: dict[tuple, tuple]  # key -> (probe, unit, trial, seed)
    extra: dict[tuple, dict]
    stats: dict


def evaluation_order(dataset: Dataset, data_seed: int = 0) -> Dataset:
    """The evaluation subset in the seeded random order adaptive sampling takes its images in.

    `Dataset.subset` keeps the samples sorted by position, so a prefix of it would favour the first
    classes of a class-sorted folder; this order makes every prefix a simple random sample of the
    subset. A fixed run on its first n samples uses the images an adaptive cell with `n` used.
    """
    order = np.random.Generator(np.random.PCG64(derive_seed(data_seed, "adaptive-order"))).permutation(len(dataset))
    index = torch.from_numpy(order)
    base = dataset.indices if dataset.indices is not None else np.arange(len(dataset))
    return replace(dataset, x=take(dataset.x, index), y=None if dataset.y is None else dataset.y[index],
                   indices=base[order], meta=dict(dataset.meta) | {"order": "adaptive"})


def _sums_state(acc: MeasureSums) -> dict:
    """A `MeasureSums` as JSON-ready values, bit-exact (floats in hex)."""
    return {"n": int(acc.n), "nonfinite": int(acc.nonfinite),
            "sums": {k: float(v).hex() for k, v in acc.sums.items()},
            "counts": {k: int(v) for k, v in acc.counts.items()}}


def _sums_restore(state: Mapping, device: torch.device) -> MeasureSums:
    acc = MeasureSums()
    acc.n = int(state["n"])
    acc.nonfinite = torch.tensor(int(state["nonfinite"]), device=device)
    acc.sums = {k: torch.tensor(float.fromhex(v), dtype=torch.float64, device=device) for k, v in state["sums"].items()}
    acc.counts = {k: torch.tensor(int(v), device=device) for k, v in state["counts"].items()}
    return acc


def evaluate(engine: Engine, model: nn.Module, units: Sequence, probes: Sequence, config,
             checkpoint: Checkpoint | None = None, desc: str = "model") -> AdaptiveRun:
    """Adaptive sampling of every (probe, unit) of a measurement on `engine` (its inputs: the
    evaluation subset in `evaluation_order`); `config` is the `MeasureConfig`."""
    trials_cap = config.max_trials or MAX_TRIALS
    images_cap = num_samples(engine.inputs)
    cells, values = [], {}
    for probe in probes:
        target = probe.describe().get("target", "")
        for unit in units:
            cell = Cell(key=(probe.name, target, unit.name), group=(probe.name, target), random=bool(probe.random))
            cells.append(cell)
            values[cell.key] = (probe, unit)
    accs: dict[tuple, MeasureSums] = {}
    for key, state in (checkpoint.load() if checkpoint is not None else {}).items():
        cell = next((c for c in cells if c.key == tuple(key)), None)
        if cell is not None:
            cell.restore(state)
            accs |= {(*cell.key, int(t)): _sums_restore(s, engine.device) for t, s in state["sums"].items()}
    stats = {"image_evaluations": 0, "unmodified_evaluations": 0}
    changed: list[Cell] = []

    def perturbation(cell: Cell, t: int) -> Perturbation:
        probe, unit = values[cell.key]
        return Perturbation((*cell.key, t), functools.partial(probe.values, model, unit, derive_seed(config.seed, t)))

    def run(requests: list[Request]) -> None:
        work: dict[tuple[int, int], list[tuple[Cell, int]]] = {}
        for cell, trials, images in requests:
            for t in range(trials):
                start = cell.images if t < cell.trials else 0  # old trials: the new images only
                if start < images:
                    work.setdefault((start, images), []).append((cell, t))
        new: dict[Cell, dict[int, tuple[float, np.ndarray]]] = {cell: {} for cell, _, _ in requests}
        for (start, stop), items in sorted(work.items(), key=lambda kv: kv[0]):
            engine.evaluate([perturbation(c, t) for c, t in items], desc=f"{desc}: images {start}-{stop}",
                            samples=slice(start, stop), sums=accs, keep_samples=("criticality",))
            for cell, t in items:
                acc = accs[(*cell.key, t)]
                kept = acc.samples.pop("criticality")
                new[cell][t] = (acc.compute()["criticality"], torch.cat(kept).cpu().numpy())
            stats["image_evaluations"] += len(items) * (stop - start)
            stats["unmodified_evaluations"] += stop - start
        for cell, trials, images in requests:
            cell.add(trials, images, new[cell])
        changed[:] = [cell for cell, _, _ in requests]

    def save(_cells: Sequence[Cell]) -> None:
        checkpoint.save({c.key: c.state() | {"sums": {str(t): _sums_state(accs[(*c.key, t)]) for t in range(c.trials)}}
                         for c in changed})

    started = time.perf_counter()
    rounds = run_rounds(cells, run, precision=config.precision, rank_only=config.rank_only, images_cap=images_cap,
                        trials_cap=trials_cap, step=engine.batch_size,
                        first_trials=max(config.trials, FIRST_TRIALS), on_round=save if checkpoint else None)
    # The unmodified model on the first n images, for each n a cell stopped at (its rows' accuracy_drop
    # compares with it): one pass, summed in the order of a fixed run on those images.
    sizes = sorted({c.images for c in cells} or {_whole(FIRST_IMAGES, engine.batch_size, images_cap)})
    acc, bases, start = MeasureSums(), {}, 0
    for n in sizes:
        bases[n], _ = engine.evaluate([], desc=f"{desc}: unmodified", samples=slice(start, n), base_sums=acc)
        start = n
    seen = sizes[-1]
    stats["unmodified_evaluations"] += seen
    results, meta, extra = {}, {}, {}
    for cell in cells:
        probe, unit = values[cell.key]
        for t in range(cell.trials):
            key = (*cell.key, t)
            results[key] = accs[key].compute()
            meta[key] = (probe, unit, t, derive_seed(config.seed, t))
            extra[key] = {"n": cell.images, "trials_used": cell.trials, "half_width": cell.interval.half_width}
    wide = sum(not c.interval.half_width <= config.precision for c in cells) if config.precision is not None else None
    stats |= {"rounds": rounds, "seconds": time.perf_counter() - started, "images_used": seen, "images_cap": images_cap,
              "units_wider_than_precision": wide}
    return AdaptiveRun(bases[seen], bases, results, meta, extra, stats)


def adaptive_config(config, stats: Mapping) -> dict:
    """The adaptive settings and what the run took, for the resolved config of a result."""
    return {"precision": config.precision, "rank_only": config.rank_only, "level": LEVEL,
            "max_trials": config.max_trials or MAX_TRIALS, "first_trials": max(config.trials, FIRST_TRIALS),
            "first_images": FIRST_IMAGES, "image_order": "evaluation_order(subset, data_seed)", **stats}


def format_adaptive(info: Mapping) -> str:
    """One line on an adaptive run (`result.config["adaptive"]`): the target, the cost, what fell short."""
    h = info.get("precision")
    points = f"±{100 * h:g} point{'' if 100 * h == 1 else 's'}" if h is not None else ""
    goal = (f"to {points}" if h is not None else "") + (" (rank only)" if info.get("rank_only") else "")
    line = (f"adaptive sampling {goal.strip()}: {info['image_evaluations']:,} image-evaluations in {info['rounds']} "
            f"round{'' if info['rounds'] == 1 else 's'} (caps per layer: {info['images_cap']:,} images, {info['max_trials']} trials)")
    wide = info.get("units_wider_than_precision")
    if wide:
        line += f"; {wide} layer{'s' if wide != 1 else ''} stopped at the caps wider than {points}"
    return line
