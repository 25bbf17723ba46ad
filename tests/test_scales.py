"""One scale per quantity, honest statistics and the report's reading (issue 12, items 3-5).

Criticality and accuracy are fractions in data (tables, JSON, CSV, Parquet) and % where people read
them (CLI tables, `summarize`, the report, figures); the zoo's metadata is kept as written under
`meta_`; rounding noise prints as 0; p-values below display precision print as <0.001, small samples
and every NaN carry a note; numbers that depend on the module-criticality search show its settings.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from layercrit import LayercritError
from layercrit._utils import display, stats
from layercrit.analyses import generalization
from layercrit.analyses.criticality import format_summary
from layercrit.analyses.generalization import format_ranking
from layercrit.analyses.modcrit import ModcritResult, format_modcrit
from layercrit.analyses.robustness import format_robustness
from layercrit.results import UNMODIFIED, CriticalityResult
from layercrit.viz.criticality import criticality_bars, criticality_vs_accuracy, criticality_vs_metadata
from layercrit.viz.modcrit import modcrit_curves
from layercrit.viz.report import build_report
from layercrit.zoo.compare import format_comparison, summarize
from layercrit.zoo.export import export
from layercrit.zoo.store import Store

# The case: zoo accuracies 75.41-75.55 %, average criticalities a few %.
ZOO = {"a": ("baseline", 75.41, 0.0, "none"), "b": ("adversarial", 75.55, 4.0, "linf"),
       "c": ("augmentation", 75.48, 0.0, "none"), "d": ("adversarial", 75.50, 8.0, "l2")}
CRIT = {"a": 0.02, "b": 0.05, "c": 0.03, "d": 0.04}  # per layer: this + 0.01 × layer index


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    for i, (m, (cat, acc, eps, norm)) in enumerate(ZOO.items()):
        s.put_model(m, cat, {"accuracy": acc, "epsilon": eps, "norm": norm, "tags": ["x", "y"],
                             "notes": "first" if i == 0 else None})
        rows = [{"model": m, "layer": UNMODIFIED, "label": "unmodified", "probe": "none", "target": "", "trial": 0,
                 "criticality": 0.0, "accuracy": 0.98 - 0.01 * i}]
        rows += [{"model": m, "layer": f"l{j}", "label": f"l{j}", "probe": "rerandomize", "target": "rerandomize",
                  "trial": t, "criticality": CRIT[m] + 0.01 * j, "accuracy": 0.5} for j in range(3) for t in range(2)]
        s.add_results(rows, "h")
    yield s
    s.close()


# -- item 3: scales ------------------------------------------------------------------------------


def test_summarize_holds_fractions_and_prefixed_metadata(store):
    c = summarize(store, by=["accuracy", "base_accuracy"])
    m = c.models.set_index("model")
    assert m.loc["a", "avg_criticality"] == pytest.approx(0.03)  # a fraction, as the results
    assert m.loc["a", "base_accuracy"] == pytest.approx(0.98)
    assert m.loc["b", "meta_accuracy"] == 75.55 and "accuracy" not in m  # the zoo's, as written, named as such
    assert c.layers.set_index("label").loc["l0", "mean"] == pytest.approx(np.mean(list(CRIT.values())))
    assert list(c.correlations["against"]) == ["meta_accuracy", "base_accuracy"]
    doc = c.to_json()
    assert doc["models"][0]["avg_criticality"] == pytest.approx(0.03) and doc["models"][0]["meta_accuracy"] == 75.41
    # `by` names the metadata with or without its prefix.
    assert summarize(store, by="meta_accuracy").correlations["against"].tolist() == ["meta_accuracy"]


def test_summarize_text_shows_percent_next_to_percent(store):
    text = format_comparison(summarize(store, by=["accuracy"]))
    header = next(line for line in text.splitlines() if "avg criticality %" in line)
    assert "accuracy % (zoo)" in header and "accuracy % (measured)" in header
    row = next(line for line in text.splitlines() if line.split()[1:2] == ["a"])
    assert "3.0" in row.split() and "75.41" in row.split() and "98.00" in row.split()  # all three in %
    assert "0.98" not in row


def test_summarize_notes_metadata_given_as_fractions(store):
    meta = store.models().assign(accuracy=[0.7541, 0.7555, 0.7548, 0.7550])
    text = format_comparison(summarize(store, meta))
    assert "note: accuracy % (zoo) holds values between 0 and 1 only" in text


def test_export_keeps_zoo_metadata_prefixed_in_csv_and_parquet(store, tmp_path):
    pytest.importorskip("pyarrow")
    csv = pd.read_csv(export(store, "csv", tmp_path / "r.csv"))
    pq = pd.read_parquet(export(store, "parquet", tmp_path / "r.parquet"))
    for df in (csv, pq):
        assert {"meta_accuracy", "meta_epsilon", "meta_norm", "meta_tags", "meta_notes"} <= set(df.columns)
        assert "accuracy" in df  # the measured one, a fraction
        first = df[df["model"] == "b"].iloc[0]
        assert first["meta_accuracy"] == 75.55 and first["meta_norm"] == "linf"
        assert json.loads(first["meta_tags"]) == ["x", "y"]
        assert df.loc[df["layer"] == UNMODIFIED, "accuracy"].max() <= 1
    # An exported table summarizes like the store, metadata included.
    assert summarize(csv).models["meta_accuracy"].tolist() == [z[1] for z in ZOO.values()]


def test_format_number_prints_rounding_noise_as_zero():
    assert display.format_percent(3.1e-18) == "0" and display.format_percent(-2.2e-16) == "0"
    assert display.format_number(-0.004, 2) == "0" and display.format_number(-0.006, 2) == "-0.01"
    assert display.format_percent(0.1234) == "12.34" and display.format_number(0.05, 1, scale=100, sign=True) == "+5.0"
    assert display.format_number(math.nan) == "—" and display.format_number(None) == "—"


def _result(crit: dict[str, float], accuracy: float = 0.9) -> CriticalityResult:
    rows = [{"model": "m", "layer": UNMODIFIED, "label": "unmodified", "probe": "none", "target": "", "trial": 0,
             "seed": None, "n": 100, "n_params": 0, "criticality": -2.2e-17, "accuracy": accuracy}]
    rows += [{"model": "m", "layer": k, "label": k, "probe": "rerandomize", "target": "rerandomize", "trial": t,
              "seed": t, "n": 100, "n_params": 10, "criticality": v, "accuracy": accuracy - v}
             for k, v in crit.items() for t in range(2)]
    return CriticalityResult(pd.DataFrame(rows), {"model": "m", "data": "toy", "n": 100, "trials": 2, "seed": 0})


def test_cli_tables_print_exact_zeros():
    text = format_summary(_result({"fc1": 3.1e-18, "fc2": 0.25}))
    assert "-0.00" not in text and "e-18" not in text
    fc1 = next(line for line in text.splitlines() if line.startswith("fc1"))
    assert fc1.split()[2] == "0"
    t = pd.DataFrame({"label": ["a", "a"], "target": ["E0", "E1"], "error": [-1e-17, 0.5]})
    assert format_robustness(t, "error").splitlines()[-1].split() == ["a", "0", "50.0"]


LIMITED = [  # (plot, inputs, keyword, the % axis)
    ("vs-accuracy", lambda c: criticality_vs_accuracy(c.models), "xy"),
    ("vs-metadata", lambda c: criticality_vs_metadata(c.models, x="epsilon"), "y"),
]


@pytest.mark.parametrize("kind, draw, axes", LIMITED)
def test_percent_axes_span_0_to_100_unless_asked(store, kind, draw, axes):
    c = summarize(store, by=["accuracy", "epsilon"])
    _, ax = draw(c)
    for a in axes:
        assert (ax.get_xlim() if a == "x" else ax.get_ylim()) == (0, 100)
    if "y" in axes:
        ys = np.concatenate([c.get_offsets()[:, 1] for c in ax.collections])
        np.testing.assert_allclose(sorted(ys), [3, 4, 5, 6])  # average criticality drawn in %, not as a fraction


def test_limits_option(store):
    c = summarize(store)
    _, ax = criticality_vs_accuracy(c.models, limits="data")
    lo, hi = ax.get_xlim()
    assert 75 < lo and hi < 76  # fitted: the 0.14-point spread fills the axis only when asked
    _, ax = criticality_vs_accuracy(c.models, limits=(50, 90))
    assert ax.get_xlim() == (50, 90) == ax.get_ylim()
    with pytest.raises(LayercritError, match=r'Expected `limits` to be None, "data" or \(low, high\), got \'tight\''):
        criticality_vs_accuracy(c.models, limits="tight")
    table = _result({"fc1": 0.01, "fc2": 0.02}).table
    assert criticality_bars(table)[1].get_ylim() == (0, 100)
    assert criticality_bars(table, limits="data")[1].get_ylim()[1] < 10
    curve = pd.DataFrame({"module": "m", "epsilon": 0.1, "threshold": 0.1, "alpha": [0.0, 1.0], "mu": [np.nan, 1.0],
                          "sigma_max": [np.nan, 0.1], "loss": [np.nan, 0.05], "loss_no_noise": [0.2, 0.02]})
    assert modcrit_curves(curve)[1].get_ylim() == (0, 100)


# -- item 4: statistics --------------------------------------------------------------------------


def test_p_values_below_display_precision():
    assert display.format_p(0.0) == "<0.001" and display.format_p(4e-7) == "<0.001" and display.format_p(0.0012) == "0.001"
    assert display.format_p(0.5) == "0.500" and display.format_p(math.nan) == "—"


def test_small_samples_and_undefined_correlations_are_noted():
    assert stats.correlation_note(2) == "n = 2: fewer than 3 values, no rank correlation"
    assert stats.correlation_note(3).startswith("n = 3 < 5: too few for a test") and "0.33" in stats.correlation_note(3)
    assert "0.083" in stats.correlation_note(4)
    assert stats.correlation_note(4, [1, 1, 1, 1], [1, 2, 3, 4]) == "constant values: no ranking, no correlation"
    assert stats.correlation_note(5) == ""


def test_rank_output_shows_small_p_and_notes():
    """Three models ranked identically: Spearman's large-sample p is exactly 0, which must not print as 0.000."""
    models = pd.DataFrame({"model": ["x", "y", "z"], "train_error": [0.0, 0.01, 0.02], "test_error": [0.1, 0.2, 0.3],
                           "ge": [0.1, 0.19, 0.28], "dti": [1.0, 2.0, 3.0], "nop": [5, 5, 5],
                           "network_criticality@0.05": [1.0, np.nan, 3.0],
                           "search": "ε = 0.05 (training error); 21 α grid points", "note": ["", "undefined at ε = 0.05", ""]})
    ranking = generalization.rank_measures(models).set_index("measure")
    assert ranking.loc["dti", "spearman_p"] == 0 and "n = 3 < 5" in ranking.loc["dti", "note"]
    assert ranking.loc["nop", "note"] == "constant values: no ranking, no correlation"
    assert ranking.loc["network_criticality@0.05", "note"].startswith("n = 2: fewer than 3")
    text = format_ranking(models, ranking.reset_index())
    assert "<0.001" in text and "0.000" not in text
    assert "n = 3 < 5: too few for a test" in text
    assert "note: y: undefined at ε = 0.05" in text
    assert "module-criticality search (pac_bayes@ε, network_criticality@ε): ε = 0.05" in text


