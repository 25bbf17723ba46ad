"""benchmarks/gpu_check.py end to end in its dry run (device cpu, tiny sizes): the same code path as on a
GPU, writing one JSON file whose keys and numbers are checked here."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
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
    r, out = run_check(tmp, "--dry-run", "--budget", "600")  # every phase runs: the numbers below are all there
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
        assert phase["status"] == "ok", (name, phase)
        assert phase["wall_s"] >= 0
    assert doc["skipped"] == []
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
    assert compiled["compile"] == "eager" and doc["comparison"]["compile_vs_eager"]["max_abs_diff"] < 1e-5


def test_dry_run_llama_and_the_memory_arithmetic(dry):
    llama = dry[0]["phases"]["llama"]
    assert llama["executor_used"] == "prefix" and llama["dtype"] == "bfloat16"
    assert llama["criticality_finite"] and _finite_positive(llama["tokens_per_s"])
    assert llama["probes"] == llama["blocks"] * llama["trials"]
    assert llama["peak_memory_bytes"] is None  # max_memory_allocated needs CUDA
    assert _finite_positive(llama["memory_arithmetic"]["total_bytes"])
    # The 7B table of docs/performance.md (Llama-2-7B, B = 16, T = 1024, bf16), row by row:
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


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules["gpu_check"])
    return module


def test_the_time_budget_skips_or_stops_a_phase_and_records_why(tmp_path):
    """No time left: the phase does not start (`skipped`); one second left: a phase that would take
    longer is stopped (`timed_out`); a phase that raises is `failed` with its one-line reason. Each is
    in the JSON, and the phases after it still run."""
    gc = _module()
    sizes = gc.dry_sizes()
    sizes.budget_s, sizes.reserve_s = 0.0, {}
    out = tmp_path / "c.json"
    check = gc.Check(out, sizes, dry=True)
    ran = []
    assert check.run("resnet_compile", lambda: ran.append(1)) is None and ran == []
    sizes.budget_s = check.left() + sizes.budget_s + 1.0  # one second from now
    assert check.run("llama", lambda: time.sleep(30)) is None
    sizes.budget_s += 60

    def broken():
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    assert check.run("resnet_bf16", broken) is None
    assert check.run("resnet_fp32", lambda: {"status": "ok", "seconds": 1.0})["seconds"] == 1.0
    doc = json.loads(out.read_text())
    phases = doc["phases"]
    assert phases["resnet_compile"]["status"] == "skipped" and phases["resnet_compile"]["reason"].startswith("time budget")
    assert phases["llama"]["status"] == "timed_out" and phases["llama"]["reason"].startswith("time budget: stopped after")
    assert phases["resnet_bf16"]["status"] == "failed"
    assert phases["resnet_bf16"]["reason"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert phases["resnet_fp32"]["status"] == "ok"
    assert [s.split(":")[0] for s in doc["skipped"]] == ["resnet_compile", "llama"]
