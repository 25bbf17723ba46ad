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
    "images": ([*MEASURE, "--images", "61", "--strict-images"], "asked for 61 images but data 'd.npz' has only 60"),
    "reinit without reference": ([*MEASURE, "--probe", "reinit"], "--probe reinit needs --reference"),
    "interpolate without reference": ([*MEASURE, "--probe", "interpolate"], "--probe interpolate needs --reference"),
    "interpolate alpha": ([*MEASURE, "--probe", "interpolate", "--reference", "w.pt", "--alpha", "2"],
                          r"Expected `alpha` to be in \[0, 1\], got 2"),
    "out folder": ([*MEASURE, "--out", "w.pt/r.csv"], "output folder 'w.pt' cannot be created: 'w.pt' is a file"),
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


def test_images_above_the_data_size_use_all_of_it_with_a_warning_and_out_folders_are_created(work):
    r = run(*MEASURE, "--trials", "1", "--images", "10000", "--out", "new/deeper/r.csv", cwd=work)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "layercrit: warning: asked for 10000 images but data 'd.npz' has only 60; using all 60"
    assert (pd.read_csv(work / "new" / "deeper" / "r.csv")["n"] == 60).all()


def test_interpolate_probe_from_the_cli(work):
    r = run(*MEASURE, "--probe", "interpolate", "--reference", "w.pt", "--alpha", "1", "--out", "i.csv", cwd=work)
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(work / "i.csv")
    rows = t[t["probe"] == "interpolate"]
    assert len(rows) == 2 and (rows["criticality"].abs() < 1e-6).all()  # α = 1 is the model itself
    assert (rows["target"] == "alpha=1,sigma=0").all()


def _help(command: str) -> str:
    """`layercrit COMMAND --help` as printed (in-process: argparse exits after printing)."""
    import contextlib
    import io

    from layercrit.cli.app import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    return " ".join(buf.getvalue().split())  # wrapping aside


def test_help_is_complete_for_every_command(monkeypatch):
    """Every command has a description and help for every argument; plot kinds and probes are described
    by their docstrings' whole first sentence (not a line cut mid-sentence); every probe and data spec
    is listed where a command takes them."""
    import argparse

    from layercrit.cli._help import _first_sentence
    from layercrit.cli.app import build_parser
    from layercrit.data import SPECS
    from layercrit.engine.probes import PROBES, list_probes
    from layercrit.viz import PLOTS

    monkeypatch.setenv("COLUMNS", "80")
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for name, p in sub.choices.items():
        text = _help(name)
        assert p.description and " ".join(p.description.split()) in text, name
        for action in p._actions:
            assert action.help, (name, action.dest)
        options = {o for a in p._actions for o in a.option_strings}
        if options & {"--data", "--test-data"}:
            for form, what in SPECS.items():
                assert f"{form}: {' '.join(what.split())}" in text, (name, form)
    plot = _help("plot")
    for kind, fn in PLOTS.items():
        sentence = _first_sentence(fn.__doc__)
        assert sentence.endswith(")") or sentence.endswith("."), (kind, sentence)  # a whole sentence
        assert f"{kind}: {sentence}" in plot, kind
    assert _first_sentence("A b\nc. D e.\n\nMore.") == "A b c."
    measure_help = _help("measure")
    for name in list_probes():
        assert f"{name}: {_first_sentence(PROBES.get(name).__doc__)}" in measure_help, name
    assert "--alpha" in measure_help and "--sigma" in measure_help and "--strict-images" in measure_help


def test_train_into_a_new_folder_then_modcrit_plots_find_their_companion_files(work, monkeypatch):
    """`train --out runs/fcn` needs no mkdir; the training bar has a total in batches; `plot
    modcrit-curves --results m.csv` reads m.curve.csv, network-vs-epsilon m.network.csv, and a
    missing companion is named in the error."""
    import layercrit.training.trainer as training

    r = run("train", "--model", "userfcn.py:make", "--data", "d.npz", "--test-data", "d.npz", "--epochs", "2",
            "--out", "runs/fcn", "--quiet", cwd=work)
    assert r.returncode == 0, r.stderr
    assert (work / "runs" / "fcn" / "manifest.json").is_file()
    r = run("modcrit", "runs/fcn", "--fast", "--alphas", "3", "--noise-draws", "2", "--out", "mc/m.csv", "--quiet", cwd=work)
    assert r.returncode == 0, r.stderr
    for kind in ("modcrit-curves", "network-vs-epsilon"):
        r = run("plot", kind, "--results", "mc/m.csv", "--out", f"figs/{kind}.png", cwd=work)
        assert r.returncode == 0, r.stderr
        assert (work / "figs" / f"{kind}.png").stat().st_size > 1000
    (work / "mc" / "m.network.csv").unlink()
    r = run("plot", "network-vs-epsilon", "--results", "mc/m.curve.csv", "--out", "x.png", cwd=work)
    assert r.returncode == 2 and "'mc/m.network.csv' does not exist" in r.stderr and "FILE.network.csv" in r.stderr
    # the training bar counts SGD batches of all epochs: a total and an ETA from the first batches on
    bars = []

    class Recording(training.tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(training, "tqdm", Recording)
    config = training.TrainConfig(model=str(work / "userfcn.py") + ":make", data=str(work / "d.npz"),
                                  test_data=str(work / "d.npz"), epochs=3, batch_size=16)
    training.train(config, work / "runs" / "bar", progress=True)
    (bar,) = bars
    assert bar.total == 3 * 4 and bar.n == bar.total  # 60 samples in batches of 16: 4 a epoch
