"""Cross-model summaries, the reference-results import and the export, checked against numbers
computed independently in the test from the values written to the reference-format CSV."""

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from layercrit.errors import LayercritError
from layercrit.results import UNMODIFIED
from layercrit.zoo.compare import Comparison, format_comparison, summarize
from layercrit.zoo.export import export
from layercrit.zoo.reference import import_reference, read_reference
from layercrit.zoo.store import Store

LAYERS = ["model.conv1", "model.layer1.0.conv1", "model.fc"]  # the reference wraps the ResNet as `model`
LABELS = ["[0.0] conv", "[1.0] conv1", "[Head] fc"]
# pred_cos_sim per model: one row per layer, one column per trial.
COS = {
    "base": [[0.10, 0.20, 0.30], [0.90, 0.80, 0.70], [0.50, 0.50, 0.50]],
    "adv_a": [[0.05, 0.05, 0.20], [0.40, 0.50, 0.60], [0.30, 0.20, 0.10]],
    "adv_b": [[0.00, 0.10, 0.05], [0.30, 0.30, 0.30], [0.20, 0.25, 0.30]],
    "aug_a": [[0.20, 0.20, 0.50], [0.95, 0.85, 0.90], [0.60, 0.70, 0.80]],
    "aug_b": [[0.40, 0.30, 0.20], [0.99, 0.98, 0.97], [0.70, 0.60, 0.65]],
    "ssl": [[0.60, 0.50, 0.40], [0.90, 0.95, 1.00], [0.40, 0.45, 0.35]],
}
META = {  # category, ImageNet accuracy in %
    "base": ("baseline", 76.15), "adv_a": ("adversarial", 70.42), "adv_b": ("adversarial", 62.83),
    "aug_a": ("augmentation", 77.53), "aug_b": ("augmentation", 75.80), "ssl": ("contrastive", 72.80),
}


def _expected_avg() -> dict[str, float]:
    """Average criticality (a fraction): mean over trials, then over layers, of 1 − cos."""
    return {m: float(np.mean(np.mean(1 - np.array(v), axis=1))) for m, v in COS.items()}


def _write_reference(folder, cos=COS, meta=META, name="results.csv"):
    lines = ["top1_acc,top5_acc,loss,batch_acc,layer,pred_cos_sim,pred_l1_err,pred_l2_err,pred_ce_loss,trial,"
             "recovered_acc,model_id"]
    for model, per_layer in cos.items():
        for trial in range(3):
            for layer, values in zip(LAYERS, per_layer):
                c = values[trial]
                lines.append(f"{70 * c:.4f},{90 * c:.4f},{3 - c:.3f},,{layer},{c},{2 - 2 * c:.3f},{1 - c:.3f},"
                             f"-100.5,{float(trial)},{c:.3f},{model}")
    results = folder / name
    results.write_text("\n".join(lines) + "\n")
    metadata = folder / "meta.csv"
    metadata.write_text("model_id,category,accuracy,epochs\n"
                        + "".join(f"{m},{c},{a},{'' if m == 'ssl' else 90}\n" for m, (c, a) in meta.items()))
    return results, metadata


@pytest.fixture
def store(tmp_path):
    results, metadata = _write_reference(tmp_path)
    s = Store(tmp_path / "s.sqlite")
    assert import_reference(results, metadata, s) == 54
    yield s
    s.close()


# -- the reference import ---------------------------------------------------------------------


def test_read_reference_maps_columns_and_labels(tmp_path):
    rows, models = read_reference(*_write_reference(tmp_path))
    assert len(rows) == 54
    first = rows.iloc[0]
    assert (first["model"], first["layer"], first["probe"], first["target"], first["trial"]) == (
        "base", "model.conv1", "rerandomize", "rerandomize", 0)
    assert pd.isna(first["seed"])
    assert first["criticality"] == pytest.approx(0.9)
    assert first["accuracy"] == pytest.approx(0.07) and first["top5"] == pytest.approx(0.09)
    assert (first["l1"], first["l2"], first["loss"]) == (pytest.approx(1.8), pytest.approx(0.9), pytest.approx(2.9))
    assert (first["pred_ce_loss"], first["recovered_acc"]) == (-100.5, pytest.approx(0.1))
    assert list(rows["label"][:3]) == LABELS
    assert list(models.columns) == ["model", "category", "accuracy", "epochs"]
    assert models.set_index("model").loc["adv_b", "accuracy"] == 62.83


