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

    h = sqrt(t²(T−1) · s²_trials/T + t²(n−1) · s²_images/n),

t(d) the two-sided 95 % quantile of Student's t with d degrees of freedom: Banerjee's (1960)
conservative bound for a sum of two independently estimated variances, which holds its coverage
for any ratio of the two, where Welch–Satterthwaite's estimated degrees of freedom undercover with
few trials (91.7 % at 3 trials when the trial term dominates, in `tests/test_adaptive.py`'s model).
A deterministic probe (reinit, zero, skip) has one trial and only the image term.

Rounds: every cell starts with `trials` draws (1 for a deterministic probe) on the first
`FIRST_IMAGES` images (rounded up to whole batches), then each round grows the cells whose
interval is still wider than asked: trials and images are chosen to make the two terms equal at
the target (which minimizes trials × images), with a 20 % margin, at most doubling either per
round, always whole batches of images. New trials run on every image seen so far, old trials on
the new images only, so a cell's result is that of a fixed run on the same images and trials: the
same batches summed in the same order. Images come in a seeded random order of the evaluation
subset (`evaluation_order`), so every prefix is a simple random sample of it. A cell stops when
its half-width is at most the target, or at the caps (`images`, `max_trials`); with `rank_only`, when
its interval is disjoint from those of its neighbours in the ranking of its probe.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["FIRST_IMAGES", "LEVEL", "MAX_TRIALS", "Cell", "Interval", "interval", "next_size", "run_rounds"]

LEVEL = 0.95  # confidence level of the reported half-width
FIRST_IMAGES = 512  # images of the first round (rounded up to whole batches)
MAX_TRIALS = 50  # default cap on the trials of a random probe
GROWTH = 2.0  # most a round multiplies a cell's trials or images by
TRIAL_LEVEL = 0.95
INFL = 1.0
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
    a = _q(t - 1, TRIAL_LEVEL if level == LEVEL else level) ** 2 * trial_var * INFL / t if random and trial_var > 0 else 0.0
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
        a = SAFETY * _q(t - 1, level) ** 2 * iv.trial_var if random and iv.trial_var > 0 else 0.0
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
    first_trials: int,
    step: int,
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
