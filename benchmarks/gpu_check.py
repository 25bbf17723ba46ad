"""Issue 21: the one device check of layercrit's CUDA paths, prepared for the day a GPU is lent.

    python benchmarks/gpu_check.py --out gpu_check.json            # on a CUDA machine (or gpu_check.sh)
    python benchmarks/gpu_check.py --dry-run --out /tmp/dry.json   # the same code, tiny sizes, on the CPU

In at most `--budget` seconds (default 480) it runs, each phase guarded (a failure is recorded with its
one-line reason and the next phase still runs):

1. `tests`: the test suite's `cuda`-marked tests (pytest -m cuda, in a subprocess);
2. `resnet_fp32`, `resnet_bf16`: torchvision ResNet-50 (random init, trained-like BatchNorm) at 224x224,
   all 54 conv/linear layers x 3 re-randomization trials on 2,048 synthetic images, in fp32 and under
   `autocast="bf16"`: seconds, images/s, the projected time of the paper's 10,000-image protocol, and
   the criticality differences bf16 vs fp32 (`comparison`);
3. `llama`: a 1.1 B-parameter Llama built from its config in bf16 (random init), every block x 3
   trials with the prefix executor on 16 x 1024 tokens: seconds, tokens/s and the peak CUDA memory
   against the 7B memory arithmetic of docs/performance.md, redone for this config;
4. `resnet_compile`: phase 2 with `compile=True`, only if the time left allows (else recorded as skipped).

Every figure goes to ONE JSON file (`--out`), rewritten atomically after each phase, so a run stopped
from outside still leaves what it measured. `--dry-run`: device cpu, a tiny ResNet (torchvision's
resnet18 at 32x32, or layercrit's resnet18-w16 without torchvision), a tiny Llama config (or
`layercrit.testing.TinyTransformer` without transformers), a few layers and images, compile with the
"eager" backend; it finishes in seconds and is run by tests/test_gpu_check.py. Off CUDA autocast is
ignored by the engine, so the dry run's bf16-vs-fp32 differences are 0 by construction.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import layercrit  # noqa: E402
from bench_vision import calibrate  # noqa: E402  (trained-like BatchNorm, as in the vision benchmark)
from layercrit._utils.io import atomic_path  # noqa: E402
from layercrit.units.blocks import find_block_stack  # noqa: E402

PROTOCOL_IMAGES = 10_000  # the paper's evaluation set: 54 layers x 3 trials x 10,000 images
GiB = 1 << 30


@dataclass
class Sizes:
    """What one run measures (the GPU run's sizes, or the dry run's)."""

    device: str = "cuda"
    budget_s: float = 480.0
    resnet: str = "torchvision:resnet50"
    image_size: int = 224
    classes: int = 1000
    images: int = 2048
    trials: int = 3
    batch_size: int = 256
    resnet_layers: int | None = None  # None: every conv/linear layer (54 for ResNet-50)
    memory_budget: int | None = 16 * GiB  # kept values per batch of the incremental executor (H200: 139 GiB)
    compile: bool | str = True
    llama: dict = field(default_factory=lambda: dict(  # TinyLlama-1.1B's shape: 1.1 B parameters
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048))
    windows: int = 16
    seq_len: int = 1024
    llama_trials: int = 3
    tests_timeout_s: float = 150.0
    reserve_s: dict = field(default_factory=lambda: {"llama": 90.0})  # kept for later required phases
    compile_overhead_s: float = 90.0  # guessed compile time on top of an eager run (decides the skip)


def dry_sizes() -> Sizes:
    tv = _importable("torchvision")
    return Sizes(
        device="cpu", budget_s=50.0, resnet="torchvision:resnet18" if tv else "resnet18-w16", image_size=16,
        classes=10, images=8, trials=2, batch_size=4, resnet_layers=3, memory_budget=None, compile="eager",
        llama=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64),
        windows=2, seq_len=16, llama_trials=2, tests_timeout_s=60.0, reserve_s={"llama": 5.0},
        compile_overhead_s=5.0)


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except Exception:  # noqa: BLE001  (an installed library that fails to import counts as missing)
        return False
    return True


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `PhaseTimeout` in the main thread after `seconds` (SIGALRM; no limit where unavailable)."""
    if seconds <= 0 or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum, frame):
        raise PhaseTimeout(f"stopped after {seconds:.0f} s (the phase's share of the time budget)")

    old = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- memory arithmetic (docs/performance.md, "Memory for a 7B model on one 80 GB GPU") -------------------