def test_non_resnet_names_keep_their_names(tmp_path):
    results, metadata = _write_reference(tmp_path)
    results.write_text(results.read_text().replace("model.fc", "head.proj"))
    rows, _ = read_reference(results, metadata)
    assert set(rows["label"]) == {"model.conv1", "model.layer1.0.conv1", "head.proj"}


def test_import_stores_extras_and_metadata_and_is_idempotent(store, tmp_path):
    table = store.results()
    assert "extra" not in table.columns  # unpacked into columns
    assert pd.isna(table["batch_acc"][0]) and (table["pred_ce_loss"][0], table["recovered_acc"][0]) == (-100.5, 0.1)
    assert table["config_hash"][0].startswith("reference:") and len(table["config_hash"][0]) == 26
    models = store.models().set_index("model")
    assert models.loc["adv_a", "category"] == "adversarial" and models.loc["adv_a", "accuracy"] == 70.42
    assert pd.isna(models.loc["ssl", "epochs"])  # empty cells are left out of the metadata
    assert import_reference(tmp_path / "results.csv", tmp_path / "meta.csv", store) == 0
    assert store.count() == 54


def test_import_keeps_a_swept_models_description(store, tmp_path):
    store.put_model("base", "mine", {"note": "x"}, spec="resnet18")
    results, metadata = _write_reference(tmp_path, name="other.csv")
    with pytest.warns(UserWarning, match="'base' is already described"):
        assert import_reference(results, metadata, store) == 0  # same rows, new file name, same bytes
    assert store.models().set_index("model").loc["base", "category"] == "mine"


@pytest.mark.parametrize("edit, match", [
    (lambda r, m: r.unlink(), r"reference results .*results.csv' does not exist"),
    (lambda r, m: m.unlink(), r"model metadata .*meta.csv' does not exist"),
    (lambda r, m: r.write_text(r.read_text().replace("pred_cos_sim", "cos").replace("top5_acc", "t5")),
     r"lacks columns pred_cos_sim, top5_acc; columns present: top1_acc, t5"),
    (lambda r, m: m.write_text("model_id,acc\nbase,1\n"), r"meta.csv' lacks columns category"),
    (lambda r, m: r.write_text(r.read_text().replace(",0.3,", ",abc,", 1)), r"line \d+: pred_cos_sim 'abc' is not a number"),
    (lambda r, m: r.write_text(r.read_text().replace(",0.0,", ",0.5,", 1)), r"trial 0.5 is not a whole number"),
    (lambda r, m: r.write_text(r.read_text().replace("\n7.0000,", "\n107.0000,", 1)), r"top1_acc 107.0 is outside 0..100"),
    (lambda r, m: r.write_text(r.read_text().replace(",0.3,", ",1.5,", 1)), r"pred_cos_sim 1.5 is outside -1..1"),
    (lambda r, m: m.write_text(m.read_text() + "base,baseline,1,1\n"), r"lists model 'base' twice"),
    (lambda r, m: r.write_text(r.read_text().splitlines()[0] + "\n"), r"has no rows"),
])
def test_reference_validation(tmp_path, edit, match):
    results, metadata = _write_reference(tmp_path)
    edit(results, metadata)
    with pytest.raises(LayercritError, match=match):
        read_reference(results, metadata)


def test_models_without_metadata_are_imported_as_unknown(tmp_path):
    results, metadata = _write_reference(tmp_path)
    metadata.write_text("\n".join(metadata.read_text().splitlines()[:-2]) + "\n")
    with Store(tmp_path / "s.sqlite") as store:
        with pytest.warns(UserWarning, match=r"has no row for models aug_b, ssl; imported with category 'unknown'") as w:
            assert import_reference(results, metadata, store) == 54
        assert len(w) == 1  # one warning naming them all
        models = store.models().set_index("model")
        assert models.loc["aug_b", "category"] == models.loc["ssl", "category"] == "unknown"
        assert pd.isna(models.loc["ssl", "accuracy"]) and models.loc["aug_a", "accuracy"] == 77.53
        c = summarize(store)
        assert c.correlations.loc[0, "n"] == 4  # no accuracy: left out of the correlation
        # Imported again without their rows, models the store already describes keep their description.
        store.put_model("ssl", "contrastive", {"accuracy": 72.8})
        with pytest.warns(UserWarning, match="no row for models aug_b, ssl"):
            assert import_reference(results, metadata, store) == 0
        assert store.models().set_index("model").loc["ssl", "category"] == "contrastive"