def _modcrit(network_nan: bool) -> ModcritResult:
    config = {"epsilon": [0.05], "relative": False, "alphas": 11, "noise_draws": 4, "sigma_min": 1e-4,
              "sigma_rtol": 0.05, "loss": "error", "train_subset": 500, "data_seed": 0, "seed": 0, "curve": False,
              "n": 500, "base_train_loss": 0.072}
    table = pd.DataFrame([
        {"label": "fc1", "module": "fc1", "epsilon": 0.05, "threshold": 0.05, "alpha": 0.5, "sigma": 0.2, "mu": 1.5,
         "delta_norm": 3.0, "n_params": 10, "feasible": True, "loss": 0.049, "note": ""},
        {"label": "fc2", "module": "fc2", "epsilon": 0.05, "threshold": 0.05, "alpha": np.nan, "sigma": np.nan,
         "mu": np.nan, "delta_norm": 1.0, "n_params": 10, "feasible": False, "loss": np.nan,
         "note": "infeasible: even α=1 with σ=0.0001 has training error above 0.05"}])
    network = pd.DataFrame([{"model": "m", "epsilon": 0.05, "threshold": 0.05,
                             "network_criticality": np.nan if network_nan else 1.5, "pac_bayes": np.nan,
                             "modules": 2, "infeasible_modules": 1, "train_loss": 0.072}])
    return ModcritResult(table, pd.DataFrame(), network, 1234, config)


