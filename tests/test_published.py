"""The published results of Gavrikov et al. 2024 as a regression test.

`../shared/data/gavrikov2024/` (beside the repository, as in CI) holds the paper's raw results in the
reference implementation's CSV format (51 ResNet-50s × 54 layers × 3 trials) and the metadata of 50
of them. They are imported through the library and through the CLI, and the paper's statistics are
recomputed twice: by layercrit (`summarize`, the plots) and independently here with pandas and scipy
straight from the CSV. Both must agree with each other and with the paper: Spearman R between a
model's average criticality (mean over layers of the mean over trials, in %) and its accuracy is
−0.46 over all models with metadata and −0.17 without the adversarially trained ones. (layercrit's
tables hold criticality as a fraction, its figures show %: rank correlations do not depend on it.)
"""

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from layercrit import viz as plots
from layercrit.zoo.compare import summarize
from layercrit.zoo.reference import UNKNOWN_CATEGORY, import_reference
from layercrit.zoo.store import Store

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gavrikov2024"
RESULTS, METADATA = DATA / "results.csv.gz", DATA / "models.csv"
ADVERSARIAL = "adversarial_training"  # the category name in models.csv
NO_METADATA = "resnet50_frozen_random"  # in the results, not in the metadata (the paper leaves it out)
PAPER_R = {"all": -0.46, f"excluding {ADVERSARIAL}": -0.17}
N_MODELS, N_LAYERS, N_TRIALS = 51, 54, 3


@pytest.fixture(scope="module")
def data() -> tuple[Path, Path]:
    # Fail, not skip: the data set is part of the test set-up (CI checks shared/ out beside the clone).
    missing = [str(p) for p in (RESULTS, METADATA) if not p.is_file()]
    if missing:
        pytest.fail(f"published results not found: {', '.join(missing)}; expected the shared/ folder beside the "
                    f"repository root")
    return RESULTS, METADATA


@pytest.fixture(scope="module")
def independent(data) -> dict:
    """The paper's statistics with pandas and scipy only, straight from the CSVs."""
    raw = pd.read_csv(data[0], dtype={"model_id": str, "layer": str})
    meta = pd.read_csv(data[1], dtype={"model_id": str})
    raw["crit"] = 1.0 - raw["pred_cos_sim"]  # a fraction, as in layercrit's tables
    cell = raw.groupby(["model_id", "layer"], sort=False)["crit"].mean()  # mean over trials
    avg = cell.groupby(level="model_id", sort=False).mean()  # mean over layers
    table = meta.set_index("model_id").join(avg.rename("avg"), how="inner")
    rows = {"all": table, f"excluding {ADVERSARIAL}": table[table["category"] != ADVERSARIAL]}
    corr = {name: (len(t), stats.spearmanr(t["avg"], t["accuracy"])) for name, t in rows.items()}
    return {"raw": raw, "cell": cell, "avg": avg, "meta": meta, "corr": corr}


