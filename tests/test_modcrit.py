import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from layercrit import Dataset, LayercritError, TrainConfig, load_data, select_units, train
from layercrit.analyses.generalization import complexity_measures, rank_measures
from layercrit.analyses.modcrit import ModcritConfig, module_criticality
from layercrit.engine.probes import Interpolate, gaussian_noise
from layercrit.seeding import derive_seed
from layercrit.training.checkpoints import Run


def _toy():
    """logits = W x with W (2x1); x = +1 has label 0, x = -1 label 1: both right iff d = W0 - W1 > 0."""
    model = nn.Sequential(nn.Linear(1, 2, bias=False))
    theta0 = {"0.weight": torch.tensor([[0.0], [0.2]])}  # d0 = -0.2: the init gets both wrong
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.4], [0.0]]))  # dF = 0.4
    data = Dataset(torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1]), spec="toy")
    return model, theta0, data


def test_linear_toy_matches_the_hand_solution():
    """d(α) = -0.2 + 0.6α. With noise u, d + σζ_m (ζ_m = z_m0 - z_m1 of draw m) decides both samples, so
    the estimated error at σ is the fraction of draws with σζ_m ≤ -d. It stays ≤ ε while fewer than
    k = ⌊εM⌋ + 1 draws cross: σ_max(α) = d(α) / -ζ_(k) (ζ_(k) the k-th smallest), infeasible for d ≤ 0.
    μ(α) = α²Δ/σ_max², Δ = 0.4² + 0.2² = 0.2, decreasing in α: μ* = 0.2 ζ_(k)² / 0.16 at α* = 1.
    """
    model, theta0, data = _toy()
    m_draws, eps, rtol = 200, 0.1, 0.01
    r = module_criticality(model, data, theta0, epsilon=eps, noise_draws=m_draws, sigma_rtol=rtol, batch_size=2)
    zeta = torch.tensor([float((z := gaussian_noise(torch.zeros(2, 1), derive_seed(0, "0", m), "0.weight"))[0, 0] - z[1, 0])
                         for m in range(m_draws)])
    k = int(eps * m_draws) + 1
    zk = float(torch.sort(zeta).values[k - 1])
    assert zk < 0
    curve = r.curve.set_index("alpha")
    for a, row in curve.iterrows():
        d = -0.2 + 0.6 * a
        if d <= 0:
            assert math.isnan(row["sigma_max"]), a
            continue
        true = min(1.0, d / -zk)
        assert true / (1 + rtol) <= row["sigma_max"] <= true * (1 + 1e-12), (a, row["sigma_max"], true)
    best = r.table.iloc[0]
    assert best["alpha"] == 1.0
    assert best["mu"] == pytest.approx(0.2 * zk**2 / 0.16, rel=2.1 * rtol)
    assert best["delta_norm"] == pytest.approx(math.sqrt(0.2))
    assert best["mu"] == pytest.approx(r.network["network_criticality"].iloc[0])
    assert r.network["pac_bayes"].iloc[0] == pytest.approx(best["mu"])  # α* = 1: both sums agree


def test_module_multiplied_by_zero_has_zero_criticality():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.dead = nn.Linear(4, 3)
            self.live = nn.Linear(4, 3)

        def forward(self, x):
            return self.live(x) + 0.0 * self.dead(x)

    torch.manual_seed(0)
    model = Gated()
    theta0 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x = torch.randn(64, 4)
    data = Dataset(x, model(x).argmax(1).detach(), spec="own-predictions")
    r = module_criticality(model, data, theta0, epsilon=0.1, noise_draws=4).table.set_index("module")
    assert r.loc["dead", "mu"] == 0.0 and r.loc["dead", "alpha"] == 0.0
    assert r.loc["live", "mu"] > 0


@pytest.fixture(scope="module")
def fcn_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("mc") / "fcn"
    train(TrainConfig(model="fcn-3x64", data="digits:train", epochs=30), d)
    return Run(d)


SETTINGS = {"train_subset": 300, "noise_draws": 8, "alphas": 11, "layers": ["fc2", "classifier"]}


