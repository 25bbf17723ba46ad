"""The HTML report: built from each source, self-contained, and rendered in headless Chromium."""

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from layercrit import LayercritError, TrainConfig, load_data, measure, train
from layercrit.testing import TinyCNN
from layercrit.viz.report import build_report
from layercrit.zoo.store import Store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def _offline(text: str) -> None:
    assert not re.search(r'(src|href)="(https?:)?//', text), "the report must not load anything from the network"


@pytest.fixture(scope="module")
def results_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report"
    data = load_data("digits").subset(120)
    r = measure(TinyCNN(), data, factory=TinyCNN, probes=["rerandomize", "zero"], trials=2)
    return build_report(out, results=r, title="tiny")


def test_results_report_is_self_contained(results_report):
    text = results_report.read_text()
    _offline(text)
    assert text.count('src="data:image/png;base64,') >= 2
    assert "Main result" in text and "critical" in text and "What was run" in text and "<table" in text
    assert 'content="0"' not in text  # figures were drawn


def test_store_report(tmp_path):
    rng = np.random.default_rng(0)
    with Store(tmp_path / "s.sqlite") as s:
        for i, (cat, acc) in enumerate([("baseline", 90.0), ("adversarial", 80.0), ("adversarial", 75.0), ("augmentation", 92.0)]):
            s.put_model(f"m{i}", cat, {"accuracy": acc, "epsilon": float(i)})
            rows = [{"model": f"m{i}", "layer": layer, "label": layer, "probe": "rerandomize", "target": "rerandomize",
                     "trial": t, "criticality": float(rng.uniform(0, 1))} for layer in ("conv1", "layer1.0.conv1", "fc")
                    for t in range(3)]
            s.add_results(rows, "h")
    path = build_report(tmp_path / "rep", store=tmp_path / "s.sqlite")
    text = path.read_text()
    _offline(text)
    assert text.count("data:image/png;base64,") >= 4 and "m3" in text and "Correlations" in text


def test_checkpoints_report(tmp_path):
    train(TrainConfig(model="fcn-3x64", data="digits:train", epochs=3), tmp_path / "run")
    settings = {"alphas": 5, "noise_draws": 2, "train_subset": 200}
    text = build_report(tmp_path / "rep", checkpoints=tmp_path / "run", modcrit=settings).read_text()
    _offline(text)
    assert text.count("data:image/png;base64,") >= 4 and "Module criticality" in text and "E0" in text


def test_bad_report_arguments(tmp_path):
    with pytest.raises(LayercritError, match="exactly one of"):
        build_report(tmp_path / "r")
    with pytest.raises(LayercritError, match="does not exist"):
        build_report(tmp_path / "r", store=tmp_path / "none.sqlite")
    (tmp_path / "f").write_text("")
    with pytest.raises(LayercritError, match="cannot be created: '.*f' is a file"):
        build_report(tmp_path / "f" / "b", results=tmp_path / "x.csv")
    with pytest.raises(LayercritError, match="does not exist"):  # a missing folder is created, but only on success
        build_report(tmp_path / "a" / "b", results=tmp_path / "x.csv")
    assert not (tmp_path / "r").exists() and not (tmp_path / "a").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (make test installs Debian's chromium as root)")
def test_report_renders_in_headless_chromium(results_report, tmp_path):
    url = results_report.resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert m, dom.stderr[-2000:]
    loaded, total = map(int, m.groups())
    assert total >= 2 and loaded == total  # every figure decoded, none broken
    width = re.search(r'data-figure-width="([\d.]+)"', dom.stdout)
    assert width and float(width.group(1)) >= 0.99  # every figure spans its column, however small its PNG
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *FLAGS, *profile, "--window-size=1200,1800", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # not blank: text and figures were painted
    Path(shot).replace(Path(results_report).parent / "screenshot.png")
