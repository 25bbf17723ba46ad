"""`layercrit demo`: train an FCN-3×256 on digits, then measure re-randomization and
re-initialization-to-checkpoint-0 criticality of every layer."""

from __future__ import annotations

import time
from pathlib import Path

from .checkpoints import load_state_dict
from .criticality import measure
from .data import load_data
from .io import make_output_dir
from .models import factory_for_data
from .plots import criticality_heatmap, save_figure
from .report import build_report
from .training import TrainConfig, train

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
    from .cli import format_summary

    say(format_summary(result))
    csv = result.save(out / "criticality.csv")
    fig, _ = criticality_heatmap(result.table)
    png = save_figure(fig, out / "criticality.png")
    report = build_report(out / "report", results=result, title="layercrit demo: FCN-3×256 on digits")
    say(f"wrote {csv}, {png} and checkpoints in {ckpt_dir} ({time.perf_counter() - t0:.1f}s in all)")
    print(f"report: {report}  (open it in a browser)")
    return {"csv": csv, "png": png, "checkpoints": ckpt_dir, "result": result, "report": report}
