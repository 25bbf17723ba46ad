"""Measures comparing the original model's outputs p with a probed model's outputs q.

Pure per-row functions (torchmetrics style) plus `MeasureSums`, the accumulator the engine uses:
every measure here is a mean over rows (samples, or tokens for a language model), so the
accumulator keeps float64 sums. Rows are compared in float64, a chunk of rows at a time, so that
a (tokens × vocabulary) output is never held in float64 as a whole: a chunk takes at most about
`CHUNK_BYTES`, whatever the batch.

Rows that are not finite (a probe that drives the output to NaN or +inf) get NaN for every
measure; `MeasureSums` then averages each measure over the finite rows and counts the others
(`n_nonfinite`), rather than letting one NaN hide every other row.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F

__all__ = [
    "CHUNK_BYTES",
    "LABEL_MEASURES",
    "MEASURES",
    "MeasureSums",
    "criticality",
    "sample_measures",
]

# Measures comparing p and q (no labels needed) and measures of q against labels.
PAIR_MEASURES = ("criticality", "agreement", "l1", "l2", "kl", "rel_l2")
LABEL_MEASURES = ("accuracy", "top5", "loss")
MEASURES = PAIR_MEASURES + LABEL_MEASURES
# The measures of softmax distributions and of raw vectors (the others are NaN for each).
SOFTMAX_MEASURES = ("criticality", "agreement", "l1", "l2", "kl") + LABEL_MEASURES
VECTOR_MEASURES = ("criticality", "l1", "l2", "rel_l2")

CHUNK_BYTES = 256 << 20  # float64 working memory of one chunk of rows
_TEMPORARIES = 8  # (rows, C) float64 tensors alive at once while a chunk is measured


def sample_measures(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    which: Collection[str] | None = None,
    *,
    softmax: bool = True,
    rows: torch.Tensor | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """Per-row measures of probed outputs `q_logits` against original outputs `p_logits`.

    Args:
        p_logits, q_logits: (R, C) outputs (more dimensions are flattened into C).
        labels: one integer label per compared row (−100: none), or None.
        which: the measures to compute (default: all that apply).
        softmax: compare softmax distributions of logits (True) or the raw vectors (False).
        rows: indices of the rows to compare (default: all), e.g. the non-padded positions of a
            flattened (B·T, V) output; `labels` are then per selected row.
        chunk_bytes: float64 working memory per chunk of rows.

    Returns:
        float64 tensors, one value per compared row. With `softmax`: `criticality` = 1 − cos(p, q)
        of the softmax vectors, `agreement` (same argmax), `l1`, `l2` (distances of p and q),
        `kl` = KL(p‖q); with labels also `accuracy` (top-1 correct of q), `top5` and `loss` (cross
        entropy of q), over the labelled rows only. Raw vectors: `criticality` = 1 − cos(p, q),
        `l1`, `l2` and `rel_l2` = ‖p − q‖/‖p‖. Non-finite rows are NaN in every measure.
    """
    want = set(MEASURES if which is None else which) & set(SOFTMAX_MEASURES if softmax else VECTOR_MEASURES)
    if labels is None or not softmax:
        want -= set(LABEL_MEASURES)
    p2, q2 = p_logits.detach().flatten(1), q_logits.detach().flatten(1)
    n = len(rows) if rows is not None else len(q2)
    step = max(1, int(chunk_bytes) // (_TEMPORARIES * 8 * max(1, q2.shape[1])))
    if rows is not None:
        rows = rows.to(q2.device)
    if labels is not None:
        labels = labels.to(q2.device)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in want}
    for i in range(0, n, step):
        index = rows[i : i + step] if rows is not None else slice(i, i + step)
        chunk = _measure_chunk(p2[index].double(), q2[index].double(),
                               None if labels is None else labels[i : i + step], want, softmax)
        for k, v in chunk.items():
            parts[k].append(v)
    empty = torch.zeros(0, dtype=torch.float64, device=q2.device)
    return {k: torch.cat(v) if v else empty for k, v in parts.items()}


def _measure_chunk(p: torch.Tensor, q: torch.Tensor, labels: torch.Tensor | None, want: set[str],
                   softmax: bool) -> dict[str, torch.Tensor]:
    """`sample_measures` on one chunk of float64 rows.

    Written for (tokens × vocabulary) chunks, where every pass over the chunk counts: row-wise dot
    products instead of `F.cosine_similarity` (whose broadcasting costs several passes), one
    difference for both distances, and KL as Σp·log p − Σp·log q (rows where a probability of 0
    meets a log of −inf take the exact masked form instead).
    """
    out: dict[str, torch.Tensor] = {}
    # NaN or +inf anywhere in a row (a max propagates NaN); −inf logits are legitimate: probability 0.
    bad = ~(q.amax(1) < math.inf) | ~(p.amax(1) < math.inf)
    if softmax:
        q_log = F.log_softmax(q, dim=1)
        if want & set(PAIR_MEASURES):
            p_log = F.log_softmax(p, dim=1)
            pp, qq = p_log.exp(), q_log.exp()
            diff = pp - qq if want & {"l1", "l2"} else None
            pair = {
                "criticality": lambda: _one_minus_cos(pp, qq),
                "agreement": lambda: (p_log.argmax(1) == q_log.argmax(1)).double(),
                "l1": lambda: torch.linalg.vector_norm(diff, 1, dim=1),
                "l2": lambda: _rowdot(diff, diff).sqrt(),
                "kl": lambda: _kl(pp, p_log, q_log),
            }
            out |= {k: fn() for k, fn in pair.items() if k in want}
            del diff
        if labels is not None and want & set(LABEL_MEASURES):
            keep = labels >= 0  # −100: a row without a label (e.g. the last position of a sequence)
            if not bool(keep.all()):
                q_log, labels, bad_labelled = q_log[keep], labels[keep], bad[keep]
            else:
                bad_labelled = bad
            labels = labels.long()
            k = min(5, q_log.shape[1])
            labelled = {
                "accuracy": lambda: (q_log.argmax(1) == labels).double(),
                "top5": lambda: (q_log.topk(k, dim=1).indices == labels[:, None]).any(1).double(),
                "loss": lambda: F.nll_loss(q_log, labels, reduction="none"),
            }
            out |= {k: _nan_where(bad_labelled, fn()) for k, fn in labelled.items() if k in want}
    else:
        bad = bad | ~(q.amin(1) > -math.inf) | ~(p.amin(1) > -math.inf)  # raw vectors: any non-finite value
        diff = p - q
        vector = {
            "criticality": lambda: _one_minus_cos(p, q),
            "l1": lambda: torch.linalg.vector_norm(diff, 1, dim=1),
            "l2": lambda: _rowdot(diff, diff).sqrt(),
            "rel_l2": lambda: (_rowdot(diff, diff) / _rowdot(p, p)).sqrt(),
        }
        out |= {k: fn() for k, fn in vector.items() if k in want}
    for k in want & set(PAIR_MEASURES):
        if k in out:
            out[k] = _nan_where(bad, out[k])
    return out


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,ij->i", a, b)


def _one_minus_cos(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """1 − cos(a, b) per row (a zero row counts as orthogonal to everything, as in `F.cosine_similarity`).

    Identical non-zero rows give exactly 0 (round-off would leave ±1e-16, which data files and tables
    would show as a criticality), and round-off never makes the value negative.
    """
    norms = _rowdot(a, a).sqrt().clamp_min(eps) * _rowdot(b, b).sqrt().clamp_min(eps)
    v = (1.0 - _rowdot(a, b) / norms).clamp_min(0.0)
    small = (v < 1e-12).nonzero().squeeze(1)  # only these rows can be identical: compare them alone
    if len(small):
        same = (a[small] == b[small]).all(1) & (norms[small] > eps * eps)
        v[small[same]] = 0.0
    return v


def _kl(pp: torch.Tensor, p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p‖q) per row; terms with p = 0 count 0 (also where log q = −inf)."""
    kl = _rowdot(pp, p_log) - _rowdot(pp, q_log)
    fix = kl.isnan()  # 0·(−inf) somewhere in the row: take the masked form there
    if bool(fix.any()):
        rows = fix.nonzero().squeeze(1)
        p, lp, lq = pp[rows], p_log[rows], q_log[rows]
        kl[rows] = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(1)
    return kl


