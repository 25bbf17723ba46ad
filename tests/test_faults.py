"""Bad data and faults end in one clean line (or a correct result), never a traceback or a half-written file."""

import errno
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from layercrit import LayercritError
from layercrit._utils.io import atomic_path, check_output_path
from layercrit.cli.app import main

ENV = os.environ | {"PYTHONWARNINGS": "ignore"}
USER_MODEL = '''
import torch.nn as nn

def make(hidden=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 3))

def two_classes():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
'''
ZOO = '''
[defaults]
data = "d.npz"
trials = 2
{models}
'''
MODEL = '''
[[model]]
id = "{id}"
factory = "userfcn.py:{factory}"
{weights}
'''


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    (d / "userfcn.py").write_text(USER_MODEL)
    ns: dict = {}
    exec(USER_MODEL, ns)
    torch.manual_seed(0)
    torch.save(ns["make"]().state_dict(), d / "w.pt")
    torch.save(ns["make"](hidden=8).state_dict(), d / "w8.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 1, 4, 4)).astype(np.float32)
    np.savez(d / "d.npz", x=x, y=np.arange(30) % 3)
    x[11, 0, 1, 2] = np.nan  # one NaN pixel in one sample
    np.savez(d / "nan.npz", x=x, y=np.arange(30) % 3)
    return d


def _cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip()]


def test_a_failed_write_names_the_file_and_leaves_it_as_it_was(tmp_path):
    path = tmp_path / "r.csv"

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(LayercritError, match=r"could not write '.*r\.csv' \(\[Errno 28\] No space left on device\); "
                                             r"nothing was written, the file was not created"):
        with atomic_path(path) as tmp:
            full(tmp)
    path.write_text("old")
    with pytest.raises(LayercritError, match="nothing was written, the file was left unchanged"):
        with atomic_path(path) as tmp:
            tmp.write_text("new, half")
            full(tmp)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["r.csv"]  # no temporary file left either


def test_full_disk_message_through_the_cli(tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32), y=np.arange(8))
    code, _, err = _cli(capsys, "measure", "--model", "fcn-3x64", "--data", "d.npz", "--trials", "1", "--quiet",
                        "--out", "r.csv")
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("layercrit: error: could not write 'r.csv' ([Errno 28] No space left on device); "
                      "nothing was written, the file was not created")
    assert sorted(os.listdir(tmp_path)) == ["d.npz"]


def test_a_checkpoint_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    """torch.save writes through a real file that refuses data (/dev/full): OSError 28, not torch's RuntimeError."""
    from layercrit._utils import io
    from layercrit.training import checkpoints

    def full(*args, **kwargs):
        fd = os.open("/dev/full", os.O_WRONLY)
        return fd, str(tmp_path / "full")

    os.symlink("/dev/full", tmp_path / "full")
    monkeypatch.setattr(io.tempfile, "mkstemp", full)
    with pytest.raises(LayercritError, match=r"could not write '.*epoch_0001\.pt' \(\[Errno 28\] No space left on "
                                             r"device\); nothing was written, the file was not created"):
        checkpoints.save_checkpoint(tmp_path / "epoch_0001.pt", {"w": torch.zeros(1000)})
    assert not (tmp_path / "epoch_0001.pt").exists()


def test_a_full_results_store_keeps_what_was_written(tmp_path):
    """SQLite's own "database or disk is full" (a page limit stands in for the disk)."""
    from layercrit.zoo.store import Store

    row = dict(model="m", layer="fc", label="fc", probe="rerandomize", target="", trial=0, seed=1, n=10,
               criticality=0.5, accuracy=0.9)
    with Store(tmp_path / "r.sqlite") as store:
        store.add_results([row], config_hash="h")
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages + 1}")
        many = [dict(row, layer=f"fc{i}", label="x" * 500) for i in range(2000)]
        with pytest.raises(LayercritError, match=r"could not write results store '.*r\.sqlite' \(database or disk is "
                                                 r"full\); this batch of results was not written, those written before"):
            store.add_results(many, config_hash="h")
        assert store.count() == 1
    with Store(tmp_path / "r.sqlite") as store:
        assert store.results()["layer"].tolist() == ["fc"]


def test_output_paths_are_checked_before_compute_and_their_folders_created(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(LayercritError, match=r"output folder '.*file/sub' cannot be created: '.*file' is a file"):
        check_output_path(tmp_path / "file" / "sub" / "r.csv", (".csv",))
    path = check_output_path(tmp_path / "a" / "b" / "r.csv", (".csv",))
    assert not (tmp_path / "a").exists()  # checking creates nothing: a run that fails leaves no folder
    with atomic_path(path) as tmp:
        tmp.write_text("x")
    assert path.read_text() == "x"


def test_non_finite_inputs_are_refused_up_front(work, capsys, monkeypatch):
    monkeypatch.chdir(work)
    code, out, err = _cli(capsys, "measure", "--model", "userfcn.py:make", "--weights", "w.pt", "--data", "nan.npz", "--quiet")
    assert code == 2 and out == "" and len(err) == 1
    assert err[0] == ("layercrit: error: data 'nan.npz' has non-finite values (NaN or inf) in 1 of 30 samples "
                      "(first: sample 11); fix or drop them")


def _zoo(work, name, models):
    text = ZOO.format(models="".join(MODEL.format(id=i, factory=f, weights=f'weights = "{w}"' if w else "")
                                      for i, f, w in models))
    (work / name).write_text(text)
    return work / name


@pytest.mark.parametrize("models, expected", [
    ([("ok", "make", "w.pt"), ("m", "make", "w8.pt")],
     ["layercrit: error: model 'm': weights in '{work}/w8.pt' do not match the model: shape mismatch (file vs model) "
      "1.weight (8, 16) vs (16, 16)"]),
    ([("m", "two_classes", None)],
     ["layercrit: error: model 'm': labels range over 0..2 but the model has 2 outputs (classes 0..1) (nothing was run)"]),
    ([("a", "two_classes", None), ("ok", "make", None), ("b", "make", "w8.pt")],
     ["layercrit: error: 2 models of '{work}/zoo.toml' fail validation (nothing was run):",
      "layercrit: error:   - model 'a': labels range over 0..2",
      "layercrit: error:   - model 'b': weights in '{work}/w8.pt' do not match"]),
])
def test_a_zoo_whose_model_fails_validation_writes_no_store(work, models, expected):
    zoo = _zoo(work, "zoo.toml", models)
    store = work / "s.sqlite"
    r = subprocess.run([sys.executable, "-m", "layercrit", "sweep", str(zoo), "--store", str(store), "--quiet"],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=work)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and r.stdout == "" and len(lines) == len(expected), r.stderr
    for line, want in zip(lines, expected):
        assert line.startswith(want.format(work=work)), (line, want)
    assert not list(work.glob("s.sqlite*"))  # no store, no WAL
