"""Every figure rendered from small synthetic tables whose cell values are known by construction:
PNG written and not blank, heatmaps of the expected shape and values, the caller's rcParams
untouched, drawing into a given axis, and the demo's single-model two-probe heatmap."""

import sys

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from PIL import Image
from scipy import stats

from layercrit import LayercritError, measure
from layercrit.results import UNMODIFIED, CriticalityResult
from layercrit.testing import TinyMLP
from layercrit.viz import PLOTS, list_plots
from layercrit.viz._style import save_figure
from layercrit.viz.criticality import (
    criticality_bars,
    criticality_heatmap,
    criticality_vs_accuracy,
    criticality_vs_metadata,
    difference_heatmap,
    spread_heatmap,
)
from layercrit.viz.modcrit import modcrit_curves, network_criticality_vs_epsilon, ranking_table
from layercrit.viz.robustness import distance_heatmaps, robustness_heatmap
from layercrit.zoo.compare import summarize

LABELS = ["[0.0] conv", "[1.0] conv1", "[Head] fc"]
# Table order interleaves categories on purpose: the heatmap must regroup them, baseline first.
MODELS = {  # category, ε, norm, accuracy (%)
    "adv_l2": ("adversarial", 3.0, "l2", 62.0),
    "aug": ("augmentation", 0.0, "none", 78.0),
    "base": ("baseline", 0.0, "none", 76.0),
    "adv_linf": ("adversarial", 4.0, "linf", 60.0),
    "aug2": ("augmentation", 0.0, "none", 75.0),
}
ROW_ORDER = ["base", "adv_l2", "adv_linf", "aug", "aug2"]
EPOCHS = [0, 10, 1, 2]  # E10 before E2 in the table: columns must still come in epoch order
FC = ["fc1", "fc2", "fc3"]


def crit(i: int, j: int, t: int) -> float:
    """Model i, layer j, trial t: mean over trials 0.1(i+1) + 0.2j + 0.01, std 0.01 (1 % after ×100)."""
    return 0.1 * (i + 1) + 0.2 * j + 0.01 * t


def results_table() -> pd.DataFrame:
    rows = []
    for i, (m, (cat, *_)) in enumerate(MODELS.items()):
        rows.append(dict(model=m, category=cat, layer=UNMODIFIED, label="unmodified", probe="none", target="",
                         trial=0, criticality=0.0, accuracy=0.7))
        rows += [dict(model=m, category=cat, layer=f"layer{j}", label=lab, probe="rerandomize", target="rerandomize",
                      trial=t, criticality=crit(i, j, t), accuracy=0.5) for j, lab in enumerate(LABELS) for t in range(3)]
    return pd.DataFrame(rows)


def metadata() -> pd.DataFrame:
    return pd.DataFrame([dict(model=m, category=c, epsilon=e, norm=n, accuracy=a) for m, (c, e, n, a) in MODELS.items()])


def comparison():
    return summarize(results_table(), metadata(), by=("accuracy", "epsilon"), exclude_categories="adversarial",
                     baseline="base")


def robustness_table() -> pd.DataFrame:
    """Error of layer k reset to epoch e: 0.1k + 0.01e; re-randomized: 0.9; whole model at e: 0.5/(e+1)."""
    rows = [dict(model="fcn", layer=f"net.{f}", label=f, probe="rerandomize", target="rerandomize", trial=t,
                 error=0.9, criticality=0.8) for f in FC for t in range(2)]
    rows += [dict(model="fcn", layer=f"net.{f}", label=f, probe="reinit", target=f"E{e}", trial=0,
                  error=0.1 * k + 0.01 * e, criticality=0.1) for e in EPOCHS for k, f in enumerate(FC)]
    rows += [dict(model="fcn", layer="(checkpoint)", label="whole model", probe="checkpoint", target=f"E{e}", trial=0,
                  error=0.5 / (e + 1), criticality=np.nan) for e in EPOCHS]
    rows.append(dict(model="fcn", layer=UNMODIFIED, label="unmodified", probe="none", target="", trial=0, error=0.02,
                     criticality=0.0))
    return pd.DataFrame(rows)


def distances() -> pd.DataFrame:
    return pd.DataFrame([dict(model="fcn", layer=f"net.{f}", label=f, epoch=e, l2=0.01 * e * (k + 1),
                              linf=0.1 * e * (k + 1), spectral=e) for e in EPOCHS for k, f in enumerate(FC)])