def _nan_where(bad: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(bad, torch.full_like(v, math.nan), v)


def criticality(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over samples of 1 − cos(softmax(p_logits), softmax(q_logits)) (Gavrikov et al.)."""
    return float(sample_measures(p_logits, q_logits)["criticality"].mean())


class MeasureSums:
    """Running float64 sums of per-row measures; `compute()` gives the means over finite rows.

    Attributes:
        n: rows seen (samples, or tokens).
    """

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}  # kept on the device: no sync per batch
        self.counts: dict[str, torch.Tensor] = {}
        self.nonfinite: torch.Tensor | int = 0
        self.samples: dict[str, list[torch.Tensor]] = {}  # per-sample values, per batch, if the engine keeps them

    def update(self, values: Mapping[str, torch.Tensor]) -> None:
        if not values:
            return
        # Non-finite rows are counted on a measure every row has (label measures skip unlabelled rows).
        main = next((values[k] for k in PAIR_MEASURES if k in values), next(iter(values.values())))
        self.n += main.shape[0]
        self.nonfinite = self.nonfinite + main.isnan().sum()
        for k, v in values.items():
            ok = ~v.isnan()  # NaN: a non-finite row (±inf are kept: e.g. an infinite KL is the true value)
            s, c = torch.where(ok, v, torch.zeros_like(v)).sum(), ok.sum()
            self.sums[k] = self.sums[k] + s if k in self.sums else s
            self.counts[k] = self.counts[k] + c if k in self.counts else c

    def compute(self) -> dict[str, float]:
        """Each measure's mean over its finite rows (NaN when none), plus `n_rows` (rows compared)
        and `n_nonfinite` (rows left out because the output was not finite there)."""
        out = {}
        for k in MEASURES:
            count = int(self.counts[k]) if k in self.counts else 0
            out[k] = float(self.sums[k]) / count if count else math.nan
        return out | {"n_rows": self.n, "n_nonfinite": int(self.nonfinite)}