def test_monotone_in_epsilon_deterministic_and_pruned_agrees(fcn_run):
    data = load_data("digits:train")
    a = module_criticality(fcn_run.model(), data, fcn_run.state_dict(0), epsilon=[0.01, 0.05, 0.2], **SETTINGS)
    b = module_criticality(fcn_run.model(), data, fcn_run.state_dict(0), epsilon=[0.01, 0.05, 0.2], **SETTINGS)
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.curve, b.curve)
    for _, g in a.table.groupby("module"):
        mu = g.sort_values("epsilon")["mu"].fillna(np.inf).to_list()
        assert all(b <= a for a, b in zip(mu, mu[1:])), g
    fast = module_criticality(fcn_run.model(), data, fcn_run.state_dict(0), epsilon=[0.01, 0.05, 0.2], curve=False, **SETTINGS)
    assert fast.evaluations < a.evaluations
    np.testing.assert_allclose(fast.table["mu"], a.table["mu"], rtol=0.021)  # two bisection tolerances
    np.testing.assert_allclose(fast.network["pac_bayes"], a.network["pac_bayes"], rtol=0.021)


def test_optimum_is_feasible_with_fresh_noise_and_lower_alpha_is_not(fcn_run):
    data = load_data("digits:train").subset(300, 0)
    model, theta0 = fcn_run.model(), fcn_run.state_dict(0)
    eps = 0.02
    r = module_criticality(model, data, theta0, epsilon=eps, **SETTINGS)
    units = {u.name: u for u in select_units(model)}
    checked_lower = False
    for _, row in r.table.iterrows():
        assert row["feasible"]
        unit, draws = units[row["module"]], 64

        def error(alpha, sigma, unit=unit, draws=draws):
            errs = []
            probe = Interpolate(theta0, alpha, sigma)
            for m in range(draws):  # fresh noise: another seed than the search's
                with probe.apply(model, unit, seed=10_000 + m):
                    errs.append(float((model(data.x).argmax(1) != data.y).float().mean()))
            return float(np.mean(errs)), float(np.std(errs, ddof=1) / math.sqrt(draws))

        mean, se = error(row["alpha"], row["sigma"])
        assert mean <= eps + 3 * se + 1e-9, (row["module"], mean, se)
        if row["alpha"] > 0:
            lower, se = error(row["alpha"] - 0.1, row["sigma"])
            assert lower > eps - 3 * se, (row["module"], lower, se)
            checked_lower = True
    assert checked_lower


def test_infeasible_module_is_reported():
    model, _, data = _toy()
    data = Dataset(data.x, 1 - data.y, spec="flipped")  # the trained model (d > 0) gets both wrong...
    theta0 = {"0.weight": torch.tensor([[0.3], [0.0]])}  # ...and so does every point of the path
    r = module_criticality(model, data, theta0, epsilon=0.1, noise_draws=4)
    row = r.table.iloc[0]
    assert not row["feasible"] and math.isnan(row["mu"]) and "infeasible" in row["note"]
    assert math.isnan(r.network["network_criticality"].iloc[0])


def test_config_errors():
    with pytest.raises(LayercritError, match="Expected `noise_draws` to be an integer ≥ 1, got 0"):
        ModcritConfig(noise_draws=0)
    with pytest.raises(LayercritError, match="Expected `epsilon` to be non-negative"):
        ModcritConfig(epsilon=[-0.1])
    with pytest.raises(LayercritError, match="Expected `loss` to be one of"):
        ModcritConfig(loss="hinge")


def test_rank_measures_against_scipy_by_hand():
    """GE ranks the models a < b < c < d; `good` ranks them the same (τ = 1), `bad` reversed (τ = -1)."""
    models = pd.DataFrame({"model": list("abcd"), "ge": [0.1, 0.2, 0.3, 0.4], "good": [1, 5, 6, 9],
                           "bad": [4, 3, 2, 1], "nan": [1.0, np.nan, 2.0, 3.0]})
    r = rank_measures(models).set_index("measure")
    assert r.loc["good", "kendall_tau"] == pytest.approx(1.0) and r.loc["good", "spearman_rho"] == pytest.approx(1.0)
    assert r.loc["bad", "kendall_tau"] == pytest.approx(-1.0)
    assert r.loc["good", "kendall_p"] == pytest.approx(1 / 12)  # exact test: 1 of 4! orderings, two-sided
    assert r.loc["nan", "n"] == 3


