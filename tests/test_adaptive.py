"""Adaptive sampling (layercrit.adaptive): the interval's coverage on a crossed model with known
mean, the round loop, and adaptive `measure` against fixed runs on the same images and trials."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from layercrit import Dataset, LayercritError, measure
from layercrit.analyses.adaptive import (
    FIRST_IMAGES,
    FIRST_TRIALS,
    Cell,
    evaluation_order,
    interval,
    next_size,
    run_rounds,
)
from layercrit.results import UNMODIFIED, VALUE_COLUMNS


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


# --- adaptive `measure` ---------------------------------------------------------------------------


class TwoPaths(nn.Module):
    """`side` is multiplied by 0 (re-randomizing it changes nothing: criticality 0 on every image);
    `head`'s logits are scaled by 1000, so the outputs are one-hot and a re-randomized head picks
    another of 1000 classes (criticality 1 − cos = 1, but on the ~0.1 % of images where it agrees)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 16)
        self.side = nn.Linear(4, 16)
        self.head = nn.Linear(16, 1000)

    def forward(self, x):
        return 1000.0 * self.head(torch.relu(self.trunk(x)) + 0.0 * self.side(x))


def _units(result) -> pd.DataFrame:
    t = result.table
    return t[t["layer"] != UNMODIFIED].groupby("layer", sort=False).agg(
        n=("n", "first"), trials=("trials_used", "first"), half=("half_width", "first"), mean=("criticality", "mean"),
        rows=("trial", "size"))


def test_zero_and_near_one_stop_after_the_first_round():
    torch.manual_seed(0)
    model = TwoPaths()
    x = torch.randn(2048, 4)
    r = measure(model, x, factory=TwoPaths, precision=0.01, batch_size=128)
    u = _units(r)
    assert u.loc["side", "mean"] < 1e-12 and u.loc["head", "mean"] > 0.99
    for layer in ("side", "head"):  # the first round: FIRST_TRIALS draws on FIRST_IMAGES images
        assert (u.loc[layer, "n"], u.loc[layer, "trials"], u.loc[layer, "rows"]) == (FIRST_IMAGES, FIRST_TRIALS, FIRST_TRIALS)
        assert u.loc[layer, "half"] <= 0.01
    assert r.config["adaptive"]["image_evaluations"] >= 3 * FIRST_TRIALS * FIRST_IMAGES


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


@pytest.mark.parametrize("executor", ["full", "auto"])
def test_adaptive_equals_a_fixed_run_on_the_same_images_and_trials(executor):
    """Every unit's rows are those of a fixed run with its trials on its images (the first `n` of
    `evaluation_order`), float for float; the unmodified row that of a fixed run on the most images."""
    torch.manual_seed(0)
    model = _small_cnn()
    g = torch.Generator().manual_seed(1)
    data = Dataset(torch.randn(1200, 3, 8, 8, generator=g), torch.randint(0, 10, (1200,), generator=g), spec="random")
    settings = {"factory": _small_cnn, "batch_size": 64, "executor": executor, "data_seed": 3}
    r = measure(model, data, precision=0.002, max_trials=8, images=640, **settings)
    u = _units(r)
    assert u["n"].nunique() > 1 or u["trials"].nunique() > 1  # units stopped at different sizes
    order = evaluation_order(data.subset(640, 3), 3)
    cols = [c for c in VALUE_COLUMNS + ["n", "seed", "trial", "n_nonfinite"] if c in r.table.columns]
    for layer, (n, trials) in u[["n", "trials"]].iterrows():
        prefix = Dataset(order.x[:n], order.y[:n], spec="prefix")
        fixed = measure(model, prefix, trials=int(trials), units=[layer], **settings).table
        got = r.table[r.table["layer"] == layer][cols].reset_index(drop=True)
        want = fixed[fixed["layer"] == layer][cols].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want, check_exact=True, check_dtype=False)
    n_max = int(u["n"].max())
    fixed = measure(model, Dataset(order.x[:n_max], order.y[:n_max], spec="prefix"), trials=1, units=[], **settings).table
    base_cols = ["n", "criticality", "accuracy", "top5", "loss"]
    pd.testing.assert_frame_equal(r.table[r.table["layer"] == UNMODIFIED][base_cols].reset_index(drop=True),
                                  fixed[fixed["layer"] == UNMODIFIED][base_cols].reset_index(drop=True), check_exact=True)


def test_summary_shows_images_trials_and_half_width():
    torch.manual_seed(0)
    r = measure(TwoPaths(), torch.randn(600, 4), factory=TwoPaths, precision=0.05, batch_size=100)
    s = r.summary().set_index("layer")
    assert {"n", "half_width", "trials"} <= set(s.columns)
    assert s.loc["head", "trials"] == FIRST_TRIALS and s.loc["head", "n"] == 600
    assert s.loc["head", "criticality_ci_high"] - s.loc["head", "criticality_mean"] == pytest.approx(s.loc["head", "half_width"])


