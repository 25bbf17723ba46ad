"""`FullForward`: the whole model on the whole batch for every perturbation, with the parameters
substituted in place — the reference algorithm every other executor is checked against."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from ...data.inputs import Inputs, call_model
from ..probes import substitute
from .base import EXECUTORS, Executor, compiled


@EXECUTORS.register("full")
class FullForward(Executor):
    """The whole model on the whole batch for every perturbation (the reference algorithm)."""

    name = "full"

    def __init__(self, model: nn.Module, compile: bool | str = False) -> None:
        super().__init__(model)
        # Parameters are written in place, so one compiled graph serves every substitution.
        self._forward = compiled(model, compile)

    def start_batch(self, x: Inputs) -> object:
        self._x = x
        return call_model(self.model, x, self._forward)

    def run(self, values: Mapping[str, torch.Tensor]) -> object:
        with substitute(self.model, values):
            return call_model(self.model, self._x, self._forward)

    def end_batch(self) -> None:
        self._x = None
