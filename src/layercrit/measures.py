"""Measures comparing the original model's outputs p with a probed model's outputs q.

Pure per-sample functions (torchmetrics style) plus `MeasureSums`, the accumulator the engine
uses: every measure here is a mean over samples, so the accumulator keeps float64 sums.
All computations are done in float64 from the logits.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "LABEL_MEASURES",
    "MEASURES",
    "MeasureSums",
    "criticality",
    "sample_measures",
]

# Measures comparing p and q (no labels needed) and measures of q against labels.
PAIR_MEASURES = ("criticality", "agreement", "l1", "l2", "kl")
LABEL_MEASURES = ("accuracy", "top5", "loss")
MEASURES = PAIR_MEASURES + LABEL_MEASURES


def sample_measures(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    which: Collection[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample measures of probed logits `q_logits` against original logits `p_logits`.

    Returns float64 tensors of shape (N,): `criticality` = 1 − cos(p, q) of the softmax vectors,
    `agreement` (same argmax), `l1`, `l2` (distances of p and q), `kl` = KL(p‖q); with labels also
    `accuracy` (top-1 correct of q), `top5` and `loss` (cross entropy of q). `which` limits the
    computation to the named measures (default: all).
    """
    want = set(MEASURES if which is None else which)
    q_log = F.log_softmax(q_logits.detach().double().flatten(1), dim=1)
    out = {}
    if want & set(PAIR_MEASURES):
        p_log = F.log_softmax(p_logits.detach().double().flatten(1), dim=1)
        p, q = p_log.exp(), q_log.exp()
        pair = {
            "criticality": lambda: 1.0 - F.cosine_similarity(p, q, dim=1, eps=1e-12),
            "agreement": lambda: (p_log.argmax(1) == q_log.argmax(1)).double(),
            "l1": lambda: (p - q).abs().sum(1),
            "l2": lambda: (p - q).pow(2).sum(1).sqrt(),
            "kl": lambda: torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(1),
        }
        out |= {k: fn() for k, fn in pair.items() if k in want}
    if labels is not None and want & set(LABEL_MEASURES):
        labels = labels.to(q_log.device)
        k = min(5, q_log.shape[1])
        labelled = {
            "accuracy": lambda: (q_log.argmax(1) == labels).double(),
            "top5": lambda: (q_log.topk(k, dim=1).indices == labels[:, None]).any(1).double(),
            "loss": lambda: F.nll_loss(q_log, labels, reduction="none"),
        }
        out |= {k: fn() for k, fn in labelled.items() if k in want}
    return out


def criticality(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over samples of 1 − cos(softmax(p_logits), softmax(q_logits)) (Gavrikov et al.)."""
    return float(sample_measures(p_logits, q_logits)["criticality"].mean())


class MeasureSums:
    """Running float64 sums of per-sample measures; `compute()` gives the means."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}  # kept on the device: no sync per batch

    def update(self, values: Mapping[str, torch.Tensor]) -> None:
        n = next(iter(values.values())).shape[0]
        self.n += n
        for k, v in values.items():
            s = v.sum()
            self.sums[k] = self.sums[k] + s if k in self.sums else s

    def compute(self) -> dict[str, float]:
        return {k: (float(self.sums[k]) / self.n if k in self.sums and self.n else math.nan) for k in MEASURES}
