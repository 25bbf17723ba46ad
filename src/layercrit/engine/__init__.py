"""The evaluation engine: batches outside, perturbations inside, one executor interface.

`engine.py` holds `Engine`, `RunSettings` and `Perturbation`; `probes`, `measures` and `outputs` are
what a perturbation changes, what is measured and how a model's outputs become compared rows;
`executors/` decides how a probed model runs on a batch.
"""

from .engine import Engine, Perturbation, RunSettings
from .executors import EXECUTORS, Executor, FullForward, eval_mode
from .outputs import logits_of

__all__ = ["EXECUTORS", "Engine", "Executor", "FullForward", "Perturbation", "RunSettings", "eval_mode", "logits_of"]