def test_modcrit_output_notes_nan_and_shows_its_search():
    result = _modcrit(network_nan=True)
    text = format_modcrit(result)
    assert "epsilon %" in text and "loss %" in text and "4.90" in text  # training error in %
    assert "1 of 2 modules infeasible: training error above the threshold even at α = 1" in text
    assert "training error of the model itself: 7.20 %" in text
    assert ("search: ε = 0.05 (training error); 11 α grid points, only the α that can lower μ (fast search); "
            "4 noise draws (seed 0)") in text
    assert "n = 500 training samples (seeded subset, --train-subset 500, data_seed 0)" in text
    assert "modules infeasible" in generalization.network_note(result.network.iloc[0])
    feasible = _modcrit(False).network.iloc[0]  # its pac_bayes is NaN: that alone is noted
    assert generalization.network_note(feasible) == "pac_bayes undefined: a module exceeds the threshold at α = 1 for every σ searched"
    assert generalization.network_note(feasible.copy().replace({feasible["pac_bayes"]: 1.0})) == ""
    whole = generalization.describe_search(result.config | {"train_subset": None, "n": 1437, "curve": True})
    assert "every α (whole curve)" in whole and "n = 1,437 training samples (all of them)" in whole


# -- item 5: the report ----------------------------------------------------------------------------