def test_cosine_tolerance(tmp_path):
    results, metadata = _write_reference(tmp_path)
    results.write_text(results.read_text().replace(",0.3,", ",1.0000004,", 1))
    rows, _ = read_reference(results, metadata)
    assert rows["criticality"].min() == pytest.approx(-4e-7)


# -- summarize --------------------------------------------------------------------------------


def test_model_averages_and_layer_marginals(store):
    c = summarize(store)
    expected = _expected_avg()
    m = c.models.set_index("model")
    assert list(c.models["model"]) == list(COS)
    assert list(c.models.columns) == ["model", "category", "avg_criticality", "std_criticality", "n_layers", "trials",
                                      "meta_accuracy", "base_accuracy"]
    for model, v in COS.items():
        per_layer = np.mean(1 - np.array(v), axis=1)
        assert m.loc[model, "avg_criticality"] == pytest.approx(expected[model])
        assert m.loc[model, "std_criticality"] == pytest.approx(np.std(per_layer))  # ddof=0, as the paper's margins
        assert m.loc[model, "category"] == META[model][0] and m.loc[model, "meta_accuracy"] == META[model][1]
    assert (c.models["n_layers"] == 3).all() and (c.models["trials"] == 3).all()
    assert c.models["base_accuracy"].isna().all()  # the reference drops the unmodified model's row

    cells = np.array([np.mean(1 - np.array(v), axis=1) for v in COS.values()])  # models × layers
    assert list(c.layers["label"]) == LABELS
    np.testing.assert_allclose(c.layers["mean"], cells.mean(axis=0))
    np.testing.assert_allclose(c.layers["std"], cells.std(axis=0))
    assert (c.layers["n_models"] == 6).all()


def test_categories(store):
    c = summarize(store)
    expected = _expected_avg()
    cats = c.categories.set_index("category")
    assert list(cats.index) == ["baseline", "adversarial", "augmentation", "contrastive"]
    assert cats.loc["adversarial", "avg_criticality"] == pytest.approx((expected["adv_a"] + expected["adv_b"]) / 2)
    assert cats.loc["adversarial", "n_models"] == 2
    cl = c.category_layers.set_index(["category", "label"])
    want = np.mean([np.mean(1 - np.array(COS[m][2])) for m in ("aug_a", "aug_b")])
    assert cl.loc[("augmentation", "[Head] fc"), "mean"] == pytest.approx(want)
    assert len(cl) == 12


def _expected_corr(models):
    expected = _expected_avg()
    x = [expected[m] for m in models]
    y = [META[m][1] for m in models]
    return stats.spearmanr(x, y), stats.kendalltau(x, y)


def test_correlations_with_and_without_excluded_categories(store):
    c = summarize(store, exclude_categories=["adversarial", "contrastive"])
    corr = c.correlations.set_index("subset")
    assert list(c.correlations.columns) == ["against", "subset", "n", "spearman_r", "spearman_p", "kendall_tau", "kendall_p",
                                            "note"]
    assert list(corr.index) == ["all", "excluding adversarial", "excluding contrastive",
                                "excluding adversarial, contrastive"]
    subsets = {
        "all": list(COS),
        "excluding adversarial": ["base", "aug_a", "aug_b", "ssl"],
        "excluding contrastive": ["base", "adv_a", "adv_b", "aug_a", "aug_b"],
        "excluding adversarial, contrastive": ["base", "aug_a", "aug_b"],
    }
    for name, models in subsets.items():
        s, k = _expected_corr(models)
        row = corr.loc[name]
        assert row["against"] == "meta_accuracy" and row["n"] == len(models)
        assert (row["note"] != "") == (len(models) < 5)  # n = 3: too few for a test, and said so
        assert (row["spearman_r"], row["spearman_p"]) == (pytest.approx(s.statistic), pytest.approx(s.pvalue))
        assert (row["kendall_tau"], row["kendall_p"]) == (pytest.approx(k.statistic), pytest.approx(k.pvalue))
    assert corr.loc["all", "spearman_r"] < -0.5  # the adversarial models: less accurate, more critical layers


def test_correlation_undefined_for_few_models_or_constants(store):
    c = summarize(store, by=["accuracy", "epochs"], exclude_categories="augmentation")
    corr = c.correlations.set_index(["against", "subset"])
    # epochs: missing for ssl (dropped), constant 90 for the rest.
    assert corr.loc[("meta_epochs", "all"), "n"] == 5
    assert math.isnan(corr.loc[("meta_epochs", "all"), "spearman_r"])
    assert corr.loc[("meta_epochs", "all"), "note"] == "constant values: no ranking, no correlation"
    sub = summarize(store.results(models=["base", "adv_a"]), store.models())
    assert sub.correlations["n"].tolist() == [2] and sub.correlations["kendall_tau"].isna().all()
    assert sub.correlations["note"].tolist() == ["n = 2: fewer than 3 values, no rank correlation"]


