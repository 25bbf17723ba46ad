"""Issue 11: layer criticality of the paper's own architecture, ResNet-50 from torchvision and from
timm, against a loop written the way the reference implementation works (restore the weights, reset
one layer from a fresh untrained model of the trial, run the whole model), in the same process.

    .venv-eco/bin/python benchmarks/bench_vision.py              # both models, 64 images at 160x160
    .venv-eco/bin/python benchmarks/bench_vision.py --models timm:resnet50 --repeats 3

Every conv/linear layer (the paper's 54) x 3 re-randomization trials = 162 probes per model. The
models are untrained (random init) with trained-like BatchNorm layers: affine parameters drawn away from
their init and statistics set from the images (one train-mode pass, as a trained model has statistics of
its data; see `calibrate`). Times include building the fresh model of each trial
on both sides; layercrit's also include tracing and the trace check.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import machine
from layercrit import measure, resolve_factory
from layercrit.seeding import derive_seed


def calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Trained-like normalization: BatchNorm statistics of `x`, affine parameters drawn away from their
    init (timm zero-initializes each block's last norm, which would make every block the identity)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.25)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the cumulative average of this one pass
    with torch.no_grad():
        model.train()(x)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def reference_loop(model: nn.Module, factory, x: torch.Tensor, trials: int, batch_size: int) -> dict:
    """The reference's algorithm: for each trial a fresh untrained model; for each conv/linear layer,
    restore every weight, load the layer's state from the fresh model, run the whole model on all images."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    out = {}
    with torch.no_grad():
        base = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        for trial in range(trials):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(0, trial))  # layercrit's seed for trial `trial`
                fresh = factory()
            for name, module in layers:
                model.load_state_dict(original)
                module.load_state_dict(fresh.get_submodule(name).state_dict())
                total, count = 0.0, 0
                for p, i in zip(base, range(0, len(x), batch_size)):
                    q = model(x[i : i + batch_size])
                    cos = F.cosine_similarity(F.softmax(p.double(), 1), F.softmax(q.double(), 1), dim=1, eps=1e-12)
                    total += float((1 - cos).sum())
                    count += len(q)
                out[(name, trial)] = total / count
        model.load_state_dict(original)
    return out


def bench(spec: str, args) -> None:
    factory = resolve_factory(spec)
    torch.manual_seed(0)
    x = torch.randn(args.images, 3, args.size, args.size)
    model = calibrate(factory(), x)
    got: dict = {}
    runs = {
        "reference-style loop": lambda: got.__setitem__("ref", reference_loop(model, factory, x, args.trials, args.batch_size)),
        "layercrit (measure, defaults)": lambda: got.__setitem__(
            "lc", measure(model, x, factory=factory, trials=args.trials, batch_size=args.batch_size)),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved: load drifts hit both sides
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    rows = got["lc"].table[got["lc"].table["probe"] == "rerandomize"]
    assert len(rows) == len(got["ref"]) == 54 * args.trials, (len(rows), len(got["ref"]))
    diff = max(abs(r.criticality - got["ref"][(r.layer, r.trial)]) for r in rows.itertuples())
    ref, lc = statistics.median(times["reference-style loop"]), statistics.median(times["layercrit (measure, defaults)"])
    config = got["lc"].config
    print(f"{spec}: {len(rows)} probes (54 layers x {args.trials} trials), {args.images} images {args.size}x{args.size}, "
          f"batch {args.batch_size}")
    for k, ts in times.items():
        print(f"  {k:<32} median {statistics.median(ts):7.1f} s  (runs: {', '.join(f'{t:.1f}' for t in ts)})")
    print(f"  reference/layercrit = {ref / lc:.2f}x   max |criticality - reference's| = {diff:.2e}   "
          f"mean criticality {rows['criticality'].mean():.3f}")
    print(f"  executor {config['executor_used']} ({config['executor_reason']}), kept values peak "
          f"{config.get('kept_peak_bytes', 0) / 2**20:.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="torchvision:resnet50,timm:resnet50")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); 1 takes the "
                    "threading out of the comparison, which a loaded machine distorts")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    for spec in args.models.split(","):
        bench(spec, args)


if __name__ == "__main__":
    main()