def test_report_reading_follows_its_own_thresholds(tmp_path):
    low = build_report(tmp_path / "low", results=_result({"features": 0.03, "classifier": 0.068})).read_text()
    assert "most critical" not in low
    assert "No layer is critical by the threshold of 50 %; the largest mean criticality is 6.8 % (classifier)" not in low
    assert "No layer is critical: every layer stays below 10 % (the largest, classifier, 6.8 %)" in low
    mid = build_report(tmp_path / "mid", results=_result({"features": 0.03, "classifier": 0.3})).read_text()
    assert "most critical" not in mid and "No layer is critical by the threshold of 50 %" in mid
    high = build_report(tmp_path / "high", results=_result({"features": 0.03, "classifier": 0.7})).read_text()
    assert "The most critical layer is classifier (70.0 %)" in high


def test_report_tables_in_percent_and_figures_full_width(tmp_path):
    text = build_report(tmp_path / "r", results=_result({"features": 0.1234, "classifier": 0.5})).read_text()
    assert "<th>criticality %</th>" in text and "<td>12.34</td>" in text and "<td>0.1234</td>" not in text
    unmodified = text[text.index("<td>unmodified</td>"):].split("</tr>")[0]
    assert "<td>0</td>" in unmodified and "e-17" not in text and "-0.00" not in text
    assert "figure img{display:block;width:100%" in text and "lightbox" in text  # full width, click to enlarge
    assert 'title="click to enlarge"' in text


def test_store_report_tables_in_percent(store, tmp_path):
    text = build_report(tmp_path / "r", store=store.path).read_text()
    assert "<th>avg criticality %</th>" in text and "<th>accuracy % (zoo)</th>" in text
    assert "<th>accuracy % (measured)</th>" in text and "<td>98.00</td>" in text and "<td>3.00</td>" in text
    assert "n = 4 &lt; 5: too few for a test" in text


def test_ranking_figure_marks_small_samples():
    from layercrit.viz.modcrit import ranking_table

    ranking = pd.DataFrame([{"measure": "dti", "against": "ge", "n": 3, "kendall_tau": 1.0, "kendall_p": 1 / 3,
                             "spearman_rho": 1.0, "spearman_p": 0.0}])
    _, ax = ranking_table(ranking)
    cells = ax.tables[0].get_celld()
    assert cells[(1, 4)].get_text().get_text() == "<0.001†" and cells[(1, 2)].get_text().get_text() == "0.333†"
    assert any(t.get_text().startswith("† n = 3 < 5 models: too few for a test") for t in ax.texts)