def test_spread_over_trials(store):
    spread = summarize(store).spread
    assert len(spread) == 18
    assert list(spread.columns) == ["model", "category", "layer", "label", "trials", "mean", "std", "sem"]
    row = spread[(spread["model"] == "aug_a") & (spread["label"] == "[0.0] conv")].iloc[0]
    values = 1 - np.array(COS["aug_a"][0])
    assert row["mean"] == pytest.approx(values.mean())
    assert row["std"] == pytest.approx(np.std(values, ddof=1))  # 0.1732
    assert row["sem"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(3))
    assert spread.set_index(["model", "label"]).loc[("base", "[Head] fc"), "std"] == 0


def test_baseline_diff(store):
    c = summarize(store, baseline="base")
    d = c.baseline_diff
    assert len(d) == 15 and "base" not in set(d["model"])
    row = d[(d["model"] == "ssl") & (d["label"] == "[1.0] conv1")].iloc[0]
    want = np.mean(1 - np.array(COS["ssl"][1])) - np.mean(1 - np.array(COS["base"][1]))
    assert row["diff"] == pytest.approx(want)  # 0.95 vs 0.8 similarity: 15 points less critical
    assert row["diff"] == pytest.approx(-0.15)
    assert summarize(store).baseline_diff.empty


def test_json_shape(store):
    doc = summarize(store, exclude_categories=["adversarial"], baseline="base").to_json()
    text = json.dumps(doc, allow_nan=False)  # NaN must already be null
    assert list(json.loads(text)) == ["models", "layers", "categories", "spread", "correlations", "baseline_diff"]
    assert set(doc["models"][0]) >= {"model", "category", "avg_criticality", "std_criticality", "n_layers", "trials",
                                     "meta_accuracy", "base_accuracy"}
    assert doc["models"][0]["base_accuracy"] is None
    assert type(doc["models"][0]["n_layers"]) is int and type(doc["models"][0]["avg_criticality"]) is float
    assert set(doc["correlations"][0]) == {"against", "subset", "n", "spearman_r", "spearman_p", "kendall_tau", "kendall_p",
                                           "note"}
    assert len(doc["correlations"]) == 2 and len(doc["baseline_diff"]) == 15
    assert set(doc["layers"][0]) == {"label", "mean", "std", "n_models"}


def test_format_comparison(store):
    text = format_comparison(summarize(store, exclude_categories=["adversarial"], baseline="base"))
    assert "probe 'rerandomize': 6 models, 3 layers" in text
    assert "[Head] fc" in text and "±" in text and "excluding adversarial" in text and "Spearman R=" in text
    lines = text.splitlines()
    # Per-model table sorted by category: adversarial rows first, the less critical adv_a before adv_b.
    first = lines.index(next(ln for ln in lines if "adv_" in ln))
    assert "adv_a" in lines[first] and "adv_b" in lines[first + 1]


def test_summarize_a_table_without_a_store():
    rows = []
    for i, model in enumerate(["m1", "m2", "m3"]):
        rows.append({"model": model, "layer": UNMODIFIED, "probe": "none", "trial": 0, "criticality": 0.0,
                     "accuracy": 0.9 - 0.1 * i})
        for layer, crit in (("a", 0.1 * i), ("b", 0.2 + 0.1 * i)):
            for trial in range(2):
                rows.append({"model": model, "layer": layer, "label": layer, "probe": "zero", "trial": trial,
                             "criticality": crit + 0.02 * trial, "accuracy": 0.5})
    table = pd.DataFrame(rows)
    c = summarize(table, pd.DataFrame({"model": ["m1", "m2", "m3"], "category": ["x", "y", "y"]}),
                  probe="zero", by=["base_accuracy"])
    assert isinstance(c, Comparison)
    np.testing.assert_allclose(c.models["avg_criticality"], [0.11, 0.21, 0.31])
    np.testing.assert_allclose(c.models["base_accuracy"], [0.9, 0.8, 0.7])
    assert c.correlations.iloc[0]["spearman_r"] == pytest.approx(-1)
    assert list(c.categories["category"]) == ["x", "y"]
    # No metadata: categories come from the table if it has them, else stay empty.
    bare = summarize(table, probe="zero", by=())
    assert bare.models["category"].isna().all() and bare.correlations.empty


