"""Issue 5: units per second for a three-model zoo, local vs Ray on 2 CPUs, and the store's write
overhead per unit as a fraction of the compute.

Run: .venv/bin/python benchmarks/bench_sweep.py [--repeats 3] [--trials 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import machine
from layercrit import load_data
from layercrit.zoo.sweep import sweep

MODEL = '''
import torch.nn as nn

def make(hidden=256):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
'''


def make_zoo(d: Path, trials: int) -> Path:
    (d / "userfcn.py").write_text(MODEL)
    ns: dict = {}
    exec(MODEL, ns)
    test = load_data("digits:all")
    np.savez(d / "data.npz", x=test.x.numpy(), y=test.y.numpy())
    entries = []
    for i in range(3):
        torch.manual_seed(i)
        torch.save(ns["make"]().state_dict(), d / f"m{i}.pt")
        entries.append(f'[[model]]\nid = "m{i}"\nfactory = "userfcn.py:make"\nweights = "m{i}.pt"\ncategory = "c{i % 2}"\n')
    zoo = d / "zoo.toml"
    zoo.write_text(f'[defaults]\ndata = "data.npz"\ntrials = {trials}\nseed = 0\n\n' + "\n".join(entries))
    return zoo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--trials", type=int, default=10)
    args = ap.parse_args()
    print(machine())
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        zoo = make_zoo(Path(tmp), args.trials)
        results: dict[str, list] = {"local": [], "ray": []}
        t = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray_start = time.perf_counter() - t
        try:
            for r in range(args.repeats):
                for backend in ("local", "ray"):
                    report = sweep(zoo, Path(tmp) / f"{backend}{r}.sqlite", backend=backend, progress=False)
                    results[backend].append(report)
        finally:
            ray.shutdown()
        units = results["local"][0].added
        print(f"zoo: 3 FCN-3x256 models, 1,797 digits images, {args.trials} re-randomization trials: {units} units")
        for backend, reports in results.items():
            med = statistics.median(r.elapsed for r in reports)
            overhead = statistics.median(r.store_seconds / r.compute_seconds for r in reports)
            per_unit = statistics.median(r.store_seconds / r.added for r in reports)
            print(f"{backend:5s}: median {med:.2f}s = {units / med:.1f} units/s; store writes {per_unit * 1e3:.2f} ms/unit = "
                  f"{100 * overhead:.2f}% of the compute")
        ratio = statistics.median(r.elapsed for r in results["local"]) / statistics.median(r.elapsed for r in results["ray"])
        print(f"ray/local speed ratio (Ray already running; starting it took {ray_start:.1f}s): {ratio:.2f}x")


if __name__ == "__main__":
    main()