def test_cli_table_and_report_show_images_trials_and_half_width(tmp_path):
    from layercrit.analyses.criticality import format_summary
    from layercrit.viz.report import build_report

    torch.manual_seed(0)
    r = measure(TwoPaths(), torch.randn(600, 4), factory=TwoPaths, precision=0.05, batch_size=100, model_name="toy")
    text = format_summary(r)
    header = next(line for line in text.splitlines() if line.startswith("layer"))
    assert "criticality % (mean ± 95 % CI)" in header and header.endswith("trials  images")
    assert "adaptive sampling to ±5 points:" in text
    head = next(line for line in text.splitlines() if line.startswith("head"))
    assert head.split()[-2:] == [str(FIRST_TRIALS), "600"]
    index = build_report(tmp_path / "report", results=r)
    html = (index if index.suffix == ".html" else index / "index.html").read_text()
    assert "adaptive sampling" in html and "± 95 % (points)" in html and "images" in html


@pytest.mark.parametrize("bad", [0, -0.01, float("nan"), True])
def test_precision_must_be_positive(bad):
    with pytest.raises(LayercritError, match=r"^Expected `precision` to be a positive half-width") as e:
        measure(TwoPaths(), torch.randn(8, 4), precision=bad)
    assert "\n" not in str(e.value)


def test_max_trials_needs_adaptive_sampling():
    with pytest.raises(LayercritError, match="`max_trials` caps adaptive sampling"):
        measure(TwoPaths(), torch.randn(8, 4), max_trials=5)


