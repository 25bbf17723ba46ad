"""Adaptive sampling (layercrit.adaptive): the interval's coverage on a crossed model with known
mean, the round loop, and adaptive `measure` against fixed runs on the same images and trials."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layercrit.adaptive import Cell, interval, next_size, run_rounds


class Crossed:
    """c[t, i] = μ + a_t + b_i + e_ti with normal effects: the model the interval assumes, μ known.

    Trial rows are drawn when first asked for, each from its own seed, so a cell's values do not
    depend on the order the loop asks for them."""

    def __init__(self, seed: int, mu: float, sa: float, sb: float, se: float, images: int, trials: int) -> None:
        rng = np.random.default_rng(seed)
        self.seed, self.mu, self.se, self.images = seed, mu, se, images
        self.a = rng.normal(0, sa, trials)
        self.b = rng.normal(0, sb, images)
        self.rows: dict[int, np.ndarray] = {}

    def row(self, t: int) -> np.ndarray:
        if t not in self.rows:
            e = np.random.default_rng([self.seed, t]).normal(0, self.se, self.images)
            self.rows[t] = self.mu + self.a[t] + self.b + e
        return self.rows[t]


def evaluator(source: dict[Cell, Crossed]):
    """`run_rounds`' evaluate over synthetic values: what the engine does with real ones."""

    def evaluate(requests):
        for cell, trials, images in requests:
            new = {}
            for t in range(trials):
                if t < cell.trials and images == cell.images:
                    continue
                row = source[cell].row(t)
                new[t] = (row[:images].mean(), row[cell.images if t < cell.trials else 0 : images])
            cell.add(trials, images, new)

    return evaluate


COVERAGE_CASES = {
    # (μ, σ_trials, σ_images, σ_residual, random probe)
    "trials dominate": (0.4, 0.04, 0.2, 0.1, True),
    "images dominate": (0.5, 0.005, 0.3, 0.2, True),
    "balanced, large residual": (0.2, 0.03, 0.1, 0.3, True),
    "deterministic probe": (0.3, 0.0, 0.25, 0.0, False),
}


@pytest.mark.parametrize("case", list(COVERAGE_CASES))
def test_coverage_of_the_sequential_interval(case):
    """Over 300 seeded repetitions (each a cell run to ±0.02 or the caps by the real round loop), the
    reported 95 % interval holds μ at least 93 % of the time."""
    mu, sa, sb, se, random = COVERAGE_CASES[case]
    reps, images, trials = 300, 2048, 40
    source = {Cell(key=k, random=random): Crossed(1000 * k + 7, mu, sa, sb, se, images, trials) for k in range(reps)}
    cells = list(source)
    run_rounds(cells, evaluator(source), precision=0.02, images_cap=images, trials_cap=trials, step=128,
               first_images=256)
    hit = [abs(c.interval.mean - mu) <= c.interval.half_width for c in cells]
    coverage = float(np.mean(hit))
    assert coverage >= 0.93, (case, coverage)
    # the loop did stop on precision for most cells (not only at the caps), else coverage says little
    assert np.mean([c.interval.half_width <= 0.02 for c in cells]) > 0.9


def test_interval_by_hand():
    """Two trials on three images: trial means 0.2 and 0.4 (s² = 0.02), per-image means 0.2, 0.3, 0.4
    (s² = 0.01); h = sqrt(t₉₇(1)² · 0.02/2 + t₉₅(2)² · 0.01/3), the trial term's quantile at 97 %."""
    c = np.array([[0.1, 0.2, 0.3], [0.3, 0.4, 0.5]])
    iv = interval(c.mean(1), c.sum(0))
    assert iv.mean == pytest.approx(0.3)
    assert iv.trial_var == pytest.approx(0.02) and iv.image_var == pytest.approx(0.01)
    assert iv.half_width == pytest.approx(math.sqrt(21.2049488 ** 2 * 0.01 + 4.30265273 ** 2 * 0.01 / 3))
    det = interval([0.3], np.array([0.2, 0.3, 0.4]), random=False)
    assert det.half_width == pytest.approx(4.30265273 * math.sqrt(0.01 / 3))
    assert interval([0.3], np.array([0.2, 0.3, 0.4])).half_width == math.inf  # a random probe needs two trials
    assert interval([0.0, 0.0], np.zeros(5)).half_width == 0.0


def test_next_size_plans_whole_batches_within_caps():
    iv = interval([0.30, 0.31, 0.29], np.full(256, 0.9) + np.tile([0.3, -0.3], 128))
    t, n = next_size(iv, 0.01, random=True, images_cap=1000, trials_cap=40, step=128)
    assert 3 <= t <= 6 and 256 < n <= 512 and n % 128 == 0
    # at the image cap, only trials grow (and not past their cap)
    capped = interval([0.1, 0.5], np.full(1000, 0.6))
    assert next_size(capped, 0.01, random=True, images_cap=1000, trials_cap=3, step=128) == (3, 1000)
