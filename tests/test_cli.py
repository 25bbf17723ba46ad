"""The CLI through subprocesses, as a user runs it. Bad-input cases run concurrently."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ENV = os.environ | {"PYTHONWARNINGS": "ignore"}
USER_MODEL = '''
import torch.nn as nn

def make(hidden=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 3))

def broken():
    raise RuntimeError("no")
'''


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "layercrit", *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "userfcn.py").write_text(USER_MODEL)
    sys.path.insert(0, str(d))
    import userfcn

    sys.path.pop(0)
    torch.manual_seed(0)
    model = userfcn.make()
    torch.save(model.state_dict(), d / "w.pt")
    torch.save(userfcn.make(hidden=8).state_dict(), d / "w_other.pt")
    torch.save({"w": [1, 2]}, d / "notsd.pt")
    torch.save({"layer.weight": torch.zeros(2), "hook": np.dtype}, d / "code.pt")
    rng = np.random.default_rng(0)
    np.savez(d / "d.npz", x=rng.normal(size=(60, 1, 4, 4)).astype(np.float32), y=np.arange(60) % 3)
    np.savez(d / "wide.npz", x=rng.normal(size=(10, 5)).astype(np.float32), y=np.zeros(10, dtype=int))
    np.savez(d / "labels.npz", x=rng.normal(size=(10, 16)).astype(np.float32), y=np.arange(10))
    return d


MEASURE = ["measure", "--model", "userfcn.py:make", "--weights", "w.pt", "--data", "d.npz", "--quiet"]
BAD = {
    "unknown model": (["measure", "--model", "resnet9000", "--data", "digits"], "unknown model 'resnet9000'"),
    "unknown factory": (["measure", "--model", "userfcn.py:nope", "--data", "d.npz"], "has no callable 'nope'"),
    "factory file missing": (["measure", "--model", "nofile.py:make", "--data", "d.npz"], "model file 'nofile.py' does not exist"),
    "module missing": (["measure", "--model", "no_such_pkg.mod:make", "--data", "d.npz"], "cannot import module 'no_such_pkg.mod'"),
    "weights missing": ([*MEASURE[:4], "missing.pt", *MEASURE[5:]], "weights file 'missing.pt' does not exist"),
    "not a state dict": ([*MEASURE[:4], "notsd.pt", *MEASURE[5:]], "does not hold a state dict"),
    "pickled code": ([*MEASURE[:4], "code.pt", *MEASURE[5:]], "pickled objects other than tensors"),
    "keys mismatch": ([*MEASURE[:4], "w_other.pt", *MEASURE[5:]], r"shape mismatch \(file vs model\) 1.weight \(8, 16\) vs \(32, 16\)"),
    "data missing": ([*MEASURE[:6], "none.npz", "--quiet"], "data file 'none.npz' does not exist"),
    "data shape": ([*MEASURE[:6], "wide.npz", "--quiet"], r"cannot take inputs of shape \(5,\)"),
    "labels outside": ([*MEASURE[:6], "labels.npz", "--quiet"], "labels range over 0..9 but the model has 3 outputs"),
    "selector": ([*MEASURE, "--layers", "conv*"], "layer selector 'conv\\*' matches none"),
    "trials": ([*MEASURE, "--trials", "0"], "Expected `trials` to be a positive integer, got 0"),
    "images": ([*MEASURE, "--images", "61"], "asked for 61 images but data 'd.npz' has only 60"),
    "reinit without reference": ([*MEASURE, "--probe", "reinit"], "--probe reinit needs --reference"),
    "out folder": ([*MEASURE, "--out", "nodir/r.csv"], "output folder 'nodir' does not exist"),
    "out extension": ([*MEASURE, "--out", "r.txt"], "unsupported extension"),
    "bad flag": (["measure", "--model", "fcn-3x256", "--data", "digits", "--trials", "x"], "invalid int value"),
    "factory raises": (["layers", "--model", "userfcn.py:broken"], "model factory 'userfcn.py:broken' raised RuntimeError: no"),
}


@pytest.fixture(scope="module")
def bad_runs(work):
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "layercrit", *args, *(["--out", "partial.csv"] if name == "selector" else [])],
                               cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for name, (args, _) in BAD.items()
    }
    return {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_nonzero_exit(case, bad_runs, work):
    code, out, err = bad_runs[case]
    _, expected = BAD[case]
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("layercrit: ")
    import re

    assert re.search(expected, lines[0]), lines[0]
    assert not (work / "partial.csv").exists()  # a failed run leaves no output file


def test_layers_lists_user_model(work):
    r = run("layers", "--model", "userfcn.py:make", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "Linear" in r.stdout and "2 probe-able layers, 643 parameters" in r.stdout
    r = run("layers", "--model", "fcn-3x256", "--json", cwd=work)
    assert r.returncode == 0 and '"label": "classifier"' in r.stdout


def test_measure_user_factory_weights_npz(work):
    r = run(*MEASURE, "--trials", "2", "--out", "res.csv", cwd=work)
    assert r.returncode == 0, r.stderr
    assert "criticality" in r.stdout and "wrote res.csv" in r.stdout
    t = pd.read_csv(work / "res.csv")
    assert list(t["layer"]) == ["(unmodified)", "1", "1", "3", "3"]
    for col in ["model", "layer", "label", "probe", "trial", "seed", "n", "criticality", "accuracy", "top5",
                "accuracy_drop", "agreement", "l1", "l2", "kl"]:
        assert col in t.columns
    assert (t["n"] == 60).all() and t["model"].eq("userfcn.py:make").all()
    assert (work / "res.config.json").is_file()
    again = run(*MEASURE, "--trials", "2", "--out", "res2.json", cwd=work)
    assert again.returncode == 0
    import json

    rows = json.loads((work / "res2.json").read_text())["rows"]
    np.testing.assert_allclose([r["criticality"] for r in rows], t["criticality"])  # same command, same numbers


def test_demo_end_to_end(tmp_path):
    r = run("demo", "--out", str(tmp_path / "demo"), "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "demo" / "criticality.csv")
    assert Path(tmp_path / "demo" / "criticality.png").stat().st_size > 10_000
    layers = t[t["probe"] == "rerandomize"].groupby("layer")["criticality"].mean()
    reinit = t[t["probe"] == "reinit"].set_index("layer")["criticality"]
    assert (layers > reinit.reindex(layers.index) + 0.2).all(), (layers, reinit)  # a measured outcome
    assert t[t["probe"] == "none"]["accuracy"].iloc[0] > 0.9
