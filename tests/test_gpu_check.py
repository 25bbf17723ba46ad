"""benchmarks/gpu_check.py end to end in its dry run (device cpu, tiny sizes): the same code path as on a
GPU, writing one JSON file whose keys and numbers are checked here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PHASES = ("tests", "resnet_fp32", "resnet_bf16", "llama", "resnet_compile")
GiB = 1 << 30


def run_check(tmp: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "gpu_check.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=tmp, env=env,
                       capture_output=True, text=True, timeout=timeout)
    return r, out


@pytest.fixture(scope="module")
def dry(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("gpu_check")
    r, out = run_check(tmp, "--dry-run")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return json.loads(out.read_text()), tmp


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_writes_every_phase_once(dry):
    doc, tmp = dry
    assert set(doc) == {"meta", "phases", "comparison", "skipped"}
    meta = doc["meta"]
    assert meta["dry_run"] is True and meta["device"] == "cpu" and meta["finished"] is True
    assert tuple(doc["phases"]) == PHASES
    for name, phase in doc["phases"].items():
        assert phase["status"] in ("ok", "skipped"), (name, phase)
    for name in ("tests", "resnet_fp32", "resnet_bf16", "llama"):
        assert doc["phases"][name]["status"] == "ok", name
    skipped = [name for name, p in doc["phases"].items() if p["status"] == "skipped"]
    assert [s.split(":")[0] for s in doc["skipped"]] == skipped  # every skip recorded with its reason
    assert sorted(p.name for p in tmp.iterdir()) == ["gpu_check.json"]  # written atomically: no temporary left


def test_dry_run_runs_the_cuda_tests_which_skip_here(dry):
    tests = dry[0]["phases"]["tests"]
    assert "tests/test_cuda.py" in tests["files"]
    assert tests["counts"]["skipped"] >= 8 and "failed" not in tests["counts"]


def test_dry_run_resnet_numbers_are_sane(dry):
    doc = dry[0]
    fp32, bf16 = doc["phases"]["resnet_fp32"], doc["phases"]["resnet_bf16"]
    for p in (fp32, bf16):
        assert p["images"] == 8 and p["layers"] == 3 and p["probes"] == 3 * 2  # 3 layers x 2 trials
        assert _finite_positive(p["images_per_s"]) and _finite_positive(p["projected_protocol_s"])
        assert p["images_per_s"] == pytest.approx(p["images"] / p["seconds"])
        assert p["projected_protocol_s"] == pytest.approx(p["seconds"] * 10_000 / p["images"])
        assert p["image_forwards_per_s"] == pytest.approx(p["images_per_s"] * (p["probes"] + 1))
        assert 0 <= p["mean_criticality"] <= 1
        assert p["executor_used"] == "incremental"
    assert (fp32["autocast"], bf16["autocast"]) == (None, "bf16")
    diff = doc["comparison"]["bf16_vs_fp32"]
    assert diff["probes"] == 6
    for k in ("max_abs_diff", "mean_abs_diff", "max_rel_diff"):
        assert math.isfinite(diff[k])
    # Off CUDA the engine ignores autocast: the same numbers (the GPU run measures the real difference).
    assert diff["autocast_effective"] is False and diff["max_abs_diff"] == 0
    compiled = doc["phases"]["resnet_compile"]
    if compiled["status"] == "ok":
        assert compiled["compile"] == "eager" and doc["comparison"]["compile_vs_eager"]["max_abs_diff"] < 1e-5
    else:
        assert compiled["reason"].startswith("time budget")


def test_dry_run_llama_and_the_memory_arithmetic(dry):
    llama = dry[0]["phases"]["llama"]
    assert llama["executor_used"] == "prefix" and llama["dtype"] == "bfloat16"
    assert llama["criticality_finite"] and _finite_positive(llama["tokens_per_s"])
    assert llama["probes"] == llama["blocks"] * llama["trials"]
    assert llama["peak_memory_bytes"] is None  # max_memory_allocated needs CUDA
    assert _finite_positive(llama["memory_arithmetic"]["total_bytes"])
    # The README's 7B table (Llama-2-7B, B = 16, T = 1024, bf16), row by row:
    rows = llama["readme_7b_arithmetic"]["rows_bytes"]
    assert rows["weights"] == 6.74e9 * 2  # 12.6 GiB
    assert rows["kept_boundaries"] == 8 * 16 * 1024 * 4096 * 2 == GiB  # every 4th of 31 boundaries, 128 MiB each
    assert rows["probed_block_original"] == 202e6 * 2  # 0.4 GiB
    assert rows["values_of_one_pass"] == 5 * 202e6 * 2  # 5 draws in the 2 GiB values budget
    assert rows["logits_unmodified_and_one_probe"] == 2 * 16 * 1024 * 32000 * 2  # 2 GiB
    assert rows["measures_float64_chunk"] == 256 << 20
    assert rows["activations_rerun_blocks"] == 3 * 16 * 1024 * 11008 * 2  # about 1 GiB
    assert 18 < llama["readme_7b_arithmetic"]["total_gib"] < 20  # "about 20 GiB in all"


def test_without_cuda_the_real_check_refuses_in_one_line(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real check")
    r, out = run_check(tmp_path, timeout=120)
    assert r.returncode == 2 and not out.exists()
    assert r.stderr.strip().splitlines() == [
        "layercrit: error: the GPU check needs CUDA (torch.cuda.is_available() is false); use --dry-run"]
