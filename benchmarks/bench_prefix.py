"""Issue 14: the block-prefix executor against the full forward, same run, on tiny Hugging Face
decoders (random init, >= 8 blocks): every block x 3 re-randomization trials on 256 windows of 64
tokens, 2 cores. Run with the ecosystem environment:

    .venv-eco/bin/python benchmarks/bench_prefix.py [--repeats 3] [--windows 256] [--seq-len 64] [--layers 8]

Prints the median seconds of each executor (runs interleaved), the ratio, and the largest difference
of any measure between the two (target: >= 1.7x, identical to 1e-5).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import transformers

import layercrit
from common import machine, timed


def build(kind: str, layers: int, seed: int | None = None) -> torch.nn.Module:
    """A random-init decoder; the factory (seed None) draws from the RNG state the probe seeds."""
    if seed is not None:
        torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=512, n_positions=64, n_embd=128, n_layer=layers, n_head=4)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch-trials", choices=["auto", "on", "off"], default="auto")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(machine())
    batch_trials = {"auto": None, "on": True, "off": False}[args.batch_trials]
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(0, 512, (args.windows, args.seq_len), generator=g),
            "attention_mask": torch.ones(args.windows, args.seq_len, dtype=torch.long)}
    for kind in ("gpt2", "llama"):
        model = build(kind, args.layers, seed=0)
        results = {}

        def run(executor: str, model=model, kind=kind, results=results):
            settings = {"batch_trials": batch_trials} if executor == "prefix" else {}
            results[executor] = layercrit.measure(
                model, data, factory=lambda: build(kind, args.layers), probes=["rerandomize"], trials=3,
                granularity="block", layers=["*layers.*", "*.h.*"], executor=executor, batch_size=64, **settings)

        times = {"full": [], "prefix": []}
        for _ in range(args.repeats):  # interleaved: load drifts hit both sides
            for ex in ("full", "prefix"):
                t, _ = timed(lambda ex=ex: run(ex), repeats=1, warmup=0)
                times[ex].append(t)
        a, b = results["full"].table, results["prefix"].table
        diff = max(float((a[m] - b[m]).abs().max()) for m in ("criticality", "l1", "l2", "kl", "loss", "accuracy")
                   if m in a and a[m].notna().any())
        full, prefix = statistics.median(times["full"]), statistics.median(times["prefix"])
        units = a["layer"].nunique() - 1
        print(f"{kind}: {args.layers} blocks, {units} units x 3 trials, {args.windows} x {args.seq_len} tokens: "
              f"full {full:.1f} s, prefix {prefix:.1f} s ({results['prefix'].config['executor_used']}, "
              f"concat={results['prefix'].config.get('batch_trials_used')}), ratio {full / prefix:.2f}x, "
              f"max |diff| {diff:.2e}  (all full: {[f'{t:.1f}' for t in times['full']]}, "
              f"prefix: {[f'{t:.1f}' for t in times['prefix']]})")


if __name__ == "__main__":
    main()
