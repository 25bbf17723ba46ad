"""Issue 3: `layercrit train` of FCN-3x256 on digits for 40 epochs (target: under 30 s on 2 cores).

Run: .venv/bin/python benchmarks/bench_train.py [--repeats 3]
Times the library call (in-process) and the whole CLI command (process start included).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, timed
from layercrit import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        counter = iter(range(10**6))

        def run():
            train(TrainConfig(model="fcn-3x256", data="digits:train", epochs=40), Path(tmp) / f"r{next(counter)}")

        med, times = timed(run, repeats=args.repeats)
        print(f"train fcn-3x256 digits 40 epochs (API, 41 checkpoints): median {med:.2f}s over {times and len(times)} runs "
              f"({', '.join(f'{t:.2f}' for t in times)})")
        cli = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "layercrit", "train", "--model", "fcn-3x256", "--epochs", "40",
                            "--out", str(Path(tmp) / f"cli{i}"), "--quiet"], check=True, capture_output=True)
            cli.append(time.perf_counter() - t0)
        cli.sort()
        print(f"layercrit train CLI (process start included): median {cli[len(cli) // 2]:.2f}s; target < 30 s")


if __name__ == "__main__":
    main()
