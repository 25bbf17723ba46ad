"""Issue 7: speed of layer and module criticality, against a naive loop written the way the reference
implementation works (restore the weights, reset one layer, run the whole model over all inputs).

    .venv/bin/python benchmarks/bench_speed.py a   # ResNet-18 (w16, CIFAR stem), 2,000 in-memory 32x32 images
    .venv/bin/python benchmarks/bench_speed.py b   # the same from 2,000 JPEG files (naive: decoded for every probe)
    .venv/bin/python benchmarks/bench_speed.py c   # FLOP rate of the recomputed parts vs a plain forward
    .venv/bin/python benchmarks/bench_speed.py d   # module criticality: evaluations per second, before and after

Options: --repeats N (default 3; medians, runs interleaved so that load drifts hit both sides),
--images N (default 2000), --batch-size N (default 256), --jpeg-size N (default 64). Every conv/linear layer, 3 re-randomization
trials (63 probes); the models are untrained (random init), inputs random.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from common import machine, timed
from layercrit import Dataset, TrainConfig, create_model, measure, select_units, train
from layercrit.analyses.modcrit import module_criticality, run_module_criticality
from layercrit.data import load_imagefolder
from layercrit.engine.executors.incremental import IncrementalExecutor
from layercrit.engine.probes import Rerandomize
from layercrit.seeding import derive_seed

MODEL, SHAPE, TRIALS = "resnet18-w16", (3, 32, 32), 3


def factory() -> nn.Module:
    return create_model(MODEL, num_classes=10, input_shape=SHAPE)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall times of each function, `repeats` rounds, one call of each per round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, _ = timed(fn, repeats=1, warmup=0)
            times[k].append(t)
    return times


def med(ts: list[float]) -> float:
    return statistics.median(ts)


# -- the naive loop --------------------------------------------------------------------------------


def naive_criticality(model: nn.Module, batches: Callable[[], Iterator[torch.Tensor]], trials: int) -> dict:
    """Criticality of every conv/linear layer, the reference's way: per layer and trial, restore all
    weights, re-initialize the layer (the model's own init under the trial's seed), run the whole model
    over all inputs (`batches()` produces them again each time)."""
    model.eval()
    original = copy.deepcopy(model.state_dict())
    params = dict(model.named_parameters())
    layers = [(name, [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)])
              for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    out = {}
    with torch.no_grad():
        base = [model(x) for x in batches()]
        for name, names in layers:
            for trial in range(trials):
                model.load_state_dict(original)
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(derive_seed(0, trial))
                    fresh = dict(factory().named_parameters())
                for n in names:
                    params[n].copy_(fresh[n])
                total, count = torch.zeros((), dtype=torch.float64), 0
                for p, x in zip(base, batches()):
                    q = model(x)
                    cos = F.cosine_similarity(F.softmax(p.double(), 1), F.softmax(q.double(), 1), dim=1, eps=1e-12)
                    total += (1 - cos).sum()
                    count += len(x)
                out[(name, trial)] = float(total) / count
        model.load_state_dict(original)
    return out


def max_diff(result, naive: dict) -> float:
    rows = result.table[result.table["probe"] == "rerandomize"]
    assert len(rows) == len(naive), (len(rows), len(naive))
    return max(abs(r.criticality - naive[(r.layer, r.trial)]) for r in rows.itertuples())


def report(label: str, times: dict[str, list[float]], diffs: dict[str, float], probes: int) -> None:
    naive = med(times["naive"])
    print(f"{label}: {probes} probes, medians over {len(times['naive'])} interleaved runs")
    for k, ts in times.items():
        paired = med([n / t for n, t in zip(times["naive"], ts)])  # ratio within each round, then the median
        extra = "" if k == "naive" else (f"  naive/this = {naive / med(ts):.2f}x (per round: {paired:.2f}x)  "
                                         f"max |crit - naive| = {diffs[k]:.2e}")
        print(f"  {k:<38} {med(ts):8.1f} s  (runs: {', '.join(f'{t:.1f}' for t in ts)}){extra}")


# -- (a) in-memory images ----------------------------------------------------------------------------


def bench_a(args) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    x = torch.rand(args.images, *SHAPE)
    y = torch.randint(0, 10, (args.images,))
    got: dict = {}

    def batches() -> Iterator[torch.Tensor]:
        for i in range(0, len(x), args.batch_size):
            yield x[i : i + args.batch_size]

    fns = {
        "naive": lambda: got.__setitem__("naive", naive_criticality(model, batches, TRIALS)),
        "layercrit (measure, defaults)": lambda: got.__setitem__(
            "lc", measure(model, (x, y), factory=factory, trials=TRIALS, batch_size=args.batch_size)),
        "layercrit, executor=full": lambda: got.__setitem__(
            "full", measure(model, (x, y), factory=factory, trials=TRIALS, batch_size=args.batch_size, executor="full")),
    }
    times = interleaved(fns, args.repeats)
    diffs = {"layercrit (measure, defaults)": max_diff(got["lc"], got["naive"]),
             "layercrit, executor=full": max_diff(got["full"], got["naive"])}
    print(f"  kept values: peak {got['lc'].config.get('kept_peak_bytes', 0) / 2**20:.1f} MiB per batch "
          f"(executor {got['lc'].config['executor_used']})")
    report(f"(a) {MODEL} layer criticality, {args.images} in-memory images, batch {args.batch_size}", times, diffs,
           len(got["naive"]))


# -- (b) image folder --------------------------------------------------------------------------------


def make_jpegs(root: Path, n: int, classes: int = 10, size: int = 40) -> list[Path]:
    """`n` small JPEGs in class folders: smooth random colour fields with noise (realistic compression)."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(n):
        d = root / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray((rng.random((5, 5, 3)) * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        pixels = np.clip(np.asarray(coarse, dtype=np.float64) + rng.normal(0, 12, (size, size, 3)), 0, 255)
        files.append(d / f"{i:05d}.jpg")
        Image.fromarray(pixels.astype(np.uint8)).save(files[-1], quality=90)
    return sorted(files)


def decode(path: Path, size: int = 32) -> torch.Tensor:
    """One image as the reference's transforms give it: RGB, short side resized (bilinear), center crop, [0, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    w, h = img.size
    long = int(size * max(w, h) / min(w, h))
    target = (size, long) if w <= h else (long, size)
    if img.size != target:
        img = img.resize(target, Image.BILINEAR)
    left, top = round((target[0] - size) / 2), round((target[1] - size) / 2)
    pixels = np.asarray(img.crop((left, top, left + size, top + size)))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255)


def bench_b(args) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        t0 = time.perf_counter()
        files = make_jpegs(root, args.images, size=args.jpeg_size)
        kib = sum(f.stat().st_size for f in files) / len(files) / 1024
        print(f"wrote {len(files)} JPEGs of {args.jpeg_size}x{args.jpeg_size} ({kib:.1f} KiB each) in {time.perf_counter() - t0:.1f}s")
        got: dict = {}

        def batches() -> Iterator[torch.Tensor]:  # decoded again on every call, as the reference's DataLoader does
            for i in range(0, len(files), args.batch_size):
                yield torch.stack([decode(f) for f in files[i : i + args.batch_size]])

        def layercrit() -> None:
            # Decoded once, no disk cache; full-scale decoding (no libjpeg draft mode), so that the pixels
            # are the naive loop's and the criticality can be compared to the last digit.
            data = load_imagefolder(root, resize=32, crop=32, cache=False, draft=False,
                                    mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # [0, 1] pixels, as naive decodes
            got["lc"] = measure(model, data, factory=factory, trials=TRIALS, batch_size=args.batch_size)

        t_decode, _ = timed(lambda: list(batches()), repeats=args.repeats, warmup=0)
        print(f"decoding all {len(files)} files once (naive's per-probe cost): median {t_decode:.2f}s "
              f"= {t_decode / len(files) * 1e3:.2f} ms per image")
        fns = {"naive": lambda: got.__setitem__("naive", naive_criticality(model, batches, TRIALS)),
               "layercrit (load_imagefolder + measure)": layercrit}
        times = interleaved(fns, args.repeats)
        report(f"(b) {MODEL} layer criticality from an image folder, batch {args.batch_size}", times,
               {"layercrit (load_imagefolder + measure)": max_diff(got["lc"], got["naive"])}, len(got["naive"]))


# -- (c) FLOP efficiency -----------------------------------------------------------------------------


def flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def bench_c(args) -> None:
    torch.manual_seed(0)
    model = factory().eval()
    bs = args.batch_size
    x = torch.rand(args.images, *SHAPE)
    xb = x[:bs]
    x_cl = x.contiguous(memory_format=torch.channels_last)  # the layout the engine feeds a conv net
    probe = Rerandomize(factory)
    units = select_units(model)
    values = [probe.values(model, u, derive_seed(0, t)) for u in units for t in range(TRIALS)]
    with torch.no_grad():
        full = flops(lambda: model(xb))
        counting = IncrementalExecutor(model, workers=1)  # the FLOP counter sees only its own thread
        counting.prepare(values)
        counting.start_batch(xb)
        down = flops(lambda: counting.run_many(values))
        counting.end_batch()
        executor = IncrementalExecutor(model)
        t_plain, _ = timed(lambda: model(xb), repeats=max(5, args.repeats), warmup=1)
        xb_cl = x_cl[:bs]
        t_plain_cl, _ = timed(lambda: model(xb_cl), repeats=max(5, args.repeats), warmup=1)

        def downstream_only() -> None:  # the executor's recomputation alone, batch by batch
            executor.prepare(values)
            for i in range(0, len(x), bs):
                executor.start_batch(x_cl[i : i + bs])
                t0 = time.perf_counter()
                executor.run_many(values)
                spent[0] += time.perf_counter() - t0
                executor.end_batch()

        spent = [0.0]
        t_measure, _ = timed(lambda: measure(model, x, factory=factory, trials=TRIALS, batch_size=bs),
                             repeats=args.repeats, warmup=0)
        times = []
        for _ in range(args.repeats):
            spent[0] = 0.0
            downstream_only()
            times.append(spent[0])
        t_down = med(times)
    per_sample = down / bs
    total = per_sample * len(x)
    plain_rate = full / t_plain
    print(f"(c) {MODEL}, batch {bs}, {len(values)} probes, {len(x)} images")
    print(f"  plain forward: {full / bs / 1e6:.1f} MFLOP per image, median {t_plain * 1000:.0f} ms per batch "
          f"= {plain_rate / 1e9:.2f} GFLOP/s (channels-last inputs: {full / t_plain_cl / 1e9:.2f} GFLOP/s)")
    print(f"  recomputed (downstream) FLOPs: {down / full / len(values):.3f} of a full forward per probe on average, "
          f"{total / 1e12:.3f} TFLOP in all")
    for label, t in (("whole measure() wall time", t_measure), ("executor.run_many time only", t_down)):
        rate = total / t
        print(f"  {label:<28} median {t:7.1f} s: {rate / 1e9:.2f} GFLOP/s = {rate / plain_rate:.2f} of the plain "
              f"forward's rate ({rate * t_plain_cl / full:.2f} of the channels-last forward's)")


# -- (d) module criticality ------------------------------------------------------------------------


VARIANTS_D = {"before (executor=full)": {"executor": "full"}, "after (defaults)": {},
              "after, batch_trials=True": {"batch_trials": True}}


def bench_d(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "fcn-3x256"
        train(TrainConfig(model="fcn-3x256", data="digits:train", epochs=40), run)
        got: dict = {}
        fns = {k: (lambda k=k, v=v: got.__setitem__(k, run_module_criticality(run, **v))) for k, v in VARIANTS_D.items()}
        times = interleaved(fns, args.repeats)
        _report_d("fcn-3x256 trained on digits:train (default settings: 21 alphas, 8 draws, whole curve)", times, got)
    torch.manual_seed(0)
    model, reference = factory(), factory().state_dict()
    data = Dataset(torch.rand(args.images, *SHAPE), torch.randint(0, 10, (args.images,)), spec="random")
    settings = dict(train_subset=min(256, args.images), alphas=3, noise_draws=2, sigma_rtol=1.0, relative=True,
                    epsilon=[0.05], curve=False, batch_size=args.batch_size)
    got = {}
    fns = {k: (lambda k=k, v=v: got.__setitem__(k, module_criticality(model, data, reference, **settings, **v)))
           for k, v in VARIANTS_D.items()}
    times = interleaved(fns, args.repeats)
    _report_d(f"{MODEL} (untrained), 21 modules, random images and labels, {settings}", times, got)


def _report_d(label: str, times: dict[str, list[float]], got: dict) -> None:
    print(f"(d) module criticality, {label}")
    before = next(iter(times))
    rates = {k: got[k].evaluations / med(ts) for k, ts in times.items()}
    mu = {k: got[k].table["mu"].to_numpy(float) for k in times}
    for k, ts in times.items():
        extra = "" if k == before else (f"  after/before = {rates[k] / rates[before]:.2f}x, max |mu - before's| = "
                                         f"{np.nanmax(np.abs(mu[k] - mu[before]), initial=0.0):.2e}")
        print(f"  {k:<26} median {med(ts):7.1f} s for {got[k].evaluations} evaluations: "
              f"{rates[k]:.1f} evaluations/s{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=["a", "b", "c", "d"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--jpeg-size", type=int, default=64, help="(b) side of the square JPEG files (default 64, as Tiny ImageNet)")
    args = ap.parse_args()
    print(machine())
    {"a": bench_a, "b": bench_b, "c": bench_c, "d": bench_d}[args.which](args)


if __name__ == "__main__":
    main()