def curve() -> pd.DataFrame:
    """Module k's error along α: 0.9(1−α)^(k+1); feasible (μ = 10α²/(k+1)) where it is below ε = 0.1."""
    rows = []
    for k, mod in enumerate(["conv1", "layer1.conv", "fc"]):
        for a in np.linspace(0, 1, 6):
            lnn = 0.9 * (1 - a) ** (k + 1) + 0.01
            ok = lnn < 0.1
            rows.append(dict(model="r18", module=mod, label=f"[{k}] {mod}", epsilon=0.1, threshold=0.1, alpha=a,
                             sigma_max=0.1 if ok else np.nan, loss=0.09 if ok else np.nan,
                             mu=10 * a * a / (k + 1) if ok else np.nan, loss_no_noise=lnn))
    return pd.DataFrame(rows)


def network() -> pd.DataFrame:
    return pd.DataFrame([dict(model=m, epsilon=e, network_criticality=s / e, pac_bayes=2 * s / e)
                         for m, s in [("r18", 1.0), ("vgg", 3.0)] for e in (0.05, 0.1, 0.2)])


def ranking() -> pd.DataFrame:
    return pd.DataFrame([dict(measure=m, against="ge", n=5, kendall_tau=t, kendall_p=0.1, spearman_rho=t, spearman_p=0.1)
                         for m, t in [("log10_pfn", 0.2), ("dti", -0.4), ("network_criticality@0.1", 0.8), ("nop", np.nan)]])


def proxy_result():
    """Three blocks, two proxies, the rerandomize criticality of each block (two trials)."""
    from layercrit.analyses.proxies.result import ProxyResult

    blocks = [("h.0", "L00"), ("h.1", "L01"), ("h.2", "L02")]
    table = pd.DataFrame([dict(model="gpt", layer=b, label=lab, proxy=p, n=1, value=v * (i + 1))
                          for p, v in [("bi_token", 0.1), ("angular_all", 0.05)] for i, (b, lab) in enumerate(blocks)])
    crit = pd.DataFrame([dict(model="gpt", layer=b, label=lab, probe="rerandomize", trial=t, criticality=0.2 * (3 - i) + t / 100)
                         for i, (b, lab) in enumerate(blocks) for t in range(2)])
    return ProxyResult(table, criticality=crit)


def shifted_results() -> pd.DataFrame:
    """One model's results on clean data and under two shifts (rows tagged by `shift`)."""
    t = results_table().query("model == 'base'")
    parts = []
    for k, shift in enumerate(["none", "gaussian_noise:3", "contrast:5"]):
        p = t.assign(shift=shift)
        p.loc[p["layer"] != UNMODIFIED, "criticality"] *= 1 + 0.3 * k
        parts.append(p)
    return pd.concat(parts, ignore_index=True)


# kind → (positional inputs, keyword arguments)
INPUTS = {
    "heatmap": lambda: ((comparison(),), {}),
    "bars": lambda: ((results_table().query("model == 'base'"),), {}),
    "difference": lambda: ((comparison(),), {}),
    "spread": lambda: ((results_table(),), {"baseline": "base"}),
    "vs-metadata": lambda: ((comparison(),), {"metadata": metadata()}),
    "vs-accuracy": lambda: ((comparison(),), {"exclude_category": "adversarial"}),
    "robustness": lambda: ((robustness_table(),), {"groups": ["fc2", "fc3"]}),
    "distances": lambda: ((distances(),), {}),
    "modcrit-curves": lambda: ((curve(),), {}),
    "network-vs-epsilon": lambda: ((network(),), {}),
    "ranking": lambda: ((ranking(),), {}),
    "proxy-scatter": lambda: ((proxy_result(),), {}),
    "proxy-bump": lambda: ((proxy_result(),), {}),
    "pruning-curve": lambda: ((pd.DataFrame({"model": "m", "ranking": ["bi", "bi", "skip", "skip"], "k": [0, 1, 0, 1],
                                             "perplexity": [10.0, 12.0, 10.0, 11.0]}),), {}),
    "shift": lambda: ((shifted_results(),), {}),
}


@pytest.fixture(autouse=True)
def _rc_untouched():
    before = dict(matplotlib.rcParams)
    yield
    assert dict(matplotlib.rcParams) == before
    if "matplotlib.pyplot" in sys.modules:  # imported by someone else: still no figure registered by us
        assert not sys.modules["matplotlib.pyplot"].get_fignums()


