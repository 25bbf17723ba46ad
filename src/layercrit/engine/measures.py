"""Measures comparing the original model's outputs p with a probed model's outputs q.

Pure per-row functions (torchmetrics style) plus `MeasureSums`, the accumulator the engine uses:
every measure here is a mean over rows (samples, or tokens for a language model), so the
accumulator keeps float64 sums.

How rows are compared (`Reference`, which the engine builds once per batch and asks for every probe):

- **Vocabulary-wide softmax rows** (at least `FLOAT32_MIN_WIDTH` columns: language-model logits) are
  compared in float32, a few rows at a time (`CACHE_ELEMENTS`: a chunk's temporaries stay in the
  CPU's cache), every measure of a chunk from one pass of `expm1` over its logits. The unmodified
  side (p itself where it fits `chunk_bytes`, its log-normalizer, argmax t, ‖p‖², the label ranks)
  is computed once per batch and shared by every probe. The formulation cancels nothing at first
  order, so nearly identical p and q keep their relative precision:
  - x = (z_q − z_p) − (z_q − z_p)_t, the logits subtracted first (exact where they agree within a
    factor 2); L = log Σ p·e^x = log1p(Σ p·expm1(x)); y = x − L = log q − log p; and
    d = q − p = p·expm1(y), never a difference of two rounded probabilities. l1 = Σ|d|, l2 = ‖d‖.
    Where q is far more confident than p in p's argmax (Σ p·expm1(x) = p_t/q_t − 1 < −½, e.g. a
    flat p on unfamiliar text), that sum cancels: L from Σ p·e^x and expm1(y) directly there.
  - 1 − cos(p, q) = ‖q⊥‖²/(‖q‖(‖q‖ + ⟨q, p̂⟩)), q⊥ = d − (⟨d, p⟩/‖p‖²)·p: its entry t (which a
    peaked p makes the largest, and cancelling) is (d_t·Σ'p² − p_t·Σ'd·p)/‖p‖² with Σ' over the
    other entries; the others come from the expanded sums where those keep half their size, else
    elementwise. ⟨q, p̂⟩ from ‖p‖² + ⟨d, p⟩, or from Σ p²·e^y where q is nearly ⊥ p.
  - KL(p‖q) = Σ p·(e^y − 1 − y), each term ≥ 0: d·y·(½ − y/12 + y³/720) where |y| ≤ ¼ (there
    expm1(y) − y would cancel), p·(expm1(y) − y) elsewhere.
  - p is exp of log p rounded to float32, so Σp = 1 ± 1e-7: that common factor of the row is divided out.
  Measured against an exact float64 evaluation (`layercrit.testing.exact_measures`) on real
  language-model outputs (SmolLM2-135M on real text and on random tokens, random GPT-2 and Llama
  configs; benchmarks/results/lm_cost.md): ≤ 9.1e-7 relative on every row and ≤ 1.3e-8 on the means,
  also where p and q differ by 1e-13 — where the float64 formulation below keeps no digit of the
  criticality and of KL. The loss (a log): within 1e-6 nats where it is below 1, relative above
  (tests/test_measures_precision.py).
- Rows where float32 cannot hold that are measured again by the float64 formulation below, so that
  each value is what float64 gives: −inf or non-finite logits, a probability ratio q/p beyond e^64
  (p near float32's subnormals), ties at the maximum or at the label's score (argmax and topk
  decide), and, for criticality alone, rows whose perpendicular part cancels by more than
  1/`_CANCELLATION`.
- **Narrow rows** (class logits, fewer than `FLOAT32_MIN_WIDTH` columns) and raw vectors (`hidden`
  outputs) are compared in float64, a chunk of at most `CHUNK_BYTES` at a time, as before: their
  cost is negligible next to a forward pass.

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
    "CACHE_ELEMENTS",
    "CHUNK_BYTES",
    "FLOAT32_MIN_WIDTH",
    "LABEL_MEASURES",
    "MEASURES",
    "MeasureSums",
    "Reference",
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

FLOAT32_MIN_WIDTH = 256  # softmax rows at least this wide are compared in float32 (see the module docstring)
CACHE_ELEMENTS = 1 << 17  # float32 elements of one temporary of a CPU chunk (512 KiB: a chunk stays in cache)
_MAX_LOG_RATIO = 64.0  # float32: a row with log(q/p) above this somewhere is measured in float64
_CANCELLATION = 1e-2  # float32: a criticality whose terms cancel by more than 1/this is measured in float64
_EXPANDED = 0.5  # float32: ‖(q − p)⊥p‖² from expanded sums only where they keep more than this share
_SERIES = 0.25  # float32: KL's terms e^y − 1 − y by a series where |y| ≤ this
_FAR = -0.5  # float32: where Σ p·expm1(x) = p_t/q_t − 1 is below this, q's normalizer from Σ p·e^x instead
_LOW_PRECISION = (torch.float32, torch.float16, torch.bfloat16)


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
        `kl` = KL(p‖q); with labels also `accuracy` (top-1 correct of q), `top5` (the label among
        the 5 highest scores, ties broken by index as argmax does) and `loss` (cross entropy of q),
        over the labelled rows only. Raw vectors: `criticality` = 1 − cos(p, q), `l1`, `l2` and
        `rel_l2` = ‖p − q‖/‖p‖. Non-finite rows are NaN in every measure.

    Comparing several q with one p: build a `Reference` once and call `compare` for each.
    """
    return Reference(p_logits, labels, which, softmax=softmax, rows=rows, chunk_bytes=chunk_bytes).compare(q_logits)