def memory_arithmetic(params: float, block_params: float, blocks: int, hidden: int, intermediate: int, vocab: int,
                      batch: int, seq_len: int, dtype_bytes: int = 2, memory_budget: int = GiB,
                      values_budget: int = 2 * GiB, probes: int | None = None, chunk_bytes: int = 256 << 20) -> dict:
    """The 7B table of docs/performance.md for a decoder probed block by block with the prefix executor, in bytes.

    Kept boundaries: the outputs of blocks 0..L-2 (a probe of block k starts at boundary k; block 0
    runs from the embeddings), thinned to every j-th when they do not fit `memory_budget`, as the
    executor's `_thin` does. The values of one pass: as many draws of one block as `values_budget` holds.
    """
    one = batch * seq_len * hidden * dtype_bytes
    boundaries = max(0, blocks - 1)
    fit = memory_budget // one if one else boundaries
    kept = boundaries if boundaries <= fit else (-(-boundaries // -(-boundaries // fit)) if fit >= 1 else 0)
    block = block_params * dtype_bytes
    draws = max(1, int(values_budget // block)) if block else 1
    if probes is not None:
        draws = min(draws, probes)
    rows = {
        "weights": params * dtype_bytes,
        "kept_boundaries": kept * one,
        "probed_block_original": block,
        "values_of_one_pass": draws * block,
        "logits_unmodified_and_one_probe": 2 * batch * seq_len * vocab * dtype_bytes,
        "measures_float64_chunk": min(chunk_bytes, 8 * batch * seq_len * vocab * 8),  # 8 float64 temporaries
        "activations_rerun_blocks": 3 * batch * seq_len * intermediate * dtype_bytes,
    }
    total = sum(rows.values())
    return {"rows_bytes": rows, "total_bytes": total, "total_gib": total / GiB, "kept_boundaries_count": kept,
            "boundary_bytes": one, "draws_per_pass": draws}


def readme_7b() -> dict:
    """Llama-2-7B at B = 16, T = 1024 (docs/performance.md: "about 20 GiB")."""
    return memory_arithmetic(6.74e9, 202e6, 32, 4096, 11008, 32000, 16, 1024)


# -- phases ---------------------------------------------------------------------------------------------


def phase_tests(s: Sizes, python: str) -> dict:
    """The `cuda`-marked tests of the suite (they skip, "needs CUDA", off CUDA)."""
    tests = ROOT / "tests"
    if not tests.is_dir():
        return {"status": "skipped", "reason": f"no tests folder at {tests}"}
    eco = _importable("torchvision") and _importable("transformers")
    files = sorted(str(p) for p in tests.rglob("test_*.py")
                   if "pytest.mark.cuda" in p.read_text(encoding="utf-8") and (eco or "ecosystem" not in p.parts))
    if not files:
        return {"status": "skipped", "reason": "no test file marks tests with pytest.mark.cuda"}
    cmd = [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs", *files]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=s.tests_timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"pytest did not finish in {s.tests_timeout_s:.0f} s", "files": files}
    out = r.stdout + r.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out.splitlines()[-1] if out else "")}
    failed = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    status = "ok" if r.returncode in (0, 5) else "failed"
    result = {"status": status, "returncode": r.returncode, "counts": counts, "files": [os.path.relpath(f, ROOT) for f in files],
              "failures": failed[:20], "summary": out.strip().splitlines()[-1] if out.strip() else ""}
    if status == "failed":
        result["reason"] = failed[0] if failed else f"pytest exited {r.returncode}"
        result["output_tail"] = out[-3000:]
    return result


def resnet_data(s: Sizes) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s.images, 3, s.image_size, s.image_size, generator=g)
    return x, torch.randint(0, s.classes, (s.images,), generator=g)


def resnet_model(s: Sizes, x: torch.Tensor):
    kwargs = {"num_classes": s.classes}
    if s.resnet.partition(":")[0] not in ("torchvision", "timm"):
        kwargs["input_shape"] = tuple(x.shape[1:])
    factory = layercrit.resolve_factory(s.resnet, **kwargs)
    torch.manual_seed(0)
    # BatchNorm statistics of (a share of) the images, on the device: one forward of 256 images
    model = calibrate(factory().to(s.device), x[: min(len(x), 256)].to(s.device))
    names = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    layers = None if s.resnet_layers is None else names[: s.resnet_layers - 1] + names[-1:]
    return model, factory, layers


def phase_resnet(s: Sizes, model, factory, layers, data, autocast: str | None, compile: bool | str) -> tuple[dict, object]:
    x, y = data
    if torch.device(s.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(s.device)
    t0 = time.perf_counter()
    r = layercrit.measure(model, (x, y), factory=factory, trials=s.trials, batch_size=s.batch_size, device=s.device,
                          layers=layers, autocast=autocast, compile=compile, memory_budget=s.memory_budget)
    sync(s.device)
    seconds = time.perf_counter() - t0
    rows = r.table[r.table["probe"] == "rerandomize"]
    probes = len(rows)
    out = {
        "status": "ok", "model": s.resnet, "image_size": s.image_size, "images": s.images, "trials": s.trials,
        "layers": int(rows["layer"].nunique()), "probes": probes, "batch_size": s.batch_size,
        "autocast": autocast, "compile": compile, "seconds": seconds,
        "images_per_s": s.images / seconds,  # images through the whole measurement (all probes) per second
        "image_forwards_per_s": s.images * (probes + 1) / seconds,  # as if every probe ran the whole model
        "projected_protocol_s": seconds * PROTOCOL_IMAGES / s.images,  # linear in images: fixed costs scaled too
        "projected_protocol_note": f"{PROTOCOL_IMAGES} images, {probes} probes; linear in the images, so tracing "
                                   "and cuDNN autotuning are scaled too (an upper bound)",
        "mean_criticality": float(rows["criticality"].mean()),
        "executor_used": r.config.get("executor_used"), "executor_reason": r.config.get("executor_reason"),
        "kept_peak_bytes": r.config.get("kept_peak_bytes"), "batch_trials_used": r.config.get("batch_trials_used"),
        "memory_budget": s.memory_budget,
    }
    if torch.device(s.device).type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
    return out, rows.set_index(["layer", "trial"])["criticality"]


def compare(a, b, label: str) -> dict:
    """Criticality differences of the same (layer, trial) probes between two runs."""
    a, b = a.align(b, join="inner")
    diff = (a - b).abs()
    big = b.abs() > 1e-3
    means_a, means_b = a.groupby(level="layer").mean(), b.groupby(level="layer").mean()
    return {
        "runs": label, "probes": int(len(diff)),
        "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float((diff[big] / b[big].abs()).max()) if big.any() else 0.0,
        "layer_rank_spearman": float(means_a.corr(means_b, method="spearman")) if len(means_a) > 2 else None,
        "same_most_critical_layer": bool(means_a.idxmax() == means_b.idxmax()),
    }


def llama_model(s: Sizes):
    """A random-init Llama from its config, built in bf16 on the device (or the project's TinyTransformer)."""
    if _importable("transformers"):
        import transformers

        cfg = transformers.LlamaConfig(**s.llama)
        torch.manual_seed(0)
        with torch.device(s.device):
            try:
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
            except TypeError:  # transformers 4.x
                model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (s.windows, s.seq_len), generator=g)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        dims = dict(blocks=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                    vocab=cfg.vocab_size, seq_len=s.seq_len)
        return model.eval(), None, data, ["L*"], "transformers LlamaConfig " + json.dumps(s.llama), dims
    from layercrit.testing import TinyTransformer

    def factory():
        return _CastInputs(TinyTransformer().to(s.device, torch.bfloat16), torch.bfloat16)

    torch.manual_seed(0)
    model = factory().eval()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(s.windows * 4, 1, 8, 8, generator=g), torch.randint(0, 10, (s.windows * 4,), generator=g))
    dims = dict(blocks=2, hidden=16, intermediate=32, vocab=10, seq_len=5)
    return model, factory, data, ["L*"], "layercrit.testing.TinyTransformer (bf16; transformers not installed)", dims


class _CastInputs(torch.nn.Module):
    """Feeds float inputs to a model held in another dtype (the data loader makes them float32)."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x):
        return self.net(x.to(self.dtype))


def phase_llama(s: Sizes) -> dict:
    model, factory, data, layers, what, dims = llama_model(s)
    params = sum(p.numel() for p in model.parameters())
    stack = find_block_stack(model)
    block_params = sum(p.numel() for p in model.get_submodule(stack.names[0]).parameters()) if stack else 0
    cuda = torch.device(s.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sync(s.device)
    t0 = time.perf_counter()
    r = layercrit.measure(model, data, factory=factory, probes=["rerandomize"], trials=s.llama_trials, granularity="block",
                          layers=layers, executor="prefix", batch_size=s.windows, device=s.device)
    sync(s.device)
    seconds = time.perf_counter() - t0
    rows = r.table[r.table["probe"] == "rerandomize"]
    n = len(rows)
    samples = len(data["input_ids"]) if isinstance(data, dict) else len(data[0])
    tokens = samples * dims["seq_len"]
    arithmetic = memory_arithmetic(params, block_params, dims["blocks"], dims["hidden"], dims["intermediate"],
                                   dims["vocab"], s.windows, dims["seq_len"], probes=n)
    out = {
        "status": "ok", "model": what, "parameters": params, "dtype": "bfloat16", "blocks": dims["blocks"],
        "windows": samples, "seq_len": dims["seq_len"], "trials": s.llama_trials, "probes": n, "seconds": seconds,
        "tokens_per_s": tokens * (n + 1) / seconds, "mean_criticality": float(rows["criticality"].mean()),
        "criticality_finite": bool(rows["criticality"].notna().all()),
        "executor_used": r.config.get("executor_used"), "executor_reason": r.config.get("executor_reason"),
        "kept_peak_bytes": r.config.get("kept_peak_bytes"), "batch_trials_used": r.config.get("batch_trials_used"),
        "memory_arithmetic": arithmetic, "readme_7b_arithmetic": readme_7b(),
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        out |= {"peak_memory_bytes": peak, "peak_over_arithmetic": peak / arithmetic["total_bytes"]}
    else:
        out |= {"peak_memory_bytes": None, "peak_memory_note": "torch.cuda.max_memory_allocated needs CUDA"}
    return out


# -- the run --------------------------------------------------------------------------------------------


class Check:
    """The JSON being filled in, rewritten atomically after every phase."""

    def __init__(self, path: Path, sizes: Sizes, dry: bool) -> None:
        self.path, self.s, self.t0 = path, sizes, time.perf_counter()
        cuda = torch.cuda.is_available()
        self.doc = {
            "meta": {
                "dry_run": dry, "started_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "layercrit": layercrit.__version__, "torch": torch.__version__, "python": platform.python_version(),
                "cuda_available": cuda, "device": sizes.device,
                "gpu": torch.cuda.get_device_name(0) if cuda else None,
                "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
                "cuda_version": torch.version.cuda, "cudnn_version": torch.backends.cudnn.version() if cuda else None,
                # fp32 convolutions run in TF32 on CUDA unless switched off: the "fp32" run's precision
                "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
                "float32_matmul_precision": torch.get_float32_matmul_precision(),
                "budget_s": sizes.budget_s, "sizes": asdict(sizes),
                "torchvision": _importable("torchvision"), "transformers": _importable("transformers"),
            },
            "phases": {}, "comparison": {}, "skipped": [],
        }

    def left(self) -> float:
        return self.s.budget_s - (time.perf_counter() - self.t0)

    def run(self, name: str, fn, *, limit: float | None = None, need: float = 0.0):
        """Run phase `name` (recorded whatever happens); None when it failed or was skipped."""
        later = sum(v for k, v in self.s.reserve_s.items() if k not in self.doc["phases"] and k != name)
        room = self.left() - later
        if room < need or room <= 0:
            return self.skip(name, f"time budget: needs about {need:.0f} s, {max(room, 0):.0f} s left of "
                                   f"{self.s.budget_s:.0f} s after reserving {later:.0f} s for later phases")
        t0 = time.perf_counter()
        print(f"[gpu_check] {name} ({room:.0f} s left)", flush=True)
        value = None
        try:
            with time_limit(min(room, limit) if limit else room):
                value = fn()
            record = value[0] if isinstance(value, tuple) else value
        except PhaseTimeout as e:  # the time budget ran out inside the phase: what it had is lost, the rest runs
            record, value = {"status": "timed_out", "reason": f"time budget: {e}"}, None
        except Exception as e:  # noqa: BLE001  (every phase is guarded: its failure is a result)
            record = {"status": "failed", "reason": one_line(e), "traceback_tail": traceback.format_exc()[-1500:]}
            value = None
        record.setdefault("wall_s", time.perf_counter() - t0)
        gc.collect()  # what a failed or stopped phase held goes before the next one starts
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.doc["phases"][name] = record
        if record.get("status") in ("skipped", "timed_out"):
            self.doc["skipped"].append(f"{name}: {record.get('reason')}")
        print(f"[gpu_check] {name}: {record.get('status')} {record.get('reason', '')}".rstrip(), flush=True)
        self.write()
        return value if record.get("status") == "ok" else None

    def skip(self, name: str, reason: str) -> None:
        self.doc["phases"][name] = {"status": "skipped", "reason": reason}
        self.doc["skipped"].append(f"{name}: {reason}")
        print(f"[gpu_check] {name}: skipped ({reason})", flush=True)
        self.write()

    def write(self) -> None:
        self.doc["meta"]["elapsed_s"] = time.perf_counter() - self.t0
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(_strict(self.doc), indent=2, default=_plain, allow_nan=False) + "\n")


def _strict(v):
    """Strict JSON: NaN and infinities (a probe that drove an output non-finite) become null."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v


def _plain(v):
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return repr(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the JSON file written (atomically, after every phase)")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the same code path in seconds")
    ap.add_argument("--budget", type=float, help="seconds for all phases (default 480; dry run 50)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "resnet_fp32", "resnet_bf16", "llama", "resnet_compile"])
    args = ap.parse_args(argv)
    s = dry_sizes() if args.dry_run else Sizes()
    if args.budget is not None:
        s.budget_s = args.budget
    if not args.dry_run and not torch.cuda.is_available():
        print("layercrit: error: the GPU check needs CUDA (torch.cuda.is_available() is false); use --dry-run", file=sys.stderr)
        return 2
    torch.set_num_threads(min(torch.get_num_threads(), 2) if args.dry_run else torch.get_num_threads())
    check = Check(Path(args.out), s, args.dry_run)
    check.write()

    def maybe(name, fn, **kw):
        if name in args.skip:
            return check.skip(name, "--skip")
        return check.run(name, fn, **kw)

    maybe("tests", lambda: phase_tests(s, sys.executable), limit=s.tests_timeout_s + 30)
    built = {}

    def resnet(autocast, compile):
        if not built:  # one model for every variant (probes restore it bit-exactly)
            data = resnet_data(s)
            built["args"] = (*resnet_model(s, data[0]), data)
        return phase_resnet(s, *built["args"], autocast, compile)

    base = maybe("resnet_fp32", lambda: resnet(None, False))
    eager_s = check.doc["phases"].get("resnet_fp32", {}).get("seconds", 0.0)
    bf16 = maybe("resnet_bf16", lambda: resnet("bf16", False), need=0.5 * eager_s)
    if base and bf16:
        check.doc["comparison"]["bf16_vs_fp32"] = compare(bf16[1], base[1], "resnet_bf16 - resnet_fp32")
        check.doc["comparison"]["bf16_vs_fp32"]["autocast_effective"] = torch.device(s.device).type == "cuda"
        check.write()
    maybe("llama", lambda: phase_llama(s))
    compiled = maybe("resnet_compile", lambda: resnet(None, s.compile), need=eager_s + s.compile_overhead_s)
    if base and compiled:
        check.doc["comparison"]["compile_vs_eager"] = compare(compiled[1], base[1], "resnet_compile - resnet_fp32")
    check.doc["meta"]["finished"] = True
    check.write()
    failed = [k for k, v in check.doc["phases"].items() if v.get("status") == "failed"]
    print(f"[gpu_check] wrote {args.out} in {check.doc['meta']['elapsed_s']:.0f} s; "
          f"failed: {', '.join(failed) or 'none'}; skipped: {len(check.doc['skipped'])}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
