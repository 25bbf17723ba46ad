"""Zoo sweeps: validation, local and Ray backends, kill -9 and resume, concurrent writers."""

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from layercrit import LayercritError, load_data, measure
from layercrit.training.checkpoints import build_model
from layercrit.zoo.store import Store
from layercrit.zoo.sweep import sweep
from layercrit.zoo.zoofile import load_zoo

USER_MODEL = '''
import torch.nn as nn

def make(hidden=32):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))
'''
ZOO = '''
[defaults]
data = "test.npz"
probe = "rerandomize"
trials = {trials}
seed = 0

[[model]]
id = "fcn-a"
factory = "userfcn.py:make"
weights = "a.pt"
category = "baseline"
accuracy = 91.0

[[model]]
id = "fcn-b"
factory = "userfcn.py:make"
weights = "b.pt"
category = "long"
accuracy = 94.0

[[model]]
id = "fcn-c"
factory = "userfcn.py:make"
weights = "c.pt"
category = "long"
accuracy = 96.0
'''
KEY = ["model", "layer", "probe", "target", "trial"]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    """Three small FCNs trained on digits for 1, 3 and 6 epochs, the digits test split as .npz."""
    d = tmp_path_factory.mktemp("zoo")
    (d / "userfcn.py").write_text(USER_MODEL)
    ns: dict = {}
    exec(USER_MODEL, ns)
    test, train = load_data("digits"), load_data("digits:train")
    np.savez(d / "test.npz", x=test.x.numpy(), y=test.y.numpy())
    for i, (name, epochs) in enumerate([("a", 1), ("b", 3), ("c", 6)]):
        torch.manual_seed(i)
        m = ns["make"]()
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        for _ in range(epochs):
            for j in range(0, len(train), 128):
                loss = torch.nn.functional.cross_entropy(m(train.x[j : j + 128]), train.y[j : j + 128])
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch.save(m.state_dict(), d / f"{name}.pt")
    (d / "zoo.toml").write_text(ZOO.format(trials=3))
    (d / "big.toml").write_text(ZOO.format(trials=12))
    return d


def _rows(store_path):
    with Store(store_path, create=False) as s:
        return s.results().sort_values(KEY).reset_index(drop=True)


