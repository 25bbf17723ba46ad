"""Issue 14: the block-prefix executor against the full forward, same run, on tiny Hugging Face
decoders (random init, >= 8 blocks): every block x 3 re-randomization trials (the model's own
`_init_weights`, no factory) on 256 windows of 64 synthetic token ids, one torch thread. Run with
the ecosystem environment:

    .venv-eco/bin/python benchmarks/bench_prefix.py [--repeats 2] [--windows 256] [--seq-len 64] \
        [--layers 16] [--vocab 128] [--threads 1] | tee benchmarks/results/prefix.txt

The models are tiny in the sense the ~2x bound assumes (the blocks dominate): width 128, 4 heads,
a character-level-sized vocabulary (128 synthetic ids, as nanoGPT's shakespeare-char has 65), so the
LM head and the vocabulary-sized measures, which every executor must compute for every probe, are
small next to the blocks. With L blocks a probe of block k re-runs L-k of them: (L+1)/2 on average,
so the bound is 2L/(L+1) (1.78x for 8 blocks, 1.85x for 12, 1.88x for 16) less the head and the
measures.

Prints the median seconds of each executor (runs interleaved) as CPU time of this process (with one
thread, what the run itself computed: other processes on a shared machine change it far less than
the wall time, though cache and core sharing still move it by ~10 %) and as
wall time, the ratios, and the largest difference of any measure between the two (target: >= 1.7x,
identical to 1e-5).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

import layercrit
from common import machine, timed


def build(kind: str, layers: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A random-init decoder: width 128, 4 heads, MLP 4x wide, `vocab` token ids."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=128, n_layer=layers, n_head=4,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=512, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-trials", choices=["auto", "on", "off"], default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"config: GPT-2 and Llama, {args.layers} blocks, width 128, 4 heads, MLP 512, vocabulary {args.vocab} "
          f"(synthetic ids), {args.windows} windows x {args.seq_len} tokens, batch 64, rerandomize (_init_weights) "
          f"x 3 trials on every block, all measures, {args.threads} thread(s)")
    batch_trials = {"auto": None, "on": True, "off": False}[args.batch_trials]
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(0, args.vocab, (args.windows, args.seq_len), generator=g),
            "attention_mask": torch.ones(args.windows, args.seq_len, dtype=torch.long)}
    for kind in ("gpt2", "llama"):
        model = build(kind, args.layers, args.vocab)
        results = {}

        def run(executor: str, model=model, kind=kind, results=results):
            settings = {"batch_trials": batch_trials} if executor == "prefix" else {}
            results[executor] = layercrit.measure(
                model, data, probes=["rerandomize"], trials=3,
                granularity="block", layers=["*layers.*", "*.h.*"], executor=executor, batch_size=64, **settings)

        times = {"full": [], "prefix": []}
        cpu = {"full": [], "prefix": []}
        for _ in range(args.repeats):  # interleaved: load drifts hit both sides
            for ex in ("full", "prefix"):
                c0 = time.process_time()
                t, _ = timed(lambda ex=ex: run(ex), repeats=1, warmup=0)
                cpu[ex].append(time.process_time() - c0)
                times[ex].append(t)
        a, b = results["full"].table, results["prefix"].table
        diff = max(float((a[m] - b[m]).abs().max()) for m in ("criticality", "l1", "l2", "kl", "loss", "accuracy")
                   if m in a and a[m].notna().any())
        full, prefix = statistics.median(times["full"]), statistics.median(times["prefix"])
        full_cpu, prefix_cpu = statistics.median(cpu["full"]), statistics.median(cpu["prefix"])
        units = a["layer"].nunique() - 1
        print(f"{kind}: {args.layers} blocks, {units} units x 3 trials, {args.windows} x {args.seq_len} tokens: "
              f"CPU time full {full_cpu:.1f} s, prefix {prefix_cpu:.1f} s, ratio {full_cpu / prefix_cpu:.2f}x; "
              f"wall full {full:.1f} s, prefix {prefix:.1f} s, ratio {full / prefix:.2f}x "
              f"({results['prefix'].config['executor_used']}, concat={results['prefix'].config.get('batch_trials_used')}); "
              f"max |diff| {diff:.2e}  (all CPU full: {[f'{t:.1f}' for t in cpu['full']]}, "
              f"prefix: {[f'{t:.1f}' for t in cpu['prefix']]}; wall full: {[f'{t:.1f}' for t in times['full']]}, "
              f"prefix: {[f'{t:.1f}' for t in times['prefix']]})", flush=True)


if __name__ == "__main__":
    main()