def test_complexity_measures_by_hand(fcn_run):
    row, _ = complexity_measures(fcn_run, epsilon=[0.5], train_subset=100, noise_draws=2, alphas=3)
    model, theta0 = fcn_run.model(), fcn_run.state_dict(0)
    names = ["fc1", "fc2", "fc3", "classifier"]
    pfn = sum(math.log10(math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.get_submodule(n).parameters()))) for n in names)
    psn = sum(math.log10(float(torch.linalg.svdvals(model.get_submodule(n).weight.detach().double())[0])) for n in names)
    dti = sum(float((p.detach().double() - theta0[k].double()).pow(2).sum()) for k, p in model.named_parameters())
    assert row["log10_pfn"] == pytest.approx(pfn) and row["log10_psn"] == pytest.approx(psn)
    assert row["dti"] == pytest.approx(dti) and row["nop"] == sum(p.numel() for p in model.parameters())
    metrics = fcn_run.checkpoint(fcn_run.final_epoch)["metrics"]
    assert row["ge"] == pytest.approx(metrics["test_error"] - metrics["train_error"])


def test_cli_modcrit_and_rank(fcn_run, tmp_path):
    other = tmp_path / "fcn-wide"
    train(TrainConfig(model="fcn-1x256", data="digits:train", epochs=5), other)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "layercrit", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    common = ["--train-subset", "200", "--noise-draws", "2", "--alphas", "5", "--quiet"]
    r = cli("modcrit", str(fcn_run.path), *common, "--out", "mc.csv")
    assert r.returncode == 0, r.stderr
    assert "network_criticality" in r.stdout and "full-model evaluations" in r.stdout
    assert {"module", "alpha", "sigma", "mu", "delta_norm", "n_params", "epsilon"} <= set(pd.read_csv(tmp_path / "mc.csv").columns)
    assert len(pd.read_csv(tmp_path / "mc.curve.csv")) == 4 * 5
    r = cli("rank", str(fcn_run.path), str(other), *common, "--out", "rank.json")
    assert r.returncode == 0, r.stderr
    assert "kendall_tau" in r.stdout and (tmp_path / "rank.ranking.json").is_file()
    r = cli("rank", str(fcn_run.path), "--quiet")
    assert r.returncode == 2 and "at least two checkpoint folders" in r.stderr
    r = cli("modcrit", str(fcn_run.path), "--noise-draws", "0")
    assert r.returncode == 2 and "Expected `noise_draws`" in r.stderr


def test_progress_has_a_planned_total_that_ends_exact_and_a_long_run_says_how_to_shorten(monkeypatch, capsys):
    """The bar's total is planned before the search (an upper bound) and lowered as points are ruled
    out: it never falls below what is done and ends equal to the evaluations spent. A run estimated
    above LONG_RUN_SECONDS (here 0) prints once how to make it shorter."""
    import layercrit.analyses.modcrit as mc

    bars = []

    class Recording(mc.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.seen = [(self.n, self.total)]
            bars.append(self)

        def update(self, n=1):
            super().update(n)
            self.seen.append((self.n, self.total))

    monkeypatch.setattr(mc, "tqdm", Recording)
    monkeypatch.setattr(mc, "LONG_RUN_SECONDS", 0.0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    theta0 = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x = torch.randn(32, 4)
    data = Dataset(x, model(x).argmax(1).detach(), spec="own-predictions")
    for curve in (True, False):
        bars.clear()
        r = module_criticality(model, data, theta0, epsilon=[0.05, 0.2], noise_draws=3, alphas=5, curve=curve, progress=True)
        (bar,) = bars
        first_total = bar.seen[0][1]
        config = ModcritConfig(epsilon=[0.05, 0.2], noise_draws=3, alphas=5, curve=curve)
        assert first_total == 2 * mc.planned_evaluations(config, 2) > 0
        assert all(n <= total for n, total in bar.seen)
        assert bar.n == bar.total == r.evaluations <= first_total
        err = capsys.readouterr().err
        assert err.count("module criticality will take up to") == 1
        assert ("--fast" in err) == curve and "--train-subset" in err