def assert_png(fig, path) -> None:
    save_figure(fig, path)
    assert path.stat().st_size > 2000
    lo, hi = Image.open(path).convert("L").getextrema()
    assert lo < hi  # not a single colour


def grid(ax) -> np.ma.MaskedArray:
    return ax.images[0].get_array()


def ticks(labels) -> list[str]:
    return [t.get_text() for t in labels]


def test_registry_lists_every_kind():
    kinds = ["heatmap", "bars", "difference", "spread", "vs-metadata", "vs-accuracy", "robustness", "distances",
             "modcrit-curves", "network-vs-epsilon", "ranking", "proxy-scatter", "proxy-bump", "pruning-curve", "shift"]
    assert list(PLOTS) == kinds == list(INPUTS)
    assert list(list_plots()) == kinds and all(list_plots().values())


@pytest.mark.parametrize("kind", list(INPUTS))
def test_renders_png(kind, tmp_path):
    args, kwargs = INPUTS[kind]()
    fig, ax = PLOTS[kind](*args, **kwargs)
    assert isinstance(fig, Figure)
    assert_png(fig, tmp_path / f"{kind}.png")


@pytest.mark.parametrize("kind", list(INPUTS))
def test_draws_into_given_axes(kind):
    fig = Figure(figsize=(12, 4))
    spare, *target = fig.subplots(1, 3 if kind in ("distances", "proxy-scatter", "shift") else 2)
    args, kwargs = INPUTS[kind]()
    if kind in ("distances", "proxy-scatter", "shift"):
        got_fig, got = PLOTS[kind](*args, axes=target, **kwargs)
        assert list(got) == target
    else:
        got_fig, got = PLOTS[kind](*args, ax=target[0], **kwargs)
        assert got is target[0]
    assert got_fig is fig
    for ax in target:
        assert ax.images or ax.patches or ax.lines or ax.collections or ax.tables
    assert not (spare.images or spare.patches or spare.lines or spare.collections or spare.texts)


def test_model_heatmap_groups_by_category_with_baseline_first():
    c = comparison()
    _, ax = criticality_heatmap(c)
    assert grid(ax).shape == (len(MODELS), len(LABELS))
    assert ticks(ax.get_yticklabels()) == ROW_ORDER
    assert ticks(ax.get_xticklabels()) == LABELS
    assert ax.images[0].get_clim() == (0, 100)
    index = list(MODELS)
    expected = [[100 * crit(index.index(m), j, 1) for j in range(len(LABELS))] for m in ROW_ORDER]
    np.testing.assert_allclose(grid(ax), expected)
    assert ticks(ax.get_legend().get_texts()) == ["baseline", "adversarial", "augmentation"]
    texts = ticks(ax.texts)
    # margins: base (i=2) has layer means 31, 51, 71 → 51 ± 16 (population std); layer 0 over models i: 10(i+1) + 1
    assert "51±16" in texts and "31±14" in texts
    # the same figure from the raw table
    _, ax2 = criticality_heatmap(results_table(), baseline="base")
    np.testing.assert_allclose(grid(ax2), expected)


def test_difference_heatmap_subtracts_the_baseline():
    c = comparison()
    _, ax = difference_heatmap(c)
    assert grid(ax).shape == (len(MODELS) - 1, len(LABELS))
    assert ticks(ax.get_yticklabels()) == ROW_ORDER[1:]
    assert ax.images[0].get_clim() == (-100, 100) and ax.images[0].get_cmap().name.startswith("RdBu_r")
    expected = c.baseline_diff.pivot(index="model", columns="label", values="diff").loc[ROW_ORDER[1:], LABELS]
    np.testing.assert_allclose(grid(ax), 100 * expected.to_numpy())  # fractions in the Comparison, % in the figure
    np.testing.assert_allclose(grid(ax)[0], 100 * (0.1 * 1 - 0.1 * 3))  # adv_l2 (i=0) − base (i=2): −20 everywhere
    with pytest.raises(LayercritError, match="needs a baseline"):
        difference_heatmap(results_table())


def test_spread_heatmap_shows_std_over_trials():
    _, ax = spread_heatmap(results_table(), baseline="base")
    assert grid(ax).shape == (len(MODELS), len(LABELS))
    np.testing.assert_allclose(grid(ax), 1.0)  # trials 0.01 apart → std 1 % (ddof=1)
    _, ax = spread_heatmap(comparison())
    np.testing.assert_allclose(grid(ax), 1.0)