def test_cli_precision_not_positive_is_one_line(capsys):
    from layercrit.cli.app import main

    assert main(["measure", "--model", "fcn-3x64", "--data", "digits", "--precision", "0", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("layercrit: error: ") and "precision" in err and "\n" not in err


class Spread(nn.Module):
    """Three layers whose re-randomization costs very different amounts: well separated."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 10)
        self.b = nn.Linear(4, 10)
        self.c = nn.Linear(4, 10)

    def forward(self, x):
        return 20.0 * self.c(x) + 0.3 * self.b(x) + 0.0 * self.a(x)


def test_rank_only_stops_earlier_than_precision():
    torch.manual_seed(0)
    model, x = Spread(), torch.randn(4096, 4)
    precise = measure(model, x, factory=Spread, precision=0.002, batch_size=256)
    ranked = measure(model, x, factory=Spread, rank_only=True, batch_size=256)
    p, r = _units(precise), _units(ranked)
    assert list(p["mean"].sort_values().index) == list(r["mean"].sort_values().index)  # same order
    assert ranked.config["adaptive"]["image_evaluations"] < precise.config["adaptive"]["image_evaluations"]
    assert ranked.config["adaptive"]["rounds"] == 1


# --- zoo files, sweeps and the store --------------------------------------------------------------

USER_MODEL = '''
import torch.nn as nn

def make():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
'''
ZOO = '''
[defaults]
data = "digits:all"
probe = "rerandomize"
precision = 0.02
max_trials = 12
batch_size = 128
{extra}

[[model]]
id = "fcn"
factory = "userfcn.py:make"
weights = "w.pt"
'''


@pytest.fixture
def zoo_dir(tmp_path):
    (tmp_path / "userfcn.py").write_text(USER_MODEL)
    ns: dict = {}
    exec(USER_MODEL, ns)
    torch.manual_seed(0)
    torch.save(ns["make"]().state_dict(), tmp_path / "w.pt")
    return tmp_path


def _store_rows(path) -> pd.DataFrame:
    from layercrit.zoo.store import Store

    with Store(path, create=False) as s:
        t = s.results()
    keep = ["model", "layer", "probe", "target", "trial", "shift", "seed", "n", "criticality", "accuracy", "loss",
            "precision", "trials_used", "half_width"]
    return t[keep].sort_values(["shift", "layer", "trial"]).reset_index(drop=True)


def test_interrupted_adaptive_sweep_resumes_its_rounds(zoo_dir, monkeypatch):
    """Killed after its second round, a sweep run again continues each unit from the stored round (it
    does not evaluate the first rounds' images again) and stores the rows an uninterrupted sweep stores."""
    from layercrit.engine import engine as engine_module
    from layercrit.zoo import sweep as sweep_module
    from layercrit.zoo.store import Store
    from layercrit.zoo.sweep import sweep

    (zoo_dir / "zoo.toml").write_text(ZOO.format(extra='shifts = ["contrast:5"]'))
    sweep(zoo_dir / "zoo.toml", zoo_dir / "whole.sqlite", progress=False)
    whole = _store_rows(zoo_dir / "whole.sqlite")
    assert set(whole["shift"]) == {"none", "contrast:5"}
    units = whole[whole["layer"] != UNMODIFIED]
    assert (units["precision"] == 0.02).all() and units["trials_used"].min() >= FIRST_TRIALS
    assert (units["n"] > FIRST_IMAGES).any()  # some unit took a second round of images

    evaluated = []
    original = engine_module.Engine.evaluate

    def counting(self, perturbations, *args, **kwargs):
        s = kwargs.get("samples") or slice(0, 0)
        evaluated.append(len(perturbations) * (s.stop - s.start))
        return original(self, perturbations, *args, **kwargs)

    monkeypatch.setattr(engine_module.Engine, "evaluate", counting)
    saves = []
    save = sweep_module._StoreCheckpoint.save

    def interrupting(self, states):
        save(self, states)
        saves.append(len(states))
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep_module._StoreCheckpoint, "save", interrupting)
    with pytest.raises(KeyboardInterrupt):
        sweep(zoo_dir / "zoo.toml", zoo_dir / "cut.sqlite", progress=False)
    with Store(zoo_dir / "cut.sqlite") as s:
        kept = s.load_rounds("fcn", s.db.execute("SELECT DISTINCT config_hash FROM rounds").fetchone()[0])
    assert kept and all(state["trials"] >= FIRST_TRIALS for state in kept.values())
    before = sum(evaluated)
    monkeypatch.setattr(sweep_module._StoreCheckpoint, "save", save)
    sweep(zoo_dir / "zoo.toml", zoo_dir / "cut.sqlite", progress=False)
    resumed = sum(evaluated) - before
    evaluated.clear()
    sweep(zoo_dir / "zoo.toml", zoo_dir / "fresh.sqlite", progress=False)
    assert resumed < sum(evaluated)  # the stored rounds were not run again
    pd.testing.assert_frame_equal(_store_rows(zoo_dir / "cut.sqlite"), whole, check_exact=True)
    with Store(zoo_dir / "cut.sqlite") as s:
        assert s.db.execute("SELECT COUNT(*) FROM rounds").fetchone()[0] == 0  # finished units leave no rounds
        assert sweep(zoo_dir / "zoo.toml", s, progress=False).added == 0


def test_zoo_checks_the_adaptive_settings_and_shifts(zoo_dir):
    from layercrit.zoo.zoofile import load_zoo

    (zoo_dir / "bad.toml").write_text(ZOO.format(extra='shifts = ["fog:3", "contrast:9"]').replace(
        "precision = 0.02", "precision = 0").replace("max_trials = 12", "max_trials = 12\nrank_only = 1"))
    with pytest.raises(LayercritError) as e:
        load_zoo(zoo_dir / "bad.toml")
    text = "\n".join(e.value.problems)
    assert "`precision` should be a positive half-width" in text
    assert "`rank_only` should be true or false" in text
    assert "`shifts`" in text and "fog" in text
    (zoo_dir / "cap.toml").write_text(ZOO.format(extra="").replace("precision = 0.02", ""))
    with pytest.raises(LayercritError) as e:
        load_zoo(zoo_dir / "cap.toml")
    assert "`max_trials` caps adaptive sampling" in "\n".join(e.value.problems)
    (zoo_dir / "ok.toml").write_text(ZOO.format(extra='rank_only = true\nshifts = ["contrast"]'))
    s = load_zoo(zoo_dir / "ok.toml").entries[0].settings
    assert s["precision"] == 0.02 and s["rank_only"] is True and s["shifts"] == [f"contrast:{k}" for k in range(1, 6)]


def test_a_version_1_store_is_migrated_and_keeps_its_rows(tmp_path):
    import sqlite3

    from layercrit.zoo.store import SCHEMA_VERSION, Store

    path = tmp_path / "v1.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE results (
            model TEXT NOT NULL, layer TEXT NOT NULL, probe TEXT NOT NULL, target TEXT NOT NULL, trial INTEGER NOT NULL,
            config_hash TEXT NOT NULL, label TEXT, seed INTEGER, n INTEGER, n_params INTEGER,
            criticality REAL, accuracy REAL, top5 REAL, accuracy_drop REAL, agreement REAL, l1 REAL, l2 REAL, kl REAL,
            loss REAL, extra TEXT, data_identity TEXT, run_id INTEGER, created REAL,
            PRIMARY KEY (model, layer, probe, target, trial, config_hash));
        CREATE INDEX results_model ON results (model, probe);
        INSERT INTO results (model, layer, probe, target, trial, config_hash, label, seed, n, criticality)
            VALUES ('m', 'fc1', 'rerandomize', 'rerandomize', 0, 'h', 'fc1', 7, 100, 0.25);
    """)
    db.close()
    with Store(path, create=False) as s:
        rows = s.results()
        assert s.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
        # the same unit on shifted data is a row of its own now
        s.add_results([{"model": "m", "layer": "fc1", "probe": "rerandomize", "target": "rerandomize", "trial": 0,
                        "shift": "contrast:5", "criticality": 0.5}], "h")
        assert len(s.results()) == 2
    assert rows.loc[0, "criticality"] == 0.25 and rows.loc[0, "shift"] == "none" and rows.loc[0, "seed"] == 7
    assert pd.isna(rows.loc[0, "half_width"])
