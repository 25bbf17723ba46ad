"""benchmarks/gpu_check.py's dry run with the real libraries: torchvision's ResNet (resnet18 at 16x16,
the code path of the GPU run's ResNet-50) and a Llama built by transformers from a `LlamaConfig` in bf16
(the GPU run's 1.1 B model, tiny), both measured as on the GPU, on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_takes_the_torchvision_and_transformers_paths(tmp_path):
    out = tmp_path / "dry.json"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--budget", "600",
                        "--skip", "tests", "resnet_compile", "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert doc["meta"]["torchvision"] and doc["meta"]["transformers"]
    fp32, bf16, llama = (doc["phases"][k] for k in ("resnet_fp32", "resnet_bf16", "llama"))
    for p in (fp32, bf16):
        assert p["status"] == "ok" and p["model"] == "torchvision:resnet18" and p["probes"] == 6
        assert p["executor_used"] == "incremental" and p["images_per_s"] > 0 and p["projected_protocol_s"] > 0
    assert math.isfinite(doc["comparison"]["bf16_vs_fp32"]["max_abs_diff"])
    assert llama["status"] == "ok" and llama["model"].startswith("transformers LlamaConfig")
    assert llama["dtype"] == "bfloat16" and llama["executor_used"] == "prefix"
    assert llama["blocks"] == 3 and llama["probes"] == 3 * 2 and llama["criticality_finite"]
    # parameters of LlamaForCausalLM(vocab 128, width 32, MLP 64, 3 blocks, 4 heads / 2 key-value heads of 8):
    # embeddings and head 2 x 128 x 32; per block q, o 32 x 32, k, v 32 x 16, MLP 3 x 32 x 64, 2 norms of 32; final norm 32
    block = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 64 + 2 * 32
    assert llama["parameters"] == 2 * 128 * 32 + 3 * block + 32
    assert llama["memory_arithmetic"]["rows_bytes"]["weights"] == 2 * llama["parameters"]