def test_demo_heatmap_of_one_model_with_two_probes(tmp_path):
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = torch.randn(32, 4), torch.randint(0, 2, (32,))
    reference = {k: v + 0.5 for k, v in model.state_dict().items()}
    result = measure(model, (x, y), factory=TinyMLP, reference=reference, reference_name="E0",
                     probes=["rerandomize", "reinit"], trials=2)
    fig, ax = criticality_heatmap(result.table)
    assert ticks(ax.get_yticklabels()) == ["rerandomize", "reinit:E0"]
    assert ticks(ax.get_xticklabels()) == ["fc1", "fc2"]
    s = result.summary().set_index(["probe", "label"])["criticality_mean"]
    np.testing.assert_allclose(grid(ax), 100 * np.array([[s["rerandomize", "fc1"], s["rerandomize", "fc2"]],
                                                         [s["reinit", "fc1"], s["reinit", "fc2"]]]))
    assert_png(fig, tmp_path / "demo.png")
    assert criticality_bars(result)[1].patches  # a result object works as well as its table


def test_rows_per_model_and_probe():
    t = results_table()
    both = pd.concat([t, t[t["probe"] == "rerandomize"].assign(probe="reinit", target="E0")], ignore_index=True)
    _, ax = criticality_heatmap(both, baseline="base")
    assert grid(ax).shape == (2 * len(MODELS), len(LABELS))
    assert ticks(ax.get_yticklabels())[:2] == ["base · rerandomize", "base · reinit:E0"]
    _, ax = criticality_heatmap(both, rows="probe")
    assert ticks(ax.get_yticklabels())[:3] == ["rerandomize · adv_l2", "rerandomize · adv_linf", "rerandomize · aug"]
    with pytest.raises(LayercritError, match="Expected `rows` to be 'model', 'probe' or 'auto', got 'layer'"):
        criticality_heatmap(t, rows="layer")
    with pytest.raises(LayercritError, match="baseline model 'nope' is not in the data"):
        criticality_heatmap(t, baseline="nope")


def test_bars_one_per_layer_and_probe_with_ci():
    t = results_table().query("model == 'base'")
    _, ax = criticality_bars(t)
    assert len(ax.patches) == len(LABELS)
    np.testing.assert_allclose([p.get_height() for p in ax.patches], [100 * crit(2, j, 1) for j in range(3)])
    half = stats.t.ppf(0.975, 2) * 1 / np.sqrt(3)  # std 1 %, 3 trials
    bars = next(c for c in ax.containers if isinstance(c, BarContainer))
    seg = bars.errorbar.lines[2][0].get_segments()[0]
    assert seg[1][1] - seg[0][1] == pytest.approx(2 * half)
    two = pd.concat([t, t[t["probe"] == "rerandomize"].assign(probe="reinit", target="E0")])
    assert len(criticality_bars(two)[1].patches) == 2 * len(LABELS)
    with pytest.raises(LayercritError, match="criticality_bars shows one model; the table holds 5"):
        criticality_bars(results_table())


def test_scatter_plots_colour_groups_and_spearman():
    c = comparison()
    _, ax = criticality_vs_metadata(c, metadata=metadata())
    labels = ticks(ax.get_legend().get_texts())
    assert labels[:3] == ["ℓ2", "none", "ℓ∞"] and any(s.startswith("accuracy") for s in labels)
    assert len(ax.collections) == 3  # one scatter per norm
    _, ax = criticality_vs_accuracy(c, exclude_category="adversarial")
    m = c.models
    r_all = stats.spearmanr(m["meta_accuracy"], m["avg_criticality"]).statistic
    keep = m["category"] != "adversarial"
    r_wo = stats.spearmanr(m.loc[keep, "meta_accuracy"], m.loc[keep, "avg_criticality"]).statistic
    labels = ticks(ax.get_legend().get_texts())
    assert f"Spearman R = {r_all:+.2f} (all, n=5)" in labels
    assert f"Spearman R = {r_wo:+.2f} (without adversarial, n=3)" in labels
    with pytest.raises(LayercritError, match="column 'size_col' is not in the models table"):
        criticality_vs_metadata(c, size="size_col")


