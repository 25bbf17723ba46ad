"""Issue 3: ResNet-18 (CIFAR stem, width x1 = 16 channels) forward+backward throughput, and the
image-folder loader's decode throughput with and without its cache.

Run: .venv/bin/python benchmarks/bench_throughput.py [--repeats 5] [--images 500]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import machine, timed
from layercrit import create_model
from layercrit.data import load_imagefolder


def resnet_throughput(repeats: int, batch: int = 128) -> None:
    model = create_model("resnet18-w16", num_classes=10, input_shape=(3, 32, 32))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    model.train()

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    med, _ = timed(step, repeats=repeats, warmup=2)
    print(f"resnet18-w16 (CIFAR stem, 701,466 params) forward+backward+SGD step, batch {batch}: "
          f"median {med * 1000:.0f} ms/batch = {batch / med:.0f} images/s")
    model.eval()
    with torch.no_grad():
        med_f, _ = timed(lambda: model(x), repeats=repeats, warmup=1)
    print(f"resnet18-w16 forward only (eval, no grad), batch {batch}: {batch / med_f:.0f} images/s")


def decode_throughput(n: int, repeats: int) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        for i in range(n):
            d = root / f"class{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            pixels = (rng.random((240, 320, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"{i:05d}.jpg", quality=90)
        os.environ["LAYERCRIT_CACHE_DIR"] = str(Path(tmp) / "cache")
        cold, _ = timed(lambda: load_imagefolder(root, cache=False), repeats=repeats, warmup=0)
        load_imagefolder(root, cache=True)  # fill the cache
        warm, _ = timed(lambda: load_imagefolder(root, cache=True), repeats=repeats, warmup=0)
        print(f"image folder, {n} JPEGs 320x240 -> resize 256 / crop 224: no cache {n / cold:.0f} images/s "
              f"(median {cold:.2f}s), cached {n / warm:.0f} images/s (median {warm:.2f}s); ratio {cold / warm:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=500)
    args = ap.parse_args()
    print(machine())
    resnet_throughput(args.repeats)
    decode_throughput(args.images, args.repeats)


if __name__ == "__main__":
    main()