def test_summarize_an_exported_table(store, tmp_path):
    out = export(store, "csv", tmp_path / "all.csv")
    table = pd.read_csv(out, dtype={"model": str})
    a, b = summarize(table, by=()), summarize(store, by=())
    pd.testing.assert_frame_equal(a.models.drop(columns="base_accuracy"), b.models.drop(columns="base_accuracy"))


def test_summarize_errors(store, tmp_path):
    with Store(tmp_path / "empty.sqlite") as empty, pytest.raises(
            LayercritError, match=r"no results for probe 'rerandomize' in results store .*empty.sqlite'; probes present: \(none\)"):
        summarize(empty)
    with pytest.raises(LayercritError, match=r"no results for probe 'zero' in .*; probes present: rerandomize"):
        summarize(store, probe="zero")
    with pytest.raises(LayercritError, match=r"`by` column 'acc' is not in the model metadata; columns present: .*accuracy, epochs"):
        summarize(store, by="acc")
    with pytest.raises(LayercritError, match=r"unknown categories to exclude: 'adv'; categories present: baseline, adversarial"):
        summarize(store, exclude_categories=["adv"])
    with pytest.raises(LayercritError, match=r"baseline model 'tv' has no results for probe 'rerandomize'.*models present: base"):
        summarize(store, baseline="tv")
    meta = store.models().assign(accuracy="high")
    with pytest.raises(LayercritError, match=r"`by` column 'accuracy' must be numeric, but model 'base' has 'high'"):
        summarize(store, meta)
    with pytest.raises(LayercritError, match=r"results table lacks columns criticality"):
        summarize(pd.DataFrame({"model": ["a"], "layer": ["l"], "probe": ["p"]}))


def test_summarize_refuses_mixed_targets_and_configurations(store):
    table = store.results()
    reinit = table.assign(probe="reinit", target=np.where(table["trial"] == 0, "epoch0", "epoch5"))
    with pytest.raises(LayercritError, match=r"probe 'reinit' has 2 targets .*epoch0, epoch5.*target="):
        summarize(reinit, store.models(), probe="reinit")
    one = summarize(reinit, store.models(), probe="reinit", target="epoch5")
    assert (one.models["trials"] == 2).all()
    with pytest.raises(LayercritError, match=r"targets present: epoch0, epoch5"):
        summarize(reinit, store.models(), probe="reinit", target="epoch9")
    twice = pd.concat([table, table.assign(config_hash="other")])
    with pytest.raises(LayercritError, match=r"model 'base' has 18 rows for repeated units.*configurations reference:.*, other"):
        summarize(twice, store.models())


# -- export -----------------------------------------------------------------------------------


def test_export_csv_and_parquet(store, tmp_path):
    csv = pd.read_csv(export(store, "csv", tmp_path / "r.csv"), dtype={"model": str})
    pq = pd.read_parquet(export(store, "parquet", tmp_path / "r.parquet", probe="rerandomize"))
    for df in (csv, pq):
        assert len(df) == 54
        assert list(df.columns[:10]) == ["model", "category", "layer", "label", "probe", "target", "trial", "seed",
                                         "criticality", "accuracy"]
        assert df["criticality"].iloc[0] == pytest.approx(0.9)
        assert df.set_index("model")["category"].to_dict()["adv_a"] == "adversarial"
    assert pq["trial"].dtype == "Int64" and pq["seed"].isna().all()
    assert not list(tmp_path.glob(".r.*"))  # no temporary files left behind


def test_export_errors(store, tmp_path, monkeypatch):
    with pytest.raises(LayercritError, match=r"unsupported extension; expected one of .parquet"):
        export(store, "parquet", tmp_path / "r.csv")
    with pytest.raises(LayercritError, match=r"Expected `fmt` to be one of csv, parquet, got 'xlsx'"):
        export(store, "xlsx", tmp_path / "r.xlsx")
    with pytest.raises(LayercritError, match=r"no results for probe 'zero' in results store .*; probes present: rerandomize"):
        export(store, "csv", tmp_path / "r.csv", probe="zero")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    with pytest.raises(LayercritError, match=r"writing Parquet needs pyarrow: pip install 'layercrit\[parquet\]'"):
        export(store, "parquet", tmp_path / "r.parquet")
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "r.csv").exists()