def criticality(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean over samples of 1 − cos(softmax(p_logits), softmax(q_logits)) (Gavrikov et al.)."""
    return float(sample_measures(p_logits, q_logits, which=("criticality",))["criticality"].mean())


def _wanted(which: Collection[str] | None, labels: torch.Tensor | None, softmax: bool) -> set[str]:
    want = set(MEASURES if which is None else which) & set(SOFTMAX_MEASURES if softmax else VECTOR_MEASURES)
    if labels is None or not softmax:
        want -= set(LABEL_MEASURES)
    return want


class Reference:
    """The unmodified outputs of one batch, prepared once to be compared with every probe's.

    Args:
        p_logits: (R, C) unmodified outputs (more dimensions are flattened into C).
        labels, which, softmax, rows, chunk_bytes: as for `sample_measures`.

    Attributes:
        float32: whether rows are compared by the float32 formulation (softmax rows at least
            `FLOAT32_MIN_WIDTH` wide, in float32 or a narrower float type).
        redone: rows measured again in float64 so far (see the module docstring), over all `compare` calls.
    """

    def __init__(
        self,
        p_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        which: Collection[str] | None = None,
        *,
        softmax: bool = True,
        rows: torch.Tensor | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.p = p_logits.detach().flatten(1)
        self.device = self.p.device
        self.softmax = softmax
        self.want = _wanted(which, labels, softmax)
        self.chunk_bytes = chunk_bytes
        n_all, width = self.p.shape
        if rows is not None:
            rows = rows.to(self.device)
            if len(rows) == n_all and torch.equal(rows, torch.arange(n_all, device=self.device)):
                rows = None  # every row in order: slices, not copies
        self.rows = rows
        self.n = n_all if rows is None else len(rows)
        self.labels = None if labels is None or not (self.want & set(LABEL_MEASURES)) else labels.to(self.device).long()
        self.keep = None if self.labels is None else self.labels >= 0  # −100: a row without a label
        self.float32 = softmax and width >= FLOAT32_MIN_WIDTH and self.p.dtype in _LOW_PRECISION
        self.redone = 0
        if self.float32:
            self._prepare()

    # -- chunks -------------------------------------------------------------------------------------

    def _step(self, temporaries: int, itemsize: int) -> int:
        """Rows per chunk: cache-sized on the CPU, memory-bounded (`chunk_bytes`) elsewhere."""
        width = max(1, self.p.shape[1])
        bound = max(1, int(self.chunk_bytes) // (temporaries * itemsize * width))
        if self.device.type == "cpu" and self.float32:
            return max(1, min(bound, CACHE_ELEMENTS // width))
        return bound

    def _take(self, t: torch.Tensor, i: int, j: int) -> torch.Tensor:
        return t[i:j] if self.rows is None else t.index_select(0, self.rows[i:j])

    # -- the unmodified side, once per batch ----------------------------------------------------------

    def _prepare(self) -> None:
        """Per selected row: log-normalizer, argmax, whether the float32 path applies, the unmodified
        model's own label measures, and Σp and ‖p‖² of p as the float32 path computes it (so that its
        rounding of log p to float32, a common factor of the row, cancels out)."""
        n, dev = self.n, self.device
        self.lse = torch.empty(n, dtype=torch.float64, device=dev)
        self.jstar = torch.empty(n, 1, dtype=torch.long, device=dev)
        self.mass = torch.empty(n, dtype=torch.float64, device=dev)
        self.top = torch.empty(n, dtype=torch.float64, device=dev)  # p at its argmax t
        self.rest2 = torch.empty(n, dtype=torch.float64, device=dev)  # Σ p² over the entries other than t
        self.p_ok = torch.empty(n, dtype=torch.bool, device=dev)
        lab = None if self.labels is None else self.labels.clamp_min(0)
        self.labels_clamped = lab
        if lab is not None:
            self.base_rank = torch.empty(n, dtype=torch.float64, device=dev)
            self.base_ties = torch.empty(n, dtype=torch.bool, device=dev)
            self.base_zl = torch.empty(n, dtype=torch.float64, device=dev)
        self.tiny = torch.empty(n, dtype=torch.bool, device=dev)
        # p itself, kept for every probe when it fits the chunk budget (else computed again per chunk)
        width = self.p.shape[1]
        self.probs = torch.empty(n, width, dtype=torch.float32, device=dev) if n * width * 4 <= self.chunk_bytes else None
        step = self._step(4, 8)
        for i in range(0, n, step):
            j = min(i + step, n)
            zp = self._take(self.p, i, j)
            top, arg = zp.max(1)
            low = zp.amin(1)
            lse = torch.logsumexp(zp.double(), 1)
            pp = torch.sub(zp.float(), lse.float()[:, None]).exp_()  # as `_measure_chunk` computes it
            if self.probs is not None:
                self.probs[i:j] = pp
            self.lse[i:j], self.jstar[i:j, 0] = lse, arg
            self.mass[i:j] = pp.sum(1, dtype=torch.float64)
            self.top[i:j] = pp.gather(1, arg[:, None])[:, 0]
            self.rest2[i:j] = pp.square_().scatter_(1, arg[:, None], 0.0).sum(1, dtype=torch.float64)
            # Finite everywhere (no NaN, ±inf): otherwise the float64 reference measures the row.
            self.p_ok[i:j] = (top < math.inf) & (low > -math.inf)
            # Some p below e^−80 (near float32's subnormals): q/p can then exceed what float32 holds
            self.tiny[i:j] = low.double() - lse < -80
            if lab is not None:
                zl = zp.float().gather(1, lab[i:j][:, None])
                net, greater = _rank_counts(zp.float(), zl)
                ties = ~(width - 2 * greater + net == 1)
                self.base_rank[i:j], self.base_ties[i:j], self.base_zl[i:j] = greater, ties, zl[:, 0]
            del zp, pp
        self.lse32 = self.lse.float()
        self.mass32 = self.mass.float()
        self.top32 = self.top.float()
        self.norm2 = self.top32.double() ** 2 + self.rest2  # ‖p‖² of p as float32 computes it
        self.norm2_32, self.rest2_32 = self.norm2.float(), self.rest2.float()
        self.guard = bool(self.tiny.any())  # rows where the ratio q/p is checked against _MAX_LOG_RATIO

    def unmodified(self) -> dict[str, torch.Tensor]:
        """The measures of p against itself (the unmodified model's row of a result table)."""
        if not self.float32:
            return self._exact(self.p, None)
        out: dict[str, torch.Tensor] = {}
        ok = self.p_ok
        zero = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        for k in self.want & {"criticality", "l1", "l2", "kl"}:
            out[k] = zero
        if "agreement" in self.want:
            out["agreement"] = torch.ones_like(zero)
        if self.labels is not None:
            out |= _label_values(self.want, self.labels, self.jstar[:, 0], self.base_rank, self.lse - self.base_zl,
                                 self.p.shape[1], self.keep)
            return self._redo(out, {"": ~ok, "top5": self.base_ties & self.keep}, self.p)
        return self._redo(out, {"": ~ok}, self.p)

    # -- a probe ------------------------------------------------------------------------------------

    def compare(self, q_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row measures of `q_logits` (shaped like the unmodified outputs) against them."""
        q = q_logits.detach().flatten(1)
        if not self.float32:
            return self._exact(q, None)
        want, n = self.want, self.n
        parts: dict[str, list[torch.Tensor]] = {}
        step = self._step(9, 4)
        work = self._work(step)
        for i in range(0, n, step):
            j = min(i + step, n)
            labels = None if self.labels is None else self.labels_clamped[i:j]
            probs = None if self.probs is None else self.probs[i:j]
            chunk = _measure_chunk(self._take(self.p, i, j), self._take(q, i, j), self.lse32[i:j], self.mass32[i:j],
                                   self.norm2_32[i:j], self.rest2_32[i:j], self.jstar[i:j], labels, want, work, probs,
                                   self.guard)
            for k, v in chunk.items():
                parts.setdefault(k, []).append(v)
        raw = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}
        raw = {k: v.double() if v.is_floating_point() else v for k, v in raw.items()}
        out, again = self._combine(raw)
        return self._redo(out, again, q)

    def _work(self, step: int) -> list[torch.Tensor]:
        """The seven float32 (rows, C) buffers of `_measure_chunk`, allocated once per batch."""
        if getattr(self, "_buffers", None) is None or len(self._buffers[0]) < step:
            shape = (min(step, self.n), self.p.shape[1])
            self._buffers = [torch.empty(shape, dtype=torch.float32, device=self.device) for _ in range(7)]
        return self._buffers

    def _combine(self, raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The measures from a probe's per-row sums (float64), and the rows to measure again in float64:
        by measure, and under "" for every measure."""
        want, out, width = self.want, {}, self.p.shape[1]
        redo = ~self.p_ok | ~(raw["qmax"] < math.inf)
        again: dict[str, torch.Tensor] = {}
        if "L" in raw:
            shift = raw["s"] + raw["L"]  # log-normalizer of q − that of p
            redo = redo | ~(shift.abs() < math.inf)
            if "xmax" in raw:
                redo = redo | (self.tiny & ~(raw["xmax"] - raw["L"] <= _MAX_LOG_RATIO))
        mass = self.mass  # p as float32 computes it sums to this: measures of p and q scale with it
        if "dd_rest" in raw:
            d_top, p_top, dp_rest, dd_rest = raw["d_top"], raw["p_top"], raw["dp_rest"], raw["dd_rest"]
            norm2, rest2 = self.norm2, self.rest2
            if "criticality" in want:
                # ‖q⊥‖², q⊥ = q − ⟨q, p̂⟩p̂ = (q − p)⊥: its entry t is (d_t·Σ'p² − p_t·Σ'd·p)/‖p‖² (Σ' over i ≠ t)
                ee = raw["ee_rest"] + ((d_top * rest2 - p_top * dp_rest) / norm2) ** 2
                np_ = norm2.sqrt()
                # ⟨q, p̂⟩ from ‖p‖² + ⟨d, p⟩, or where that cancels (q nearly ⊥ p) from ⟨p, q⟩ = Σ p²·e^y
                dp = d_top * p_top + dp_rest
                along = torch.where(dp > -0.5 * norm2, norm2 + dp, raw["pq"]) / np_
                nq = (along * along + ee).sqrt()
                out["criticality"] = ee / (nq * (nq + along))  # 1 − cos = ‖q⊥‖²/(‖q‖(‖q‖ + ⟨q, p̂⟩))
                # The other entries of q − p almost along those of p: q⊥ loses √(Σ'd²/‖q⊥‖²) digits there
                again["criticality"] = ee < _CANCELLATION * dd_rest
            if "l2" in want:
                out["l2"] = (d_top * d_top + dd_rest).sqrt() / mass
            if "l1" in want:
                out["l1"] = (raw["l1_rest"] + d_top.abs()) / mass
        if "kl" in want:
            out["kl"] = raw["kl"].clamp_min(0) / mass
            redo = redo | ~(out["kl"] < math.inf)  # a probability of q underflowing to 0: KL is +inf there
        unique_max = raw["at_max"] == 1 - width if "at_max" in raw else None  # one score equals the maximum
        if "agreement" in want:
            top = raw["zj"] == raw["qmax"]
            out["agreement"] = (top & unique_max).double()
            again["agreement"] = top & ~unique_max  # argmax is the first of several maxima
        if self.labels is not None:
            keep = self.keep
            if "top5" in want:
                greater = raw["greater"]
                ties = ~(width - 2 * greater + raw["net"] == 1)  # scores equal to the label's besides it (or NaN)
                out["top5"] = (greater < min(5, width)).double()[keep]
                again["top5"] = ties & keep  # topk decides among ties
                if "accuracy" in want:
                    out["accuracy"] = (greater == 0).double()[keep]
                    again["accuracy"] = ties & keep
            elif "accuracy" in want:
                top = raw["zl"] == raw["qmax"]
                out["accuracy"] = (top & unique_max).double()[keep]
                again["accuracy"] = top & ~unique_max & keep
            if "loss" in want:
                out["loss"] = (self.lse + shift - raw["zl"])[keep]
        again[""] = redo
        return out, again

    def _redo(self, out: dict[str, torch.Tensor], again: dict[str, torch.Tensor], q: torch.Tensor) -> dict[str, torch.Tensor]:
        """`out` with rows measured again by the float64 reference: the rows `again[""]` for every
        measure, the rows `again[k]` for measure k only."""
        everything = again.pop("", None)
        for k, rows in [("", everything), *again.items()]:
            if rows is None:
                continue
            if k:
                rows = rows & ~everything if everything is not None else rows
            idx = rows.nonzero().squeeze(1)
            if len(idx) == 0:
                continue
            self.redone += len(idx)
            exact = self._exact(q, idx, {k} if k else None)
            for m, v in exact.items():
                out[m] = out[m].clone()  # may be shared (the unmodified row's zeros)
                if m in LABEL_MEASURES:  # one value per labelled row: place them among this batch's
                    pos = torch.cumsum(self.keep.long(), 0) - 1
                    out[m][pos[idx[self.keep[idx]]]] = v
                else:
                    out[m][idx] = v
        return out

    # -- the float64 reference --------------------------------------------------------------------------

    def _exact(self, q: torch.Tensor, idx: torch.Tensor | None, which: set[str] | None = None) -> dict[str, torch.Tensor]:
        """Measures (`which`, default: all wanted) of the selected rows (all, or the positions `idx`
        among them) in float64."""
        want = self.want if which is None else self.want & which
        rows = self.rows if idx is None else (idx if self.rows is None else self.rows[idx])
        labels = self.labels if idx is None or self.labels is None else self.labels[idx]
        n = self.n if idx is None else len(idx)
        width = max(1, q.shape[1])
        step = max(1, int(self.chunk_bytes) // (_TEMPORARIES * 8 * width))
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in want}
        for i in range(0, n, step):
            index = rows[i : i + step] if rows is not None else slice(i, i + step)
            chunk = _exact_chunk(self.p[index].double(), q[index].double(),
                                 None if labels is None else labels[i : i + step], want, self.softmax)
            for k, v in chunk.items():
                parts[k].append(v)
        empty = torch.zeros(0, dtype=torch.float64, device=self.device)
        return {k: torch.cat(v) if v else empty for k, v in parts.items()}


def _label_values(want: set[str], labels: torch.Tensor, argmax: torch.Tensor | None, greater: torch.Tensor | None,
                  loss: torch.Tensor | None, width: int, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """The label measures over the labelled rows `keep` (one value per labelled row)."""
    out = {}
    if "accuracy" in want:
        out["accuracy"] = (argmax == labels).double()[keep]
    if "top5" in want:
        out["top5"] = (greater < min(5, width)).double()[keep]
    if "loss" in want:
        out["loss"] = loss[keep]
    return out


def _measure_chunk(zp: torch.Tensor, zq: torch.Tensor, lse: torch.Tensor, mass: torch.Tensor, norm2: torch.Tensor,
                   rest2: torch.Tensor, jstar: torch.Tensor, labels: torch.Tensor | None, want: set[str],
                   work: list[torch.Tensor],
                   probs: torch.Tensor | None = None, guard: bool = True) -> dict[str, torch.Tensor]:
    """Per-row sums of one chunk of rows in float32 (see the module docstring); `Reference._combine`
    makes the measures of them.

    Written for (tokens × vocabulary) chunks that stay in cache, where every pass over the chunk counts:
    one `expm1` (the only transcendental pass besides p's `exp` and q's), every temporary one of the
    seven reused `work` buffers (no allocation per chunk), fused `addcmul`s where they are fast, no
    bool tensors, `where` or `max` with indices (slower than arithmetic here), and the per-row
    arithmetic left to `_combine`, once per batch. `labels` are clamped to ≥ 0 (rows without one are
    dropped later); `probs` is p as this function computes it, if kept; `guard`: return max(x) for the
    check against `_MAX_LOG_RATIO`.
    """
    if zq.dtype != torch.float32:
        zp, zq = zp.float(), zq.float()
    if len(zq) < len(work[0]):
        work = [t[: len(zq)] for t in work]
    b_p, b_x, b_u, b_d, b_1, b_2, b_3 = work
    out: dict[str, torch.Tensor] = {}
    x = torch.sub(zq, zp, out=b_x)  # exact where z_q and z_p are within a factor 2: nearly identical rows
    out["qmax"] = top = zq.amax(1)  # NaN or +inf: the row is not finite
    if "agreement" in want or ("accuracy" in want and "top5" not in want):
        # how many scores equal the maximum (argmax is the first of them): ties are measured again
        out["at_max"] = torch.sub(zq, top[:, None], out=b_1).sign_().sum(1)  # −(C − ties)
        if "agreement" in want:
            out["zj"] = zq.gather(1, jstar)[:, 0]
    if labels is not None:
        zl = zq.gather(1, labels[:, None])
        out["zl"] = zl[:, 0]
        if "top5" in want:
            out["net"], out["greater"] = _rank_counts(zq, zl, b_1)
    pair = want & {"criticality", "l1", "l2", "kl"}
    if not pair and "loss" not in want:
        return out
    p = torch.sub(zp, lse[:, None], out=b_p).exp_() if probs is None else probs
    s = x.gather(1, jstar)
    x.sub_(s)
    if guard:
        out["xmax"] = x.amax(1)
    u = torch.expm1(x, out=b_u)
    # p is exp(log p rounded to float32): Σp = `mass` = 1 ± 1e-7, which every sum of p is divided by.
    t = torch.mul(p, u, out=b_1).sum(1).div_(mass)  # Σ p·expm1(x) = p_t/q_t − 1
    L = torch.log1p(t)  # log Σ p·e^x: y = x − L = log q − log p
    # Where q is far more confident than p in p's argmax t, 1 + t = p_t/q_t is small and the sum above
    # cancels (1 + t loses log2(q_t/p_t) bits, and e^−L with it): there L = log Σ p·e^x from positive
    # terms, and expm1(y) directly (on the CPU only for the chunks that need it).
    cpu = zq.device.type == "cpu"
    far = t < _FAR
    far_rows = far.nonzero().squeeze(1) if cpu and bool(far.any()) else None
    if far_rows is not None:  # those rows only
        L[far_rows] = torch.exp(x[far_rows]).mul_(p[far_rows]).sum(1).div_(mass[far_rows]).log_()
    elif not cpu:
        total = torch.exp(x, out=b_1).mul_(p).sum(1).div_(mass)
        L = torch.where(far, total.log(), L)
    out["L"], out["s"] = L, s[:, 0]
    if not pair:
        return out
    y = x.sub_(L[:, None])
    a = torch.reciprocal(t + 1)  # e^−L; e^−L − 1 = −t·e^−L, without cancellation
    w = u.mul_(a[:, None]).add_((-t * a)[:, None])  # expm1(y) = q/p − 1
    if far_rows is not None:
        w[far_rows] = torch.expm1(y[far_rows])
    elif not cpu:
        w = torch.where(far[:, None], torch.expm1(y), w)
    d = torch.mul(p, w, out=b_d)  # q − p
    if "kl" in want:
        out["kl"] = _kl_sum(p, y, w, d, b_1, b_2, b_3)
    # Sums over the entries other than p's argmax t, with d_t and p_t apart: a peaked p puts most of
    # q − p along p, whose part along p must then cancel; at t that is done by hand (in `_combine`).
    d_top, p_top = d.gather(1, jstar)[:, 0], p.gather(1, jstar)[:, 0]
    d.scatter_(1, jstar, 0.0)
    dp_rest = torch.mul(d, p, out=b_1).sum(1)
    out["dd_rest"] = torch.mul(d, d, out=b_1).sum(1)
    out["d_top"], out["p_top"], out["dp_rest"] = d_top, p_top, dp_rest
    if "criticality" in want:
        # ‖(q − p)⊥p‖² without its entry t: from the sums Σ'd² − 2κ·Σ'd·p + κ²·Σ'p² (κ = ⟨d, p⟩/‖p‖²)
        # where they do not cancel, else from e = d − κ·p elementwise (on the CPU only the chunks that
        # need it; the check would cost the GPU a synchronization)
        dp = d_top * p_top + dp_rest
        kappa = dp / norm2
        expanded = out["dd_rest"] - kappa * (2 * dp_rest - kappa * rest2)
        if zq.device.type != "cpu" or bool((expanded < _EXPANDED * out["dd_rest"]).any()):
            e = torch.mul(p, kappa[:, None], out=b_1)
            e = torch.sub(d, e, out=b_1).scatter_(1, jstar, 0.0)
            out["ee_rest"] = e.square_().sum(1)
        else:
            out["ee_rest"] = expanded
        # ⟨p, q⟩ = Σ p²·e^y, a sum of positive terms, where ‖p‖² + ⟨d, p⟩ cancels (q nearly ⊥ p); on
        # the CPU only for the chunks that need it (the check would cost the GPU a synchronization)
        if zq.device.type != "cpu" or bool((dp <= -0.5 * norm2).any()):
            out["pq"] = torch.exp(y, out=b_1).mul_(p).mul_(p).sum(1)
        else:
            out["pq"] = torch.full_like(dp, math.nan)
    if "l1" in want:
        out["l1_rest"] = d.abs_().sum(1)
    return out


def _rank_counts(z: torch.Tensor, zl: torch.Tensor, buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, Σ sign(z − zl) (greater − less) and how many scores are greater than `zl` (a (R, 1)
    column), from the sign of the difference (cheaper than comparisons into bool tensors). The scores
    equal to zl are then C − 2·greater + net; float32 counts are exact up to 2^24 columns, NaN scores
    make them NaN."""
    sign = torch.sub(z, zl, out=buffer).sign_()
    net = sign.sum(1)
    return net, sign.clamp_min_(0).sum(1)


def _kl_sum(p: torch.Tensor, y: torch.Tensor, w: torch.Tensor, d: torch.Tensor, b_1: torch.Tensor,
            b_2: torch.Tensor, b_3: torch.Tensor) -> torch.Tensor:
    """Σ p·(e^y − 1 − y) per row, from y, w = expm1(y) and d = p·w (in the buffers b_1 … b_3).

    Where |y| ≤ `_SERIES` each term is d·y·ρ(y) with ρ(y) = (e^y − 1 − y)/(y·(e^y − 1)) = ½ − y/12 +
    y³/720 − … by its series (relative truncation ≤ 7e-8): w − y would lose the digits of its
    cancellation there. Elsewhere p·(w − y). A 0/1 weight chooses, exactly (no bool tensors).
    """
    ys = torch.clamp(y, -_SERIES, _SERIES, out=b_1)
    weight = torch.sub(y, ys, out=b_2).sign_().square_()  # 1 where |y| > _SERIES, else 0
    rho = torch.addcmul(_constant(-1.0 / 12, y), ys, ys, value=1.0 / 720, out=b_3)
    rho = torch.addcmul(_constant(0.5, y), rho, ys, out=b_3)  # ½ − y/12 + y³/720
    near = torch.mul(d, y, out=b_1).mul_(rho)
    far = torch.sub(w, y, out=b_3).mul_(p).sub_(near)  # p·(w − y) − the series
    return torch.addcmul(near, weight, far, out=b_1).sum(1)


_CONSTANTS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 tensor on `like`'s device (`addcmul` takes its first operand as a tensor)."""
    key = (value, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=torch.float32, device=like.device)
    return _CONSTANTS[key]


def _exact_chunk(p: torch.Tensor, q: torch.Tensor, labels: torch.Tensor | None, want: set[str],
                 softmax: bool) -> dict[str, torch.Tensor]:
    """`sample_measures` on one chunk of float64 rows: the reference formulation.

    Row-wise dot products instead of `F.cosine_similarity` (whose broadcasting costs several passes),
    one difference for both distances, and KL as Σp·log p − Σp·log q (rows where a probability of 0
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
