import json
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from layercrit import LayercritError, TrainConfig, load_data, measure, train
from layercrit.analyses.robustness import builtin_groups, robustness, weight_distances
from layercrit.testing import TinyResNet
from layercrit.training.checkpoints import Run, save_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("rob") / "fcn"
    train(TrainConfig(model="fcn-3x64", data="digits:train", epochs=4, save_epochs=[0, 1, 2, 4]), d)
    return d


def test_table_matches_independent_reinit(run_dir):
    r = robustness(run_dir, trials=2, images=120)
    t = r.table
    assert {"layer", "label", "target", "trial", "error", "criticality"} <= set(t.columns)
    targets = list(dict.fromkeys(t[t["probe"] == "reinit"]["target"]))
    assert targets == ["E0", "E1", "E2", "E4"]
    assert len(t) == 1 + 4 * 2 + 4 * 4 + 4  # final, rerandomize x2, reinit x4 epochs, whole checkpoints
    # resetting a layer to the final checkpoint changes nothing
    e4 = t[(t["target"] == "E4") & (t["probe"] == "reinit")]
    assert np.allclose(e4["criticality"], 0, atol=1e-7)
    # one cell, recomputed independently: reset fc2 of the final model to epoch 1 by hand
    run = Run(run_dir)
    model = run.model()
    with torch.no_grad():
        for name in ("fc2.weight", "fc2.bias"):
            model.get_parameter(name).copy_(run.state_dict(1)[name])
    data = load_data("digits").subset(120, 0)
    acc = float((model(data.x).argmax(1) == data.y).float().mean())
    cell = t[(t["layer"] == "fc2") & (t["target"] == "E1")].iloc[0]
    assert cell["error"] == pytest.approx(1 - acc)
    # the whole model at a checkpoint has that checkpoint's test error (from the manifest, full test set)
    full = robustness(run_dir, trials=1, layers=["fc1"], rerandomize=False)
    ck = full.table[full.table["layer"] == "(checkpoint)"].set_index("target")["error"]
    manifest = {c["epoch"]: c["test_error"] for c in json.loads((run_dir / "manifest.json").read_text())["checkpoints"]}
    for e, err in manifest.items():
        assert ck[f"E{e}"] == pytest.approx(err, abs=1e-9)


def test_distances(run_dir):
    d = weight_distances(run_dir)
    assert {"layer", "epoch", "l2", "linf", "spectral"} <= set(d.columns)
    assert (d[d["epoch"] == 0][["l2", "linf", "spectral"]] == 0).all().all()
    run = Run(run_dir)
    delta = run.state_dict(4)["fc1.weight"] - run.state_dict(0)["fc1.weight"]
    db = run.state_dict(4)["fc1.bias"] - run.state_dict(0)["fc1.bias"]
    row = d[(d["layer"] == "fc1") & (d["epoch"] == 4)].iloc[0]
    flat = torch.cat([delta.flatten(), db]).double()
    assert row["l2"] == pytest.approx(float(flat.norm() / flat.numel() ** 0.5))
    assert row["linf"] == pytest.approx(float(flat.abs().max()))
    assert row["spectral"] == pytest.approx(float(torch.linalg.svdvals(delta.double())[0]))


def test_joint_groups():
    model = TinyResNet()
    g = builtin_groups(model, "all-but-first-block-per-stage")
    assert g == {"all-but-first-block-per-stage": ["layer1.1.*", "layer2.1.*"]}
    assert builtin_groups(model, "every-second-block")["every-second-block"] == ["layer1.1.*", "layer2.1.*"]
    r = measure(model, load_data("digits").subset(20), factory=TinyResNet, trials=1, groups=g)
    assert list(r.table["layer"]) == ["(unmodified)", "all-but-first-block-per-stage"]
    assert r.table["n_params"].iloc[1] == 4 * 4 * 9 * 2 + 8 * 8 * 9 * 2
    with pytest.raises(LayercritError, match="needs a ResNet"):
        from layercrit import create_model

        builtin_groups(create_model("fcn-3x64"), "every-second-block")


def _copy(run_dir, tmp_path):
    d = tmp_path / "copy"
    shutil.copytree(run_dir, d)
    return d


def test_bad_run_folders(run_dir, tmp_path):
    with pytest.raises(LayercritError, match="does not exist"):
        Run(tmp_path / "nope")
    d = _copy(run_dir, tmp_path)
    (d / "epoch_0000.pt").unlink()
    with pytest.raises(LayercritError, match="lists epoch_0000.pt, which do not exist"):
        Run(d)
    m = json.loads((d / "manifest.json").read_text())
    m["checkpoints"] = m["checkpoints"][1:]
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LayercritError, match="has no checkpoint 0"):
        Run(d)
    (d / "manifest.json").unlink()
    with pytest.raises(LayercritError, match="has no manifest.json"):
        Run(d)


def test_corrupt_and_foreign_checkpoints(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path)
    data = (d / "epoch_0002.pt").read_bytes()
    (d / "epoch_0002.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(LayercritError, match="epoch_0002.pt.*corrupt or truncated"):
        robustness(d, trials=1, images=10)
    from layercrit import create_model

    other = create_model("fcn-3x128")
    save_checkpoint(d / "epoch_0002.pt", other.state_dict(), epoch=2, model={"spec": "fcn-3x128", "kwargs": {}})
    with pytest.raises(LayercritError, match="checkpoints of another architecture"):
        robustness(d, trials=1, images=10)


def test_cli_train_robustness_distances(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "layercrit", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    r = cli("train", "--model", "fcn-3x64", "--epochs", "3", "--save-epochs", "0-2", "--out", "run", "--quiet")
    assert r.returncode == 0, r.stderr
    assert [p.name for p in sorted((tmp_path / "run").iterdir())] == [
        "epoch_0000.pt", "epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "manifest.json"]
    r = cli("robustness", "run", "--trials", "2", "--out", "rob.csv", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "rerandomize" in r.stdout and "E0" in r.stdout and "(whole model)" in r.stdout
    t = pd.read_csv(tmp_path / "rob.csv")
    assert set(t["target"].dropna()) >= {"rerandomize", "E0", "E1", "E2", "E3"}
    r = cli("distances", "run", "--out", "dist.csv")
    assert r.returncode == 0, r.stderr
    assert "spectral" in r.stdout and len(pd.read_csv(tmp_path / "dist.csv")) == 4 * 4
    r = cli("robustness", str(tmp_path / "none"))
    assert r.returncode == 2 and r.stderr.strip() == f"layercrit: error: checkpoint folder '{tmp_path / 'none'}' does not exist"
    r = cli("train", "--model", "fcn-3x64", "--epochs", "2", "--out", "run", "--quiet")
    assert r.returncode == 2 and "already holds a training run" in r.stderr
