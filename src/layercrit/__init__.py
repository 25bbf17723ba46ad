"""layercrit: which layers of a trained network its decisions depend on.

    >>> import layercrit
    >>> result = layercrit.measure(model, "digits", factory=make_model, trials=3)
    >>> result.summary()
"""

__version__ = "0.1.0"

from .checkpoints import apply_weights, load_checkpoint, load_state_dict, save_checkpoint
from .criticality import MeasureConfig, measure
from .data import Dataset, load_data
from .engine import EXECUTORS, Engine, Executor, FullForward, Perturbation
from .errors import LayercritError
from .layers import Layer, Unit, list_layers, select_units
from .measures import MeasureSums, criticality, sample_measures
from .models import ModelFactory, create_model, list_models, register_model, resolve_factory
from .outputs import OUTPUTS, OutputAdapter, create_output, list_outputs
from .probes import Interpolate, Probe, Reinit, Rerandomize, Zero, create_probe, list_probes, substitute
from .proxies import ProxyComparison, ProxyResult, compare_proxies, proxies
from .results import CriticalityResult, summarize_trials
from .training import TrainConfig, train

__all__ = [
    "EXECUTORS",
    "OUTPUTS",
    "CriticalityResult",
    "Dataset",
    "Engine",
    "Executor",
    "FullForward",
    "Interpolate",
    "Layer",
    "LayercritError",
    "MeasureConfig",
    "MeasureSums",
    "ModelFactory",
    "OutputAdapter",
    "Perturbation",
    "Probe",
    "ProxyComparison",
    "ProxyResult",
    "Reinit",
    "Rerandomize",
    "TrainConfig",
    "Unit",
    "Zero",
    "__version__",
    "apply_weights",
    "compare_proxies",
    "create_model",
    "create_output",
    "create_probe",
    "criticality",
    "list_layers",
    "list_models",
    "list_outputs",
    "list_probes",
    "load_checkpoint",
    "load_data",
    "load_state_dict",
    "measure",
    "proxies",
    "register_model",
    "resolve_factory",
    "sample_measures",
    "save_checkpoint",
    "select_units",
    "substitute",
    "summarize_trials",
    "train",
]
