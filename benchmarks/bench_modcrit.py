"""Issue 4: module criticality of an FCN-3x256 trained on digits (all 4 modules, default settings):
wall time and full-model evaluations; then a ranking run over FCNs of different width and depth.

Run: .venv/bin/python benchmarks/bench_modcrit.py [--repeats 3] [--epochs 40]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd

from common import machine, timed
from layercrit import TrainConfig, train
from layercrit.analyses.generalization import rank_runs
from layercrit.analyses.modcrit import run_module_criticality

RANK_MODELS = ["fcn-1x256", "fcn-2x256", "fcn-3x256", "fcn-5x256", "fcn-3x64", "fcn-3x128"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--only", choices=["single", "rank"], help="run one part only")
    args = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "fcn-3x256"
        train(TrainConfig(model="fcn-3x256", data="digits:train", epochs=args.epochs), run)
        for curve in (True, False) if args.only != "rank" else ():
            result = {}

            def job(curve=curve, result=result):
                result["r"] = run_module_criticality(run, curve=curve)

            med, times = timed(job, repeats=args.repeats, warmup=0)
            r = result["r"]
            evals = r.evaluations
            print(f"modcrit fcn-3x256 digits, 4 modules, eps 0.1, 21 alphas, 8 draws, n={r.config['n']}, "
                  f"{'whole curve' if curve else 'pruned (--fast)'}: median {med:.1f}s over {len(times)} runs, "
                  f"{evals:,} full-model evaluations ({med / evals * 1000:.2f} ms each)")
            print(r.table[["label", "alpha", "sigma", "mu", "delta_norm"]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if args.only == "single":
            return
        runs = []
        (Path(tmp) / "rank").mkdir()
        t0 = time.perf_counter()
        for name in RANK_MODELS:
            runs.append(Path(tmp) / "rank" / name)
            train(TrainConfig(model=name, data="digits:train", epochs=args.epochs), runs[-1])
        t1 = time.perf_counter()
        models, ranking = rank_runs(runs, epsilon=[0.01, 0.05])
        t2 = time.perf_counter()
        pd.set_option("display.width", 200)
        print(f"\ntrained {len(runs)} models in {t1 - t0:.1f}s; ranked them in {t2 - t1:.1f}s")
        print(models.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(ranking.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
