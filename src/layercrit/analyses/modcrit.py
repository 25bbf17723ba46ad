"""Module criticality (Chatterji, Neyshabur & Sedghi 2020, Def. 3.1).

For module i with trained θᶠ and initial θ⁰, θ(α) = (1−α)θ⁰ + αθᶠ:

    μ_i(ε) = min over 0 ≤ α ≤ 1, 0 < σ ≤ 1 of α²‖θᶠ−θ⁰‖²_F / σ²
             subject to E_{u~N(0,σ²I)} [L_S(f with θ_i = θ(α) + u, others at θᶠ)] ≤ ε

Search: α on a grid; for each α the largest feasible σ by bisection on log σ in [σ_min, 1],
assuming the feasible σ form an interval (0, σ_max]. The expectation is the mean over M noise
draws. Draw m of module i uses the same standard-normal direction z_m at every (α, σ), u = σ·z_m
(common random numbers), so the estimated loss changes smoothly along the search. All ε share the
evaluations; the points of every α (and ε) run together in one engine pass per bisection step.

Progress: the evaluations are planned from the α grid and the bisection bounds before the search
(an upper bound: the bar's total), and the plan is lowered as the search rules points out, so the
bar shows a total and an ETA throughout; a run planned to take long says once how to shorten it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .._utils.display import format_percent, text_table
from ..data import Dataset, load_data
from ..engine.engine import Engine, Perturbation, RunSettings
from ..engine.probes import Interpolate, gaussian_noise
from ..errors import LayercritError, check_int
from ..seeding import derive_seed
from ..units.layers import Unit, select_units

__all__ = ["ModcritConfig", "ModcritResult", "describe_search", "format_modcrit", "module_criticality", "network_note",
           "run_module_criticality"]

LOSSES = {"error": "accuracy", "cross-entropy": "loss"}


@dataclass
class ModcritConfig(RunSettings):
    """Settings of a module-criticality computation (saved with its results); how it runs: `RunSettings`."""

    epsilon: list[float] = field(default_factory=lambda: [0.1])  # training-loss thresholds ε
    relative: bool = False  # ε counts above the trained model's own training loss
    alphas: int = 21  # α grid points in [0, 1], both ends included
    noise_draws: int = 8  # Monte-Carlo draws M of u per (α, σ)
    sigma_min: float = 1e-4  # smallest σ tried; infeasible there means infeasible at this α
    sigma_rtol: float = 0.01  # bisection stops when σ_hi / σ_lo ≤ 1 + sigma_rtol
    loss: str = "error"  # L_S: "error" (0-1, the paper's) or "cross-entropy"
    train_subset: int | None = None  # seeded subset of the training set (None: all of it)
    data_seed: int = 0  # seed of that subset
    seed: int = 0  # noise seed
    curve: bool = True  # search every α (the whole curve); False: only the α that can lower μ
    layers: list[str] | None = None  # name/label globs of the modules
    granularity: str = "layer"  # "layer", "block", "attn" or "mlp" (see `select_units`)
    include_norm: bool = False
    batch_size: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.epsilon, (int, float)):
            self.epsilon = [float(self.epsilon)]
        if not self.epsilon or any(not (isinstance(e, (int, float)) and e >= 0) for e in self.epsilon):
            raise LayercritError(f"Expected `epsilon` to be non-negative numbers, got {self.epsilon!r}")
        self.epsilon = sorted(float(e) for e in self.epsilon)
        for name, low in (("alphas", 2), ("noise_draws", 1)):
            check_int(name, getattr(self, name), low, f"an integer ≥ {low}")
        if not 0 < self.sigma_min < 1:
            raise LayercritError(f"Expected `sigma_min` in (0, 1), got {self.sigma_min!r}")
        if not self.sigma_rtol > 0:
            raise LayercritError(f"Expected `sigma_rtol` to be positive, got {self.sigma_rtol!r}")
        if self.loss not in LOSSES:
            raise LayercritError(f"Expected `loss` to be one of {', '.join(LOSSES)}, got {self.loss!r}")

    @property
    def bisection_steps(self) -> int:
        span = math.log(1 / self.sigma_min)
        return max(1, math.ceil(math.log2(span / math.log1p(self.sigma_rtol))))


@dataclass
class ModcritResult:
    """Module criticality of one model.

    Attributes:
        table: one row per (module, ε): `module, label, epsilon, alpha, sigma, mu, delta_norm,
            n_params, feasible, loss`, where `loss` is the estimated training loss at (α*, σ*).
        curve: one row per (module, ε, α): `sigma_max` (NaN where infeasible), `loss` at σ_max,
            `mu`, and `loss_no_noise` (the loss at θ(α) itself).
        network: one row per ε: network criticality Σμ_i and the PAC-Bayes sum Σ‖θᶠ−θ⁰‖²/σ_i² at α = 1.
        evaluations: full-model evaluations of the training set spent.
        config: the resolved configuration.
    """

    table: pd.DataFrame
    curve: pd.DataFrame
    network: pd.DataFrame
    evaluations: int
    config: dict

    def save(self, path: str | Path) -> list[Path]:
        """`.csv`: the per-module table, with `<stem>.curve.csv`, `<stem>.network.csv` and
        `<stem>.config.json` beside it; `.json`: one document with all of them."""
        from ..results import save_table

        config = self.config | {"evaluations": self.evaluations}
        extra = {"curve": self.curve, "network": self.network}
        path = save_table(self.table, path, config, extra)
        if path.suffix.lower() != ".csv":
            return [path]
        return [path] + [save_table(v, path.with_suffix(f".{k}.csv")) for k, v in extra.items()]


LONG_RUN_SECONDS = 60.0  # a run planned to take longer says how to make it shorter


def planned_evaluations(config: ModcritConfig, thresholds: int) -> int:
    """Upper bound on the evaluations of one module: σ = 1 and σ = σ_min at every α, a full bisection
    for every (ε, α), and the noise-free loss at every α (full curve); with `curve=False`, at most
    every α and α = 1 once more per ε, each with σ = floor, σ = 1 and a full bisection."""
    m, a, steps = config.noise_draws, config.alphas, config.bisection_steps
    if config.curve:
        return a * m * (2 + thresholds * steps) + a
    return thresholds * (a + 1) * (2 + steps) * m + a


class _Progress:
    """The evaluations bar; its total is the plan (an upper bound), lowered as points are ruled out."""

    def __init__(self, total: int, desc: str, enabled: bool, config: ModcritConfig, n: int) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="eval", disable=not enabled, leave=False)
        self.config, self.n, self.hinted = config, n, not enabled
        self.t0 = time.perf_counter()
        self.passes: list[tuple[float, int]] = []  # (time, evaluations done) at the end of the first engine passes

    def done(self, count: int) -> None:
        self.bar.update(count)
        if len(self.passes) < 2:
            self.passes.append((time.perf_counter(), self.bar.n))

    def before_pass(self) -> None:
        """Once, before an engine pass and after the plan was lowered by what the last pass ruled out:
        estimate the run from the rate of the second pass (the first also pays for tracing and
        warm-up; if it alone took long, from it) and, if long, say how to make it shorter."""
        if self.hinted or not self.passes:
            return
        now = time.perf_counter()
        if len(self.passes) == 2:
            (t1, n1), (t2, n2) = self.passes
            rate = (n2 - n1) / max(t2 - t1, 1e-9)
        elif now - self.t0 > LONG_RUN_SECONDS:
            rate = self.passes[0][1] / max(self.passes[0][0] - self.t0, 1e-9)
        else:
            return
        self.hinted = True
        estimate = now - self.t0 + (self.bar.total - self.bar.n) / max(rate, 1e-9)
        if estimate > LONG_RUN_SECONDS:
            tqdm.write(self.hint(estimate, rate), file=sys.stderr)

    def unplan(self, count: int) -> None:
        if count > 0:
            self.bar.total -= count
            self.bar.refresh()

    def hint(self, seconds: float, rate: float) -> str:
        c = self.config
        ways = ["--fast (curve=False: only the α that can lower μ, no full curve)"] if c.curve else []
        ways.append(f"--train-subset N (train_subset=N; now all {self.n:,} training samples)" if c.train_subset is None
                    else f"a smaller --train-subset (now {self.n:,})")
        ways.append(f"fewer --alphas (now {c.alphas}) or --noise-draws (now {c.noise_draws})")
        return (f"layercrit: module criticality will take up to ~{_duration(seconds)} "
                f"({self.bar.total:,} evaluations planned at most, {rate:.0f}/s); "
                f"faster: {'; '.join(ways)}")

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class _Search:
    """Expected training loss at (α, σ) for one module, memoized; evaluated in batches of points.

    The values are those of `Interpolate(reference, α, σ).values(model, unit, seed_m)`, with θ⁰, θᶠ
    and the noise directions z_m computed once per module. `planned` is this module's share of the
    progress bar's total, lowered (`unplan`) as the search rules points out.
    """

    def __init__(self, engine: Engine, model: nn.Module, unit: Unit, reference: Mapping[str, torch.Tensor],
                 config: ModcritConfig, progress: _Progress, planned: int) -> None:
        self.engine, self.unit, self.config, self.progress, self.planned = engine, unit, config, progress, planned
        self.measure = LOSSES[config.loss]
        params = dict(model.named_parameters())
        self.final = {n: params[n].detach().clone() for n in unit.params}
        self.init = {n: reference[n].to(v.device, v.dtype) for n, v in self.final.items()}
        seeds = [derive_seed(config.seed, unit.name, m) for m in range(config.noise_draws)]
        self.noise = [{n: gaussian_noise(v, s, n) for n, v in self.final.items()} for s in seeds]
        self.known: dict[tuple[float, float], float] = {}
        self.evaluations = 0

    def _values(self, alpha: float, sigma: float, m: int):
        def values():
            out = {n: torch.lerp(self.init[n], v, alpha) for n, v in self.final.items()}
            return {n: v + sigma * self.noise[m][n] for n, v in out.items()} if sigma > 0 else out

        return values

    def losses(self, points: Sequence[tuple[float, float]]) -> list[float]:
        todo = list(dict.fromkeys(p for p in points if p not in self.known))
        if todo:
            self.progress.before_pass()
            perts = [Perturbation((a, s, m), self._values(a, s, m))
                     for a, s in todo for m in range(self.config.noise_draws if s > 0 else 1)]  # σ = 0: deterministic
            _, out = self.engine.evaluate(perts, desc=self.unit.label)
            by_point: dict[tuple[float, float], list[float]] = {}
            for (a, s, _), measures in out.items():
                v = measures[self.measure]
                by_point.setdefault((a, s), []).append(1.0 - v if self.measure == "accuracy" else v)
            for p, values in by_point.items():
                self.known[p] = sum(values) / len(values)
            self.evaluations += len(perts)
            self.progress.done(len(perts))
        return [self.known[p] for p in points]

    def unplan(self, count: int) -> None:
        """`count` planned evaluations will not happen (never below those already done)."""
        count = min(count, self.planned - self.evaluations)
        self.planned -= count
        self.progress.unplan(count)


def _bisect(search: _Search, brackets: dict, rtol: float) -> dict:
    """Parallel bisection on log σ. `brackets`: {(threshold, α): (feasible σ, infeasible σ)};
    returns {(threshold, α): largest σ evaluated feasible}."""
    brackets = dict(brackets)
    while brackets:
        open_ = {k: (lo, hi) for k, (lo, hi) in brackets.items() if hi / lo > 1 + rtol}
        if not open_:
            break
        mids = {k: math.sqrt(lo * hi) for k, (lo, hi) in open_.items()}  # the midpoint on log σ
        values = search.losses([(k[1], m) for k, m in mids.items()])
        for (k, m), v in zip(mids.items(), values):
            lo, hi = brackets[k]
            brackets[k] = (m, hi) if v <= k[0] else (lo, m)
    return {k: lo for k, (lo, _) in brackets.items()}


def _full_search(search: _Search, alphas: list[float], thresholds: list[float], config: ModcritConfig) -> dict:
    """σ_max at every (threshold, α) (NaN where infeasible): the whole curve."""
    tracks: dict = {}
    m, steps = config.noise_draws, config.bisection_steps
    at_one = dict(zip(alphas, search.losses([(a, 1.0) for a in alphas])))
    open_ = [(e, a) for e in thresholds for a in alphas if at_one[a] > e]
    tracks |= {(e, a): 1.0 for e in thresholds for a in alphas if at_one[a] <= e}
    mins = sorted({a for _, a in open_})
    search.unplan((len(alphas) - len(mins)) * m + (len(thresholds) * len(alphas) - len(open_)) * steps * m)
    at_min = dict(zip(mins, search.losses([(a, config.sigma_min) for a in mins])))
    tracks |= {(e, a): math.nan for e, a in open_ if at_min[a] > e}
    search.unplan(sum(at_min[a] > e for e, a in open_) * steps * m)
    return tracks | _bisect(search, {(e, a): (config.sigma_min, 1.0) for e, a in open_ if at_min[a] <= e}, config.sigma_rtol)


def _largest_sigma(search: _Search, threshold: float, alpha: float, floor: float, config: ModcritConfig) -> float:
    """Largest feasible σ in [floor, 1] at α, or NaN when σ = floor is already infeasible."""
    if search.losses([(alpha, floor)])[0] > threshold:
        return math.nan
    if search.losses([(alpha, 1.0)])[0] <= threshold:
        return 1.0
    return _bisect(search, {(threshold, alpha): (floor, 1.0)}, config.sigma_rtol)[(threshold, alpha)]


def _pruned_search(search: _Search, alphas: list[float], thresholds: list[float], config: ModcritConfig,
                   delta2: float) -> dict:
    """Only what μ needs: α ascending, skipping every α that provably cannot beat the best μ so far
    (α²Δ ≥ μ_best, or σ = α·√(Δ/μ_best) already infeasible), plus α = 1 for the PAC-Bayes sum."""
    tracks: dict = {}
    for e in thresholds:
        best = math.inf
        for a in alphas:
            if a * a * delta2 >= best:
                break
            floor = config.sigma_min if math.isinf(best) else max(config.sigma_min, a * math.sqrt(delta2 / best))
            if floor > 1:
                break
            s = _largest_sigma(search, e, a, floor, config)
            if not math.isnan(s):
                tracks[(e, a)] = s
                best = min(best, a * a * delta2 / (s * s))
            elif math.isinf(best):
                tracks[(e, a)] = math.nan  # infeasible at σ_min: a true point of the curve
        if (e, 1.0) not in tracks:
            tracks[(e, 1.0)] = _largest_sigma(search, e, 1.0, config.sigma_min, config)
    return tracks


def _monotone_in_epsilon(tracks: dict, alphas: list[float], thresholds: list[float]) -> None:
    """Feasible under a smaller ε is feasible under a larger one: keep σ_max (so μ) monotone in ε."""
    for a in alphas:
        best = math.nan
        for e in thresholds:
            if (e, a) not in tracks:
                continue
            s = tracks[(e, a)]
            best = s if math.isnan(best) else (best if math.isnan(s) else max(best, s))
            tracks[(e, a)] = best


def module_criticality(
    model: nn.Module,
    data: Dataset,
    reference: Mapping[str, torch.Tensor],
    *,
    progress: bool = False,
    model_name: str = "model",
    **settings,
) -> ModcritResult:
    """Module criticality μ_i(ε) of every module of `model` and the network criticality Σμ_i.

    Args:
        model: the trained model (θᶠ; left unchanged).
        data: the training set S (labelled).
        reference: the initial state dict θ⁰ (checkpoint 0).
        progress: show progress bars.
        model_name: name in the results.
        **settings: fields of `ModcritConfig`.
    """
    config = ModcritConfig(**settings)
    data = data.subset(config.train_subset, config.data_seed)
    if data.y is None:
        raise LayercritError(f"module criticality needs the labelled training set; {data.spec!r} has no labels")
    units = select_units(model, layers=config.layers, include_norm=config.include_norm, granularity=config.granularity)
    Interpolate(reference).check(model, units)
    engine = Engine.from_config(model, data.x, data.y, config, measures=[LOSSES[config.loss]])
    base, _ = engine.evaluate([])
    base_loss = 1.0 - base["accuracy"] if config.loss == "error" else base["loss"]
    thresholds = [e + base_loss if config.relative else e for e in config.epsilon]
    alphas = [i / (config.alphas - 1) for i in range(config.alphas)]
    params = dict(model.named_parameters())
    rows, curve, total = [], [], 0
    per_unit = planned_evaluations(config, len(thresholds))
    bar = _Progress(per_unit * len(units), f"{model_name}: module criticality (total: planned upper bound)",
                    progress, config, len(data))
    try:
        for unit in units:
            search = _Search(engine, model, unit, reference, config, bar, per_unit)
            params_delta = [(params[p].detach().double() - reference[p].to(params[p].device).double()) for p in unit.params]
            delta2 = sum(float(d.pow(2).sum()) for d in params_delta)
            if config.curve:
                tracks = _full_search(search, alphas, thresholds, config)
            else:
                tracks = _pruned_search(search, alphas, thresholds, config, delta2)
            _monotone_in_epsilon(tracks, alphas, thresholds)
            no_noise = dict(zip(alphas, search.losses([(a, 0.0) for a in alphas])))
            for eps, thr in zip(config.epsilon, thresholds):
                best = (math.inf, math.nan, math.nan)
                for a in alphas:
                    if (thr, a) not in tracks:  # skipped by the pruned search
                        continue
                    s = tracks[(thr, a)]
                    mu = a * a * delta2 / (s * s) if not math.isnan(s) else math.nan
                    loss = search.known.get((a, s), math.nan) if not math.isnan(s) else math.nan
                    curve.append({"model": model_name, "module": unit.name, "label": unit.label, "epsilon": eps,
                                  "threshold": thr, "alpha": a, "sigma_max": s, "loss": loss, "mu": mu,
                                  "loss_no_noise": no_noise[a]})
                    if not math.isnan(mu) and mu < best[0]:
                        best = (mu, a, s)
                feasible = math.isfinite(best[0])
                rows.append({
                    "model": model_name, "module": unit.name, "label": unit.label, "epsilon": eps, "threshold": thr,
                    "alpha": best[1], "sigma": best[2], "mu": best[0] if feasible else math.nan,
                    "delta_norm": math.sqrt(delta2), "n_params": unit.n_params, "feasible": feasible,
                    "loss": search.known.get((best[1], best[2]), math.nan) if feasible else math.nan,
                    "note": "" if feasible else (
                        f"infeasible: even α=1 with σ={config.sigma_min:g} has training {config.loss} above "
                        + (f"{thr * 100:.2f} %" if config.loss == "error" else f"{thr:.4g}")),
                })
            total += search.evaluations
            search.unplan(search.planned - search.evaluations)  # the plan of a finished module is what it did
    finally:
        bar.close()
    table, curve_df = pd.DataFrame(rows), pd.DataFrame(curve)
    network = []
    for eps in config.epsilon:
        t = table[table["epsilon"] == eps]
        at_one = curve_df[(curve_df["epsilon"] == eps) & (curve_df["alpha"] == 1.0)]
        pac = (at_one["mu"]).sum() if at_one["mu"].notna().all() else math.nan
        bad = int((~t["feasible"]).sum())
        network.append({"model": model_name, "epsilon": eps, "threshold": float(t["threshold"].iloc[0]),
                        "network_criticality": float(t["mu"].sum()) if t["feasible"].all() else math.nan,
                        "pac_bayes": float(pac), "modules": len(t), "infeasible_modules": bad,
                        "train_loss": base_loss})
        network[-1]["note"] = network_note(network[-1], config.loss)
    resolved = asdict(config) | {"model": model_name, "data": data.spec, "data_identity": data.identity,
                                 "n": len(data), "bisection_steps": config.bisection_steps,
                                 "base_train_loss": base_loss, **engine.stats()}
    return ModcritResult(table, curve_df, pd.DataFrame(network), total, resolved)


def network_note(row: Mapping, loss: str = "error") -> str:
    """Why a row of `ModcritResult.network` has no network criticality or PAC-Bayes sum (NaN), or ""."""
    notes = []
    if math.isnan(row["network_criticality"]):
        notes.append(f"{row['infeasible_modules']} of {row['modules']} modules infeasible: training {loss} above the "
                     f"threshold even at α = 1")
    if "pac_bayes" in row and math.isnan(row["pac_bayes"]):
        notes.append("pac_bayes undefined: a module exceeds the threshold at α = 1 for every σ searched")
    return "; ".join(notes)


def run_module_criticality(run, data: Dataset | str | None = None, *, progress: bool = False, **settings) -> ModcritResult:
    """Module criticality of a training run's final model against its checkpoint 0.

    Args:
        run: a checkpoint folder written by `layercrit train` (or an opened `Run`).
        data: the training set (default: the run's own training data).
        progress: show progress bars.
        **settings: fields of `ModcritConfig`.
    """
    from ..training.checkpoints import Run

    run = run if isinstance(run, Run) else Run(run)
    spec = data if data is not None else run.train_data
    dataset = spec if isinstance(spec, Dataset) else load_data(spec, split="train")
    return module_criticality(run.model(), dataset, run.state_dict(0), progress=progress,
                              model_name=run.path.name, **settings)


def format_modcrit(result: ModcritResult) -> str:  # noqa: F821 (annotation only; modcrit is imported lazily)
    """The tables printed by `modcrit`: per module and per ε (training errors in %), with the
    search settings the numbers depend on and a note where a number is undefined."""
    loss = result.config.get("loss", "error")
    pct = {"epsilon": format_percent, "threshold": format_percent, "loss": format_percent} if loss == "error" else {}
    titles = {k: f"{k} %" for k in pct}
    t = result.table[["label", "epsilon", "alpha", "sigma", "mu", "delta_norm", "n_params", "loss", "note"]]
    net = result.network.assign(note=[network_note(r, loss) for _, r in result.network.iterrows()])
    net = net[["epsilon", "threshold", "network_criticality", "pac_bayes", "infeasible_modules", "note"]]
    if not net["note"].astype(bool).any():
        net = net.drop(columns="note")
    own = result.config["base_train_loss"]
    return "\n".join([
        text_table(t, pct, titles), "", text_table(net, pct, titles),
        f"search: {describe_search(result.config)}",
        f"{result.evaluations:,} full-model evaluations; training {loss} of the model itself: "
        + (f"{format_percent(own)} %" if loss == "error" else f"{own:.4g}"),
    ])


def describe_search(config: Mapping) -> str:
    """The settings a module-criticality number depends on, in one line to show beside it.

    Args:
        config: a `ModcritResult.config` (the resolved `ModcritConfig` plus `n`).
    """
    loss = config.get("loss", "error")
    eps = ", ".join(f"{e:g}" for e in config.get("epsilon", []))
    where = " above the model's own" if config.get("relative") else ""
    alphas = "every α (whole curve)" if config.get("curve", True) else "only the α that can lower μ (fast search)"
    n, subset = config.get("n"), config.get("train_subset")
    data = (f"n = {n:,} training samples" if isinstance(n, int) else "the training set") + (
        f" (seeded subset, --train-subset {subset}, data_seed {config.get('data_seed', 0)})"
        if subset is not None and isinstance(n, int) and n >= subset else " (all of them)")
    return (f"ε = {eps}{where} (training {loss}); {config.get('alphas')} α grid points, {alphas}; "
            f"{config.get('noise_draws')} noise draws (seed {config.get('seed', 0)}); σ from "
            f"{config.get('sigma_min', 1e-4):g} up, bisection to ×{1 + config.get('sigma_rtol', 0.01):g}; {data}")
