"""Training the papers' models and the checkpoints they leave (epoch 0 first, self-describing files)."""

from .checkpoints import (
    Run,
    apply_weights,
    build_model,
    load_checkpoint,
    load_state_dict,
    save_checkpoint,
    strip_wrappers,
)
from .trainer import TrainConfig, TrainRun, evaluate_error, train

__all__ = [
    "Run",
    "TrainConfig",
    "TrainRun",
    "apply_weights",
    "build_model",
    "evaluate_error",
    "load_checkpoint",
    "load_state_dict",
    "save_checkpoint",
    "strip_wrappers",
    "train",
]
