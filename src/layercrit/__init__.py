"""layercrit: which layers of a trained network its decisions depend on.

    >>> import layercrit
    >>> result = layercrit.measure(model, "digits", factory=make_model, trials=3)
    >>> result.summary()
"""

from ._version import __version__
from .analyses.criticality import MeasureConfig, measure
from .analyses.generalization import rank_runs
from .analyses.modcrit import ModcritConfig, run_module_criticality
from .analyses.proxies import ProxyComparison, ProxyResult, compare_proxies, proxies
from .analyses.pruning import PruningCurve, pruning_curve
from .analyses.robustness import robustness, weight_distances
from .data import Dataset, load_data
from .engine import EXECUTORS, Engine, Executor, FullForward, Perturbation, RunSettings
from .engine.measures import MeasureSums, criticality, sample_measures
from .engine.outputs import OUTPUTS, OutputAdapter, create_output, list_outputs
from .engine.probes import Interpolate, Probe, Reinit, Rerandomize, Zero, create_probe, list_probes, substitute
from .errors import LayercritError
from .models import ModelFactory, create_model, list_models, register_model, resolve_factory
from .results import CriticalityResult, summarize_trials
from .training import TrainConfig, apply_weights, load_checkpoint, load_state_dict, save_checkpoint, train
from .units import Layer, Unit, list_layers, select_units

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
    "ModcritConfig",
    "ModelFactory",
    "OutputAdapter",
    "Perturbation",
    "Probe",
    "ProxyComparison",
    "ProxyResult",
    "PruningCurve",
    "Reinit",
    "Rerandomize",
    "RunSettings",
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
    "pruning_curve",
    "rank_runs",
    "register_model",
    "resolve_factory",
    "robustness",
    "run_module_criticality",
    "sample_measures",
    "save_checkpoint",
    "select_units",
    "substitute",
    "summarize_trials",
    "train",
    "weight_distances",
]