def test_zoo_validation_reports_every_problem(zoo_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'''
[defaults]
data = "{zoo_dir / "test.npz"}"
trails = 3
trials = 0

[[model]]
id = "m1"
factory = "{zoo_dir / "userfcn.py"}:make"
weights = "missing.pt"
lr = 0.1

[[model]]
id = "m1"
factory = "nofile.py:make"
probe = "reinit"

[[model]]
factory = "fcn-3x64"
data = "nowhere.npz"
''')
    with pytest.raises(LayercritError) as e:
        load_zoo(bad)
    problems = "\n".join(e.value.problems)
    for expected in ["[defaults]: unknown key 'trails'", "[defaults]: `trials` should be a positive integer, got 0",
                     "model 'm1': weights 'missing.pt' not found", "model 'm1': unknown key 'lr'",
                     "model 'm1': duplicate id", "factory file 'nofile.py' not found",
                     "probe 'reinit' needs a `reference`", "[[model]] #3: needs an `id`",
                     "data 'nowhere.npz' not found"]:
        assert expected in problems, (expected, problems)
    assert len(e.value.problems) == 9
    r = subprocess.run([sys.executable, "-m", "layercrit", "sweep", str(bad), "--store", str(tmp_path / "s.sqlite")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 + 9  # a header and one line per problem
    assert not (tmp_path / "s.sqlite").exists()  # nothing ran, nothing written
    (tmp_path / "broken.toml").write_text("[defaults\n")
    with pytest.raises(LayercritError, match="is not valid TOML"):
        load_zoo(tmp_path / "broken.toml")


def test_local_sweep_values_and_idempotence(zoo_dir, tmp_path):
    store = tmp_path / "s.sqlite"
    report = sweep(zoo_dir / "zoo.toml", store, progress=False)
    assert report.total_units == 3 * (1 + 3 * 3) and report.added == report.total_units and not report.failures
    again = sweep(zoo_dir / "zoo.toml", store, progress=False)
    assert again.added == 0 and again.items == 0 and again.done_before == report.total_units
    rows = _rows(store)
    assert len(rows) == 30 and not rows.duplicated(KEY).any()
    assert rows["data_identity"].nunique() == 1
    # the same numbers as measuring the model directly
    data = load_data(str(zoo_dir / "test.npz"))
    model, factory = build_model(f"{zoo_dir / 'userfcn.py'}:make", zoo_dir / "b.pt", None, data)
    direct = measure(model, data, factory=factory, trials=3).table
    mine = rows[rows["model"] == "fcn-b"].set_index(["layer", "trial"]).sort_index()
    theirs = direct[direct["probe"] == "rerandomize"].set_index(["layer", "trial"]).sort_index()
    np.testing.assert_allclose(mine.loc[theirs.index, "criticality"], theirs["criticality"], rtol=0, atol=0)
    with Store(store) as s:
        models = s.models()
        runs = s.runs()
    assert list(models["category"]) == ["baseline", "long", "long"] and list(models["accuracy"]) == [91.0, 94.0, 96.0]
    assert len(runs) == 2 and runs["layercrit_version"].notna().all() and json.loads(runs["config"][0])["models"]


@pytest.fixture(scope="module")
def big_reference(zoo_dir, tmp_path_factory):
    """The big zoo swept without interruption."""
    reference = tmp_path_factory.mktemp("ref") / "ref.sqlite"
    sweep(zoo_dir / "big.toml", reference, chunk_layers=1, progress=False)
    return reference


def _start_and_wait_for_rows(zoo, store, rows=8, stderr=subprocess.DEVNULL):
    """A CLI sweep of `zoo` in a subprocess, returned once `store` holds at least `rows` results."""
    cmd = [sys.executable, "-m", "layercrit", "sweep", str(zoo), "--store", str(store), "--chunk-layers", "1", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    count, deadline = 0, time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store.exists():
            try:
                with sqlite3.connect(store, timeout=5) as db:
                    count = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
            except sqlite3.OperationalError:  # the schema is still being created
                count = 0
            if count >= rows:
                break
        time.sleep(0.02)
    return proc, count


def test_sigkill_midway_then_resume_gives_the_uninterrupted_rows(zoo_dir, tmp_path, big_reference):
    reference = big_reference
    killed = tmp_path / "killed.sqlite"
    proc, count = _start_and_wait_for_rows(zoo_dir / "big.toml", killed)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    total = 3 * (1 + 3 * 12)
    assert 0 < count < total, count  # it really was killed midway
    with sqlite3.connect(killed) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    report = sweep(zoo_dir / "big.toml", killed, chunk_layers=1, progress=False)
    assert report.done_before >= count and report.done_before + report.added == total
    a, b = _rows(reference), _rows(killed)
    pd.testing.assert_frame_equal(a[KEY + ["seed", "criticality", "accuracy"]], b[KEY + ["seed", "criticality", "accuracy"]])


def test_two_sweeps_writing_one_store_at_once(zoo_dir, tmp_path):
    store = tmp_path / "shared.sqlite"
    cmd = [sys.executable, "-m", "layercrit", "sweep", str(zoo_dir / "zoo.toml"), "--store", str(store),
           "--chunk-layers", "1", "--quiet"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rows = _rows(store)
    assert len(rows) == 30 and not rows.duplicated(KEY).any()
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ref = tmp_path / "ref.sqlite"
    sweep(zoo_dir / "zoo.toml", ref, progress=False)
    np.testing.assert_array_equal(rows["criticality"], _rows(ref)["criticality"])


def test_ray_backend_matches_local(zoo_dir, tmp_path):
    pytest.importorskip("ray")
    local, remote = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    sweep(zoo_dir / "zoo.toml", local, progress=False)
    report = sweep(zoo_dir / "zoo.toml", remote, backend="ray", workers=2, progress=False)
    assert report.added == 30 and not report.failures
    a, b = _rows(local), _rows(remote)
    pd.testing.assert_frame_equal(a[KEY + ["criticality", "accuracy"]], b[KEY + ["criticality", "accuracy"]])


def test_cli_sweep_summarize_export(zoo_dir, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "layercrit", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)

    r = cli("sweep", str(zoo_dir / "zoo.toml"), "--store", "s.sqlite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "30/30 units" in r.stdout and "units/s" in r.stdout
    r = cli("summarize", "--store", "s.sqlite", "--format", "json", "--exclude-category", "baseline")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [m["model"] for m in doc["models"]] and {c["subset"] for c in doc["correlations"]} == {"all", "excluding baseline"}
    rows = _rows(tmp_path / "s.sqlite")
    per_model = rows[rows["probe"] == "rerandomize"].groupby(["model", "layer"])["criticality"].mean().groupby("model").mean()
    for m in doc["models"]:
        assert m["avg_criticality"] == pytest.approx(per_model[m["model"]])
    r = cli("export", "--store", "s.sqlite", "--format", "csv", "--out", "all.csv")
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "all.csv")
    assert {"model", "layer", "probe", "trial", "seed", "criticality", "accuracy"} <= set(t.columns) and len(t) == 30
    r = cli("summarize", "--store", "none.sqlite")
    assert r.returncode == 2 and "does not exist" in r.stderr
    # vs-metadata on a zoo without ε: the error names --column and the columns to choose from; --column draws it
    r = cli("plot", "vs-metadata", "--store", "s.sqlite", "--out", "f.png")
    assert r.returncode == 2 and r.stderr.strip().endswith("choose a numeric column with --column NAME: accuracy"), r.stderr
    r = cli("plot", "vs-metadata", "--store", "s.sqlite", "--column", "accuracy", "--out", "figs/f.png")
    assert r.returncode == 0 and (tmp_path / "figs" / "f.png").stat().st_size > 1000, r.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_a_sweep_with_one_line_and_status_130_losing_nothing(zoo_dir, tmp_path, big_reference,
                                                                                    signum):
    store = tmp_path / "stopped.sqlite"
    proc, count = _start_and_wait_for_rows(zoo_dir / "big.toml", store, stderr=subprocess.PIPE)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    total = 3 * (1 + 3 * 12)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"layercrit: interrupted; the finished work items are in {str(store)!r}: "
                     "run the same command again to do the rest"], err
    with sqlite3.connect(store) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = db.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert count <= stored < total  # every item committed before the signal is still there
    if signum == signal.SIGTERM:  # the re-run completes to the uninterrupted rows
        report = sweep(zoo_dir / "big.toml", store, chunk_layers=1, progress=False)
        assert report.done_before == stored and report.done_before + report.added == total
        cols = KEY + ["seed", "criticality", "accuracy"]
        pd.testing.assert_frame_equal(_rows(big_reference)[cols], _rows(store)[cols])


def test_log_records_of_libraries_print_above_the_progress_bar(zoo_dir, tmp_path, monkeypatch, capsys):
    """Ray's start-up warning (a logging record, through Ray's own console handler) used to land
    inside the bar's line."""
    import logging

    import layercrit.zoo.sweep as sw
    from layercrit.cli.app import main

    pytest.importorskip("ray")  # its logger prints through a handler of its own (as in the CLI's ray backend)

    real = sw.run_item

    def run_item(entry, item, *a, **k):
        logging.getLogger("ray._private.authentication").warning("Token authentication is enabled for this Ray cluster.")
        return real(entry, item, *a, **k)

    monkeypatch.setattr(sw, "run_item", run_item)
    assert main(["sweep", str(zoo_dir / "zoo.toml"), "--store", str(tmp_path / "s.sqlite")]) == 0
    err = capsys.readouterr().err
    assert err.count("Token authentication") == 9, err  # once per work item (3 models × 3 trials)
    assert len(re.findall(r"(?:^|[\r\n])Token authentication[^\r\n]*\n", err)) == 9, err  # each on a line of its own


def test_a_model_failing_while_running_is_reported_once(zoo_dir, tmp_path, monkeypatch):
    import layercrit.zoo.sweep as sw

    real = sw.run_item

    def run_item(entry, item, *a, **k):
        if entry.id == "fcn-b":
            raise LayercritError("out of luck")
        return real(entry, item, *a, **k)

    monkeypatch.setattr(sw, "run_item", run_item)
    report = sweep(zoo_dir / "zoo.toml", tmp_path / "s.sqlite", progress=False)
    assert report.failures == ["model 'fcn-b': out of luck"]  # one line, not one per work item
    assert report.added == 2 * (1 + 3 * 3)


def test_records_reaching_a_root_logger_without_handlers_print_above_bars(monkeypatch, capsys):
    import logging

    from tqdm.auto import tqdm

    from layercrit._utils.io import logging_above_bars

    monkeypatch.setattr(logging.root, "handlers", [])  # as in a plain CLI process (pytest adds its own)
    with logging_above_bars():
        bar = tqdm(total=3, desc="work")
        logging.getLogger("some.library").warning("a library speaks")
        logging.getLogger("some.library").info("not shown: below WARNING, as without handlers")
        bar.update(3)
        bar.close()
    assert logging.root.handlers == []
    err = capsys.readouterr().err
    assert re.search(r"(?:^|[\r\n])a library speaks\n", err) and "not shown" not in err, err