@pytest.fixture(scope="module")
def store(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("published") / "store.sqlite"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Store(path) as s:
            added = import_reference(*data, s)
    assert added == N_MODELS * N_LAYERS * N_TRIALS
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and f"no row for models {NO_METADATA};" in messages[0], messages
    s = Store(path, create=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def comparison(store):
    return summarize(store, by="accuracy", exclude_categories=ADVERSARIAL, baseline="tv_resnet50")


def test_import_keeps_every_row_and_marks_the_model_without_metadata(store, independent):
    table = store.results()
    assert len(table) == N_MODELS * N_LAYERS * N_TRIALS == len(independent["raw"])
    assert (table.groupby("model")["layer"].nunique() == N_LAYERS).all()
    assert set(table["trial"]) == set(range(N_TRIALS))
    models = store.models().set_index("model")
    assert len(models) == N_MODELS
    assert models.loc[NO_METADATA, "category"] == UNKNOWN_CATEGORY and pd.isna(models.loc[NO_METADATA, "accuracy"])
    assert (models.loc["tv_resnet50", "category"], models.loc["tv_resnet50", "accuracy"]) == ("baseline", 76.15)
    assert models["category"].value_counts()[ADVERSARIAL] == 15
    # Paper-style labels after the reference's `model.` wrapper prefix.
    labels = table.drop_duplicates("layer").set_index("layer")["label"]
    assert (labels["model.conv1"], labels["model.layer1.0.downsample.0"], labels["model.fc"]) == (
        "[0.0] conv", "[1.0] downsample", "[Head] fc")


def test_cli_import_matches_the_api(data, store, tmp_path):
    out = tmp_path / "cli.sqlite"
    r = subprocess.run([sys.executable, "-m", "layercrit", "import-reference", str(data[0]),
                        "--metadata", str(data[1]), "--store", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"imported {N_MODELS * N_LAYERS * N_TRIALS} rows" in r.stdout
    warning_lines = [line for line in r.stderr.splitlines() if line.startswith("layercrit: warning:")]
    assert len(warning_lines) == 1 and NO_METADATA in warning_lines[0] and "'unknown'" in warning_lines[0], r.stderr
    with Store(out, create=False) as cli_store:
        key = ["model", "layer", "trial"]
        cli = cli_store.results().sort_values(key).reset_index(drop=True)
        api = store.results().sort_values(key).reset_index(drop=True)
        pd.testing.assert_frame_equal(cli[[*key, "label", "criticality", "accuracy"]],
                                      api[[*key, "label", "criticality", "accuracy"]])
        pd.testing.assert_frame_equal(cli_store.models()[["model", "category", "accuracy"]],
                                      store.models()[["model", "category", "accuracy"]])


def test_per_model_averages(comparison, independent):
    got = comparison.models.set_index("model")["avg_criticality"]
    want = independent["avg"]
    assert sorted(got.index) == sorted(want.index) and len(got) == N_MODELS
    np.testing.assert_allclose(got[want.index].to_numpy(), want.to_numpy(), rtol=1e-12, atol=0)
    assert (comparison.models["n_layers"] == N_LAYERS).all() and (comparison.models["trials"] == N_TRIALS).all()
    # Per (model, layer) means too: the cells of Fig. 1.
    spread = comparison.spread.set_index(["model", "layer"])["mean"]
    cell = independent["cell"].rename_axis(["model", "layer"])
    np.testing.assert_allclose(spread[cell.index].to_numpy(), cell.to_numpy(), rtol=1e-12, atol=0)


def test_spearman_matches_the_paper(comparison, independent):
    corr = comparison.correlations.set_index("subset")
    assert list(corr.index) == ["all", f"excluding {ADVERSARIAL}"]
    for subset, paper in PAPER_R.items():
        n, ref = independent["corr"][subset]
        assert corr.loc[subset, "n"] == n == (50 if subset == "all" else 35)  # the unknown model has no accuracy
        # The same ranks give the same R and p, bit for bit.
        assert corr.loc[subset, "spearman_r"] == ref.statistic
        assert corr.loc[subset, "spearman_p"] == ref.pvalue
        assert round(corr.loc[subset, "spearman_r"], 2) == round(ref.statistic, 2) == paper


def test_fig3_legend_shows_the_papers_correlations(comparison, store):
    # As `layercrit plot vs-accuracy --store` draws it: the store's metadata beside the summary.
    fig, ax = plots.criticality_vs_accuracy(comparison.models, metadata=store.models(), exclude_category=ADVERSARIAL)
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "Spearman R = -0.46 (all, n=50)" in texts, texts
    assert f"Spearman R = -0.17 (without {ADVERSARIAL}, n=35)" in texts, texts


def test_fig1_heatmap(store, independent, tmp_path):
    """Fig. 1: the 50 models with metadata × 54 layers, baseline first, grouped by category."""
    models = store.models()
    shown = models.loc[models["category"] != UNKNOWN_CATEGORY, ["model", "category"]]
    table = store.results(models=shown["model"])
    fig, ax = plots.criticality_heatmap(table, categories=shown, baseline="tv_resnet50")
    grid = np.asarray(ax.images[0].get_array())
    assert grid.shape == (50, N_LAYERS)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert rows[0] == "tv_resnet50" and sorted(rows) == sorted(shown["model"])
    assert (cols[0], cols[-1]) == ("[0.0] conv", "[Head] fc") and len(set(cols)) == N_LAYERS
    # Rows grouped by category, in the order categories first appear after the baseline.
    cats = dict(zip(shown["model"], shown["category"]))
    seq = [cats[m] for m in rows]
    assert [c for i, c in enumerate(seq) if i == 0 or c != seq[i - 1]] == list(dict.fromkeys(seq))
    # Each cell is the independently computed mean over trials, in %.
    label = store.results().drop_duplicates("layer").set_index("label")["layer"]
    cell = independent["cell"]
    want = np.array([[cell[(m, label[c])] * 100 for c in cols] for m in rows])
    np.testing.assert_allclose(grid, want, rtol=1e-12, atol=0)
    assert plots.save_figure(fig, tmp_path / "fig1.png").stat().st_size > 0


# -- the paper's zoo ---------------------------------------------------------------------------

ZOO = Path(__file__).resolve().parents[1] / "zoos" / "gavrikov2024.toml"


def test_paper_zoo_describes_the_50_models(data, tmp_path):
    """zoos/gavrikov2024.toml parses with the real validation once its files exist; as shipped, the
    validation names exactly the files the user must provide (weights and ImageNet)."""
    from layercrit.errors import LayercritError
    from layercrit.zoo.zoofile import load_zoo

    meta = pd.read_csv(data[1], dtype={"model_id": str})
    with pytest.raises(LayercritError) as e:
        load_zoo(ZOO)
    problems = e.value.problems
    assert len(problems) == 100, problems  # per model: its weights file and the data folder, nothing else
    assert sum("weights 'weights/" in p and "not found" in p for p in problems) == 50
    assert sum("data 'imagefolder:imagenet/val' not found" in p for p in problems) == 50

    # The same file beside placeholders for what the user provides: the whole validation passes.
    zoo_file = tmp_path / ZOO.name
    zoo_file.write_text(ZOO.read_text())
    (tmp_path / "imagenet" / "val").mkdir(parents=True)
    (tmp_path / "weights").mkdir()
    for mid in meta["model_id"]:
        (tmp_path / "weights" / f"{mid}.pt").touch()
    zoo = load_zoo(zoo_file)
    assert [e.id for e in zoo.entries] == list(meta["model_id"])
    assert [e.category for e in zoo.entries] == list(meta["category"])
    assert [e.metadata["accuracy"] for e in zoo.entries] == list(meta["accuracy"])
    timm = {m for m in meta["model_id"] if m.startswith("resnet50.") and m.endswith("_in1k")}
    assert len(timm) == 9
    for entry in zoo.entries:
        assert entry.factory == ("timm:resnet50" if entry.id in timm else "torchvision:resnet50")
        assert entry.weights == str(tmp_path / "weights" / f"{entry.id}.pt")
        assert entry.settings == {"data": f"imagefolder:{tmp_path / 'imagenet' / 'val'}", "trials": 3, "seed": 0,
                                  "images": 10000, "data_seed": 0, "probes": ["rerandomize"]}