def test_robustness_heatmap_layout_and_groups():
    _, ax = robustness_heatmap(robustness_table(), groups=["fc2", "fc3"])
    assert grid(ax).shape == (len(FC) + 1, 1 + len(EPOCHS))
    assert ticks(ax.get_xticklabels()) == ["Re-Rnd", "E0", "E1", "E2", "E10"]
    assert ticks(ax.get_yticklabels()) == ["fc1", "*fc2", "*fc3", "whole model"]
    g = grid(ax)
    np.testing.assert_allclose(g[:3, 0], 90)
    np.testing.assert_allclose(g[1, 1:], [10, 11, 12, 20])  # fc2 (k=1) reset to E0, E1, E2, E10
    np.testing.assert_allclose(g[3, 1:], [50, 25, 50 / 3, 50 / 11])
    assert g.mask[3, 0]  # the whole model has no re-randomization cell
    colors = [t.get_color() for t in ax.get_yticklabels()]
    assert colors[1] == colors[2] != colors[0]
    # a joint-probe result: its rows are the groups, marked from the result's config
    t = robustness_table()
    t = t[t["label"] != "fc3"].replace({"net.fc1": "first", "fc1": "first", "net.fc2": "rest", "fc2": "rest"})
    _, ax = robustness_heatmap(CriticalityResult(t, {"groups": {"first": ["fc1"], "rest": ["fc2", "fc3"]}}))
    assert ticks(ax.get_yticklabels()) == ["*first", "*rest", "whole model"]
    with pytest.raises(LayercritError, match="robustness_heatmap shows one model"):
        robustness_heatmap(pd.concat([t, t.assign(model="other")]))


def test_distance_heatmaps_side_by_side():
    fig, axes = distance_heatmaps(distances())
    assert len(axes) == 2 and all(a.figure is fig for a in axes)
    for ax, scale in zip(axes, (0.01, 0.1)):
        assert grid(ax).shape == (len(FC), len(EPOCHS))
        assert ticks(ax.get_xticklabels()) == ["E0", "E1", "E2", "E10"]
        np.testing.assert_allclose(grid(ax)[2], scale * 3 * np.array([0, 1, 2, 10]))
    with pytest.raises(LayercritError, match="Expected 2 axes, one per measure, got 1"):
        distance_heatmaps(distances(), axes=[Figure().add_subplot()])


def test_modcrit_curves_default_to_most_and_least_critical():
    _, ax = modcrit_curves(curve())
    # μ = min over feasible α of 10α²/(k+1): conv1 (k=0) only at α = 1 → 10; fc (k=2) from α = 0.6 → 1.2
    labels = ticks(ax.get_legend().get_texts())
    assert labels[:2] == ["[0] conv1 (μ = 10)", "[2] fc (μ = 1.2)"]
    c = curve()
    np.testing.assert_allclose(ax.lines[0].get_ydata(), 100 * c[c["module"] == "conv1"]["loss_no_noise"])
    _, ax = modcrit_curves(curve(), modules=["layer1.conv"])
    assert ticks(ax.get_legend().get_texts())[0].startswith("[1] layer1.conv")
    with pytest.raises(LayercritError, match="unknown modules nope"):
        modcrit_curves(curve(), modules=["nope"])


def test_network_criticality_lines_per_model():
    _, ax = network_criticality_vs_epsilon(network())
    assert len(ax.lines) == 2
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [60, 30, 15])
    wide = pd.DataFrame({"model": ["a", "b"], "network_criticality@0.1": [1.0, 2.0], "network_criticality@0.2": [0.5, 1]})
    _, ax = network_criticality_vs_epsilon(wide)  # rank_runs' models table
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [0.1, 0.2])


def test_ranking_table_rows_and_best_highlighted():
    _, ax = ranking_table(ranking())
    cells = ax.tables[0].get_celld()
    assert max(r for r, _ in cells) == 4  # header + 4 measures
    assert cells[(3, 0)].get_text().get_text() == "network criticality (ε = 0.1)"
    assert cells[(4, 1)].get_text().get_text() == "—"
    best, other = cells[(3, 1)].get_facecolor(), cells[(1, 1)].get_facecolor()
    assert best != other


def test_save_figure_formats(tmp_path):
    fig, _ = ranking_table(ranking())
    assert save_figure(fig, tmp_path / "t.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(LayercritError, match="unsupported extension"):
        save_figure(fig, tmp_path / "t.jpg")
