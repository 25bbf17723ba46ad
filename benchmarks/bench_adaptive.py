"""Issue 15: adaptive sampling to a target precision against the fixed protocol that gives the same
guarantee, on a ResNet-18 (CIFAR stem) trained briefly on digits-like 32×32 images, and on the digits
FCN-3x256.

Per model, every layer, probe rerandomize, H = --precision:
  (ii)  `measure(precision=H)`: images and trials each unit used, image-evaluations, wall time;
  (i)   the fixed protocol a user needs for *every* unit to reach ±H: the most images n* and the most
        trials T* any unit needed (from (ii)), spent on every unit, on the same images in the same
        order: image-evaluations, wall time, the largest difference between the two runs' unit means
        and Kendall's τ between their layer rankings;
  (iii) the published protocol (all images × 3 trials): how many units its two-level 95 % interval
        (the same one adaptive sampling reports) leaves wider than H.
Image-evaluations count probed forward passes (one per image per perturbation); the unmodified
model's own passes are listed beside them.

(i) by default continues each unit of (ii) to T* trials on the first n* images (an in-memory
checkpoint, as a resumed sweep does) instead of starting again: the rows are float for float those of
a fixed run with T* trials on those images (tests/test_adaptive.py checks that equality; `--fresh-fixed`
runs it from scratch and prints the same means), and it saves evaluating again what (ii) did. Its wall
time is then estimated at the measured rate (seconds per image-evaluation) of (ii) and its
continuation together, and says so.

Width: the issue asks for width ×1 of the standard ResNet-18 (64 channels in the stem). On the
shared 2-core machine of benchmarks/results/adaptive.txt, with one thread, that model runs 75
images/s forward, and (i) alone can be 21 units × 50 trials × 10,000 images ≈ 10^7
image-evaluations: more than a day. The recorded run uses `--width 4` (4, 8, 16, 32 channels;
≈ 12,000 image-evaluations/s alone with the incremental executor, about half that beside the other
jobs on the machine), the widest whose runs fitted the time there was (width 8 was started and
would have taken over an hour). The ratio of image-evaluations depends on how the units' variances
spread (how many layers are easy), not on the cost of a forward pass; `--width 64` runs the issue's
model where time allows.

Run: .venv/bin/python benchmarks/bench_adaptive.py --threads 1 --width 4 --resnet-weights /tmp/w4.pt
     (recorded output: benchmarks/results/adaptive.txt)
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from scipy import stats

import layercrit as lc
from common import machine
from layercrit.analyses import adaptive
from layercrit.data import Dataset, load_data
from layercrit.training.checkpoints import build_model


def digits32(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` digits-like 32×32 RGB images: scikit-learn digits of `split` scaled to 20-28 px, placed at a
    random offset, tinted per channel, with pixel noise; labels the digits'. Normalized per channel."""
    d = load_data(f"digits:{split}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(d), (n,), generator=g)
    pixels = d.x[idx] * d.meta["std"] + d.meta["mean"]  # back to [0, 1]
    out = torch.zeros(n, 3, 32, 32)
    sizes = torch.randint(20, 29, (n,), generator=g)
    for size in sizes.unique().tolist():
        rows = (sizes == size).nonzero().squeeze(1)
        img = F.interpolate(pixels[rows], size=(size, size), mode="bilinear", align_corners=False)
        offs = torch.randint(0, 32 - size + 1, (len(rows), 2), generator=g)
        for k, r in enumerate(rows.tolist()):
            i, j = offs[k].tolist()
            out[r, :, i : i + size, j : j + size] = img[k]
    tint = 0.6 + 0.4 * torch.rand(n, 3, 1, 1, generator=g)
    out = (out * tint + 0.08 * torch.randn(n, 3, 32, 32, generator=g)).clamp(0, 1)
    return (out - 0.15) / 0.3, d.y[idx]


def train_resnet(n: int, epochs: int, width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = resnet(width)
    x, y = digits32("train", n, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model.train()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(n, generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.cat([model(b).argmax(1) for b in x.split(512)]).eq(y).float().mean())


def resnet(width: int) -> torch.nn.Module:
    """The untrained constructor: the model and the init source of `rerandomize`."""
    return lc.create_model("resnet18", num_classes=10, width=width)


class Kept:
    """An in-memory `adaptive.Checkpoint`: the cells' statistics after each round."""

    def __init__(self, states: dict) -> None:
        self.states = states

    def load(self) -> dict:
        return self.states

    def save(self, states) -> None:
        self.states.update(states)


def unit_table(result: lc.CriticalityResult) -> pd.DataFrame:
    """Per unit: label, images, trials, half-width and mean criticality."""
    rows = result.table[result.table["layer"] != lc.results.UNMODIFIED]
    if "half_width" not in rows:  # a fixed run: its trials are its rows
        rows = rows.assign(trials_used=rows.groupby("layer")["trial"].transform("size"), half_width=float("nan"))
    return rows.groupby("layer", sort=False).agg(label=("label", "first"), n=("n", "first"),
                                                 trials=("trials_used", "first"), half=("half_width", "first"),
                                                 mean=("criticality", "mean"))


def compare(name: str, model: torch.nn.Module, data: Dataset, args, factory=None) -> None:
    h, bs = args.precision, args.batch_size
    print(f"\n== {name}: {len(data):,} images, H = {h}, max trials {args.max_trials}, batch {bs}")
    t0 = time.perf_counter()
    kept: dict = {}
    ad = lc.measure(model, data, factory=factory, precision=h, max_trials=args.max_trials, batch_size=bs, model_name=name,
                    checkpoint=Kept(kept))
    t_ad = time.perf_counter() - t0
    s = ad.config["adaptive"]
    units = unit_table(ad)
    print(units.to_string(float_format=lambda v: f"{v:.4f}"))
    n_star, t_star = int(units["n"].max()), int(units["trials"].max())
    print(f"(ii)  adaptive: {s['image_evaluations']:,} image-evaluations (+{s['unmodified_evaluations']:,} unmodified), "
          f"{t_ad:.1f}s, {s['rounds']} rounds; widest unit ±{units['half'].max():.4f}")
    fixed_evals = len(units) * t_star * n_star
    t0 = time.perf_counter()
    if args.fresh_fixed or n_star < len(data):
        ordered = adaptive.evaluation_order(data, 0)
        first = Dataset(ordered.x[:n_star], ordered.y[:n_star], spec="ordered prefix")
        fx = lc.measure(model, first, factory=factory, trials=t_star, batch_size=bs, model_name=name)
        t_fx, how = time.perf_counter() - t0, "measured"
    else:
        # Each unit's rounds continued to T* trials on all n* images: float for float a fixed run with
        # T* trials on those images (tests/test_adaptive.py), without evaluating again what (ii) did.
        fx = lc.measure(model, data, factory=factory, precision=1e-12, max_trials=t_star, batch_size=bs, model_name=name,
                        checkpoint=Kept(kept))
        rest = fx.config["adaptive"]["image_evaluations"]
        t_rest = time.perf_counter() - t0
        t_fx = (t_ad + t_rest) * fixed_evals / (s["image_evaluations"] + rest)
        how = (f"estimated at the rate of (ii) and of its continuation to these sizes, {rest:,} image-evaluations "
               f"in {t_rest:.1f}s")
    fmean = unit_table(fx)
    settled = fmean["half"] == 0  # every value equal: the continued run stops them (same mean as a fixed run)
    assert ((fmean["trials"] == t_star) & (fmean["n"] == n_star) | settled).all(), fmean
    wide = "" if fmean["half"].isna().all() else f"; {int((fmean['half'] > h).sum())} units wider than ±{h}"
    diff = float((fmean.loc[units.index, "mean"] - units["mean"]).abs().max())
    tau = stats.kendalltau(units["mean"], fmean.loc[units.index, "mean"]).statistic
    print(f"(i)   fixed for every unit: {n_star:,} images x {t_star} trials x {len(units)} units = {fixed_evals:,} "
          f"image-evaluations, {t_fx:.1f}s ({how}){wide}")
    print(f"      ratio {fixed_evals / s['image_evaluations']:.1f}x fewer image-evaluations, {t_fx / t_ad:.1f}x less time; "
          f"largest |mean difference| {diff:.4f}; Kendall tau {tau:.3f}")
    if args.skip_published:
        return
    # (iii) the published protocol, scored with the same interval: one round of all images x 3 trials.
    saved = adaptive.FIRST_IMAGES, adaptive.FIRST_TRIALS
    adaptive.FIRST_IMAGES, adaptive.FIRST_TRIALS = len(data), 3
    try:
        t0 = time.perf_counter()
        pub = lc.measure(model, data, factory=factory, precision=h, trials=3, max_trials=3, batch_size=bs, model_name=name)
        t_pub = time.perf_counter() - t0
    finally:
        adaptive.FIRST_IMAGES, adaptive.FIRST_TRIALS = saved
    half = pub.table[pub.table["layer"] != lc.results.UNMODIFIED].groupby("layer", sort=False)["half_width"].first()
    print(f"(iii) published protocol ({len(data):,} images x 3 trials, {t_pub:.1f}s): {int((half > h).sum())} of "
          f"{len(half)} units wider than ±{h} (widest ±{half.max():.4f}, median ±{half.median():.4f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10000, help="ResNet evaluation images")
    ap.add_argument("--train-images", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2, help="ResNet training epochs")
    ap.add_argument("--width", type=int, default=4, help="ResNet-18 stem width (64: the standard ResNet-18)")
    ap.add_argument("--precision", type=float, default=0.01)
    ap.add_argument("--max-trials", type=int, default=adaptive.MAX_TRIALS)
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--only", choices=["fcn", "resnet"])
    ap.add_argument("--skip-published", action="store_true")
    ap.add_argument("--fresh-fixed", action="store_true",
                    help="run (i) from scratch (default: continue (ii)'s units to the fixed sizes; same numbers)")
    ap.add_argument("--resnet-weights", metavar="FILE", help="reuse (or save) the trained ResNet's state dict")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    if args.only != "resnet":
        data = load_data("digits:all")
        with tempfile.TemporaryDirectory() as tmp:
            lc.train(lc.TrainConfig(model="fcn-3x256", data="digits:train", epochs=40), Path(tmp) / "fcn")
            model, factory = build_model("fcn-3x256", Path(tmp) / "fcn" / "epoch_0040.pt", data=data)
        compare("fcn-3x256 digits:all", model, data, args, factory)
    if args.only != "fcn":
        t0 = time.perf_counter()
        if args.resnet_weights and Path(args.resnet_weights).is_file():  # trained by an earlier run
            model = resnet(args.width)
            model.load_state_dict(torch.load(args.resnet_weights, weights_only=True))
            model.eval()
        else:
            model = train_resnet(args.train_images, args.epochs, args.width)
            if args.resnet_weights:
                torch.save(model.state_dict(), args.resnet_weights)
        x, y = digits32("test", args.images, seed=2)
        print(f"\nresnet18 (CIFAR stem, width {args.width}) trained {args.epochs} epochs on {args.train_images:,} digits-like 32x32 images "
              f"({time.perf_counter() - t0:.0f}s); accuracy {accuracy(model, x, y):.3f} on the evaluation images")
        compare(f"resnet18-width{args.width} digits32", model, Dataset(x, y, spec="digits32:test", num_classes=10), args,
                functools.partial(resnet, args.width))


if __name__ == "__main__":
    main()
