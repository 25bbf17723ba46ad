"""How a probed model runs on a batch: the `Executor` interface and its registered implementations.

Importing this package registers every executor in `EXECUTORS`: `full` (the whole model per
perturbation, the reference), `incremental` (torch.fx: only the part of the graph downstream of the
changed parameters) and `prefix` (a stack of blocks: only blocks k…L). `auto` picks among them.
"""

from .base import DEFAULT_MEMORY_BUDGET, EXECUTORS, Executor, compiled, eval_mode
from .full import FullForward
from .incremental import IncrementalExecutor, auto_executor
from .prefix import PrefixExecutor

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "EXECUTORS",
    "Executor",
    "FullForward",
    "IncrementalExecutor",
    "PrefixExecutor",
    "auto_executor",
    "compiled",
    "eval_mode",
]
