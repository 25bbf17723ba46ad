"""`layercrit demo`: train an FCN-3×256 on digits, then measure re-randomization and
re-initialization-to-checkpoint-0 criticality of every layer."""

from __future__ import annotations

import time
from pathlib import Path

from ..._utils.io import check_output_dir, make_output_dir
from ...analyses.criticality import measure
from ...data import load_data
from ...models import factory_for_data
from ...training.checkpoints import load_state_dict
from ...training.trainer import TrainConfig, train
from ...viz._style import save_figure
from ...viz.criticality import criticality_heatmap
from ...viz.report import build_report
from .._args import _out_path
from .._help import _finish_help

__all__ = ["run_demo"]


def run_demo(out: str | Path = "demo-out", epochs: int = 40, trials: int = 3, seed: int = 0, quiet: bool = False) -> dict:
    """Run the demo into folder `out` (created if missing); returns the paths written."""
    out = make_output_dir(out)
    say = (lambda *a: None) if quiet else print
    t0 = time.perf_counter()
    ckpt_dir = out / "checkpoints"
    config = TrainConfig(model="fcn-3x256", data="digits:train", epochs=epochs, seed=seed,
                         save_epochs=sorted({0, 1, 2, 5, 10, 20, epochs} & set(range(epochs + 1))))
    run = train(config, ckpt_dir, resume=(ckpt_dir / "manifest.json").is_file(), progress=not quiet)
    final = run.manifest["checkpoints"][-1]
    say(f"trained fcn-3x256 on digits for {epochs} epochs in {time.perf_counter() - t0:.1f}s: "
        f"train error {100 * final['train_error']:.2f}%, test error {100 * final['test_error']:.2f}%")
    data = load_data("digits:test")
    factory = factory_for_data("fcn-3x256", {}, data.num_classes, data.input_shape)
    result = measure(
        run.model,
        data,
        factory=factory,
        reference=load_state_dict(ckpt_dir / "epoch_0000.pt"),
        reference_name="E0",
        model_name="fcn-3x256",
        probes=["rerandomize", "reinit"],
        trials=trials,
        seed=seed,
        progress=not quiet,
    )
    from ...analyses.criticality import format_summary

    say(format_summary(result))
    csv = result.save(out / "criticality.csv")
    fig, _ = criticality_heatmap(result.table)
    png = save_figure(fig, out / "criticality.png")
    report = build_report(out / "report", results=result, title="layercrit demo: FCN-3×256 on digits")
    say(f"wrote {csv}, {png} and checkpoints in {ckpt_dir} ({time.perf_counter() - t0:.1f}s in all)")
    print(f"report: {report}  (open it in a browser)")
    return {"csv": csv, "png": png, "checkpoints": ckpt_dir, "result": result, "report": report}


def run(args) -> int:
    pass  # (import removed)

    check_output_dir(args.out)
    run_demo(args.out, epochs=args.epochs, trials=args.trials, seed=args.seed, quiet=args.quiet)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train an FCN-3x256 on digits and measure its layers")
    p.add_argument("--out", type=_out_path, default=Path("demo-out"), metavar="DIR", help="output folder (default demo-out)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    p.add_argument("--trials", type=int, default=3, help="re-randomization trials (default 3)")
    p.add_argument("--seed", type=int, default=0, help="training and probe seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(fn=run)
    _finish_help(sub)
