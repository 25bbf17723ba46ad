"""Measures comparing the original model's outputs p with a probed model's outputs q.

Pure per-row functions (torchmetrics style) plus `MeasureSums`, the accumulator the engine uses:
every measure here is a mean over rows (samples, or tokens for a language model), so the
accumulator keeps float64 sums.

How rows are compared (`Reference`, which the engine builds once per batch and asks for every probe):

- **Vocabulary-wide softmax rows** (at least `FLOAT32_MIN_WIDTH` columns: language-model logits) are
  compared in float32, a few rows at a time (`CACHE_ELEMENTS`: a chunk's temporaries stay in the
  CPU's cache), every measure of a chunk from one pass of `expm1` over its logits. The unmodified
  side (p itself where it fits `chunk_bytes`, its log-normalizer, argmax t, ‖p‖², the label ranks)
  is computed once per batch and shared by every probe; each chunk writes its per-row sums in place
  (no allocation, concatenation or copy per chunk), and with `rows` that leave out at most
  `_DENSE` of the rows (a sequence's last position) every row is compared in place and the selected
  ones returned, rather than copying the selected rows of p and q per chunk. On the CPU a chunk takes
  the fast way and only the rows that need more (the two cases marked "careful" below) are measured
  again the careful way; on a GPU every chunk takes the careful way (choosing rows would synchronize).
  The formulation cancels nothing at first order, so nearly identical p and q keep their relative
  precision:
  - x = (z_q − z_p) − (z_q − z_p)_t, the logits subtracted first (exact where they agree within a
    factor 2); L = log Σ p·e^x = log1p(Σ p·expm1(x)); y = x − L = log q − log p; and
    d = q − p = p·expm1(y), never a difference of two rounded probabilities. l1 = Σ|d|, l2 = ‖d‖.
    Where q is far more confident than p in p's argmax (Σ p·expm1(x) = p_t/q_t − 1 < −½, e.g. a
    flat p on unfamiliar text), that sum cancels: L from Σ p·e^x and expm1(y) directly there (careful).
  - 1 − cos(p, q) = ‖q⊥‖²/(‖q‖(‖q‖ + ⟨q, p̂⟩)), q⊥ = d − (⟨d, p⟩/‖p‖²)·p: its entry t (which a
    peaked p makes the largest, and cancelling) is (d_t·Σ'p² − p_t·Σ'd·p)/‖p‖² with Σ' over the
    other entries; the others elementwise, e = d − (⟨d, p⟩/‖p‖²)·p (the expanded sums Σ'd² −
    2κ·Σ'd·p + κ²·Σ'p² lose up to 2e-7 more on peaked real rows, taking some past 1e-6). ⟨q, p̂⟩
    from ‖p‖² + ⟨d, p⟩, or from Σ p²·e^y where q is nearly ⊥ p (careful).
  - KL(p‖q) = Σ p·(e^y − 1 − y), each term ≥ 0: d·y·(½ − y/12 + y³/720) where |y| ≤ ¼ (there
    expm1(y) − y would cancel), p·(expm1(y) − y) elsewhere.
  - p is exp of log p rounded to float32, so Σp = 1 ± 1e-7: that common factor of the row is divided out.
  Measured against an exact float64 evaluation (`layercrit.testing.exact_measures`) on real
  language-model outputs (SmolLM2-135M on real text and on random tokens, random GPT-2 and Llama
  configs; benchmarks/results/lm_cost.md): ≤ 8.4e-7 relative on every row and ≤ 1.6e-8 on the means,
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

from .logit_sums import _FAR, _measure_chunk, _rank_counts, _Rows

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
CACHE_ELEMENTS = 1 << 16  # float32 elements of one temporary of a CPU chunk (256 KiB: a chunk stays in cache)
_MAX_LOG_RATIO = 64.0  # float32: a row with log(q/p) above this somewhere is measured in float64
_CANCELLATION = 1e-2  # float32: a criticality whose terms cancel by more than 1/this is measured in float64
_DENSE = 1 / 16  # float32: rows leaving out at most this share of the rows are compared all in place
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
        n: rows compared (the selected ones).
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
        self.float32 = softmax and width >= FLOAT32_MIN_WIDTH and self.p.dtype in _LOW_PRECISION
        labels = None if labels is None or not (self.want & set(LABEL_MEASURES)) else labels.to(self.device).long()
        self.select = None  # with `rows` that leave out few rows (a sequence's last position): all rows are
        # compared in place (slices, no copies), and the selected ones returned
        if rows is not None:
            rows = rows.to(self.device)
            if len(rows) == n_all and torch.equal(rows, torch.arange(n_all, device=self.device)):
                rows = None  # every row in order: slices, not copies
            elif self.float32 and n_all - len(rows) <= n_all * _DENSE and bool((rows[1:] > rows[:-1]).all()):
                self.select = rows
                if labels is not None:  # rows left out are unlabelled: no label measure counts them
                    every = torch.full((n_all,), -100, dtype=torch.long, device=self.device)
                    labels = every.index_copy_(0, rows, labels)
                rows = None
                self.chosen = torch.zeros(n_all, dtype=torch.bool, device=self.device).index_fill_(0, self.select, True)
        self.rows = rows
        self.count = n_all if rows is None else len(rows)  # rows computed (all of them, with `select`)
        self.n = self.count if self.select is None else len(self.select)
        self.labels = labels
        self.keep = None if labels is None else labels >= 0  # −100: a row without a label
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
        """Per compared row: log-normalizer, argmax, whether the float32 path applies, the unmodified
        model's own label measures, and Σp and ‖p‖² of p as the float32 path computes it (so that its
        rounding of log p to float32, a common factor of the row, cancels out)."""
        n, dev = self.count, self.device
        self.lse = torch.empty(n, dtype=torch.float64, device=dev)
        self.jstar = torch.empty(n, 1, dtype=torch.long, device=dev)
        self.mass = torch.empty(n, dtype=torch.float64, device=dev)
        self.top = torch.empty(n, dtype=torch.float64, device=dev)  # p at its argmax t
        self.rest2 = torch.empty(n, dtype=torch.float64, device=dev)  # Σ p² over the entries other than t
        self.p_ok = torch.empty(n, dtype=torch.bool, device=dev)
        lab = None if self.labels is None else self.labels.clamp_min(0)
        if lab is not None:
            self.base_rank = torch.empty(n, dtype=torch.float64, device=dev)
            self.base_ties = torch.empty(n, dtype=torch.bool, device=dev)
            self.base_zl = torch.empty(n, dtype=torch.float64, device=dev)
        self.tiny = torch.empty(n, dtype=torch.bool, device=dev)
        # p itself (and the selected rows of the logits), kept for every probe when they fit the chunk
        # budget (else computed again, and taken, per chunk)
        width = self.p.shape[1]
        fits = n * width * 4 <= self.chunk_bytes
        probs = torch.empty(n, width, dtype=torch.float32, device=dev) if fits else None
        kept = self.p.index_select(0, self.rows) if fits and self.rows is not None else None
        step = self._step(4, 8)
        for i in range(0, n, step):
            j = min(i + step, n)
            zp = self._take(self.p, i, j)
            top, arg = zp.max(1)
            low = zp.amin(1)
            lse = torch.logsumexp(zp.double(), 1)
            pp = torch.sub(zp.float(), lse.float()[:, None]).exp_()  # as `_measure_chunk` computes it
            if probs is not None:
                probs[i:j] = pp
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
                equal, greater = _rank_counts(zp.float(), zl)
                ties = equal != 1
                self.base_rank[i:j], self.base_ties[i:j], self.base_zl[i:j] = greater, ties, zl[:, 0]
            del zp, pp
        self.norm2 = self.top**2 + self.rest2  # ‖p‖² of p as float32 computes it
        self.guard = bool(self.tiny.any())  # rows where the ratio q/p is checked against _MAX_LOG_RATIO
        zero = torch.zeros(n, 1, dtype=torch.float32, device=dev)
        self.static = _Rows(self.lse.float()[:, None], self.mass.float(), self.norm2.float(), self.top.float(),
                            self.jstar, zero, None if lab is None else lab[:, None], probs, kept)
        self._chunks: tuple | None = None  # (step, [(start, end, rows, (results, the same as columns)) per chunk])

    def unmodified(self) -> dict[str, torch.Tensor]:
        """The measures of p against itself (the unmodified model's row of a result table)."""
        if not self.float32:
            return self._exact(self.p, None)
        out: dict[str, torch.Tensor] = {}
        ok = self.p_ok
        zero = torch.zeros(self.count, dtype=torch.float64, device=self.device)
        for k in self.want & {"criticality", "l1", "l2", "kl"}:
            out[k] = zero
        if "agreement" in self.want:
            out["agreement"] = torch.ones_like(zero)
        again = {"": ~ok}
        if self.labels is not None:
            out |= _label_values(self.want, self.labels, self.jstar[:, 0], self.base_rank, self.lse - self.base_zl,
                                 self.p.shape[1], self.keep)
            again["top5"] = self.base_ties & self.keep
        return self._selected(self._redo(out, self._only_selected(again), self.p))

    # -- a probe ------------------------------------------------------------------------------------

    def compare(self, q_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-row measures of `q_logits` (shaped like the unmodified outputs) against them."""
        q = q_logits.detach().flatten(1)
        if not self.float32:
            return self._exact(q, None)
        out, again = self._combine(self._sums(q))
        return self._selected(self._redo(out, self._only_selected(again), q))

    def _sums(self, q: torch.Tensor) -> dict[str, torch.Tensor]:
        """A probe's per-row sums (float64), chunk by chunk (`_measure_chunk`).

        On the CPU the chunks take the fast way, and the rows where that loses precision (q far more
        confident than p at p's argmax; q nearly perpendicular to p) are measured again the careful
        way, those rows only; elsewhere every chunk takes the careful way (choosing
        rows would cost a synchronization)."""
        step = self._step(9, 4)
        work = self._work(step)
        res = self._results()
        careful = self.careful_everywhere()
        if self._chunks is None or self._chunks[0] != step:
            chunks = []  # each chunk's rows of the unmodified side and of the results, sliced once per batch
            for i in range(0, self.count, step):
                part = {k: v[i : i + step] for k, v in res.items()}
                chunks.append((i, min(i + step, self.count), self.static.part(slice(i, i + step)), _with_columns(part)))
            self._chunks = (step, chunks)
        for i, j, rows, part in self._chunks[1]:
            zp = rows.zp if rows.zp is not None else self._take(self.p, i, j)
            _measure_chunk(zp, self._take(q, i, j), rows, self.want, work, part, careful, self.guard)
        raw = {k: v.double() for k, v in res.items()}
        if not careful and "t" in raw:
            idx = self._needs_care(raw).nonzero().squeeze(1)
            for s in range(0, len(idx), step):
                part = idx[s : s + step]
                rows = self.static.part(part)
                at = part if self.rows is None else self.rows[part]
                zp = rows.zp if rows.zp is not None else self.p[at]
                sub = {k: torch.empty(len(part), dtype=torch.float32, device=self.device) for k in res}
                _measure_chunk(zp, q[at], rows, self.want, work, _with_columns(sub), True, self.guard)
                for k, v in sub.items():
                    raw[k][part] = v.double()
        return raw

    def careful_everywhere(self) -> bool:
        """Whether every chunk takes the careful way (off the CPU, where choosing rows would synchronize)."""
        return self.device.type != "cpu"

    def _needs_care(self, raw: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rows whose fast-way sums lose precision: Σ p·expm1(x) = p_t/q_t − 1 below `_FAR`, and for
        criticality ‖p‖² + ⟨d, p⟩ = ⟨q, p⟩ cancelling by more than half (q nearly ⊥ p)."""
        redo = raw["t"] < _FAR
        if "criticality" in self.want:
            redo |= raw["d_top"] * self.top + raw["dp_rest"] <= -0.5 * self.norm2
        return redo

    def _results(self) -> dict[str, torch.Tensor]:
        """The float32 per-row sums `_measure_chunk` writes, allocated once per batch."""
        if getattr(self, "_res", None) is None:
            keys = ["qmax"]
            want = self.want
            if "agreement" in want or ("accuracy" in want and "top5" not in want):
                keys.append("at_max")
            if "agreement" in want:
                keys.append("zj")
            if self.labels is not None:
                keys += ["zl", "equal", "greater"] if "top5" in want else ["zl"]
            pair = want & {"criticality", "l1", "l2", "kl"}
            if pair or "loss" in want:
                keys += ["s", "t", "L"] + (["xmax"] if self.guard else [])
            if pair:
                keys += ["d_top", "dp_rest", "dd_rest"] + (["kl"] if "kl" in want else [])
                keys += ["ee_rest", "pq"] if "criticality" in want else []
                keys += ["l1_rest"] if "l1" in want else []
            self._res = {k: torch.full((self.count,), math.nan, dtype=torch.float32, device=self.device) for k in keys}
        return self._res

    def _work(self, step: int) -> list[torch.Tensor]:
        """The seven float32 (rows, C) buffers of `_measure_chunk`, allocated once per batch."""
        if getattr(self, "_buffers", None) is None or len(self._buffers[0]) < step:
            shape = (min(step, self.count), self.p.shape[1])
            self._buffers = [torch.empty(shape, dtype=torch.float32, device=self.device) for _ in range(7)]
        return self._buffers

    def _only_selected(self, again: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`again` without the rows that are computed but not selected (none measured twice for nothing)."""
        if self.select is None:
            return again
        return {k: v & self.chosen for k, v in again.items()}

    def _selected(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The selected rows' values (the label measures are per labelled row already)."""
        if self.select is None:
            return out
        return {k: v if k in LABEL_MEASURES else v[self.select] for k, v in out.items()}

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
            d_top, p_top, dp_rest, dd_rest = raw["d_top"], self.top, raw["dp_rest"], raw["dd_rest"]
            norm2, rest2 = self.norm2, self.rest2
            if "criticality" in want:
                dp = d_top * p_top + dp_rest
                # ‖q⊥‖², q⊥ = q − ⟨q, p̂⟩p̂ = (q − p)⊥: its entry t is (d_t·Σ'p² − p_t·Σ'd·p)/‖p‖² (Σ' over i ≠ t)
                ee = raw["ee_rest"] + ((d_top * rest2 - p_top * dp_rest) / norm2) ** 2
                np_ = norm2.sqrt()
                # ⟨q, p̂⟩ from ‖p‖² + ⟨d, p⟩, or where that cancels (q nearly ⊥ p) from ⟨p, q⟩ = Σ p²·e^y
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
        unique_max = raw["at_max"] == 1 if "at_max" in raw else None  # one score equals the maximum
        if "agreement" in want:
            top = raw["zj"] == raw["qmax"]
            out["agreement"] = (top & unique_max).double()
            again["agreement"] = top & ~unique_max  # argmax is the first of several maxima
        if self.labels is not None:
            keep = self.keep
            if "top5" in want:
                greater = raw["greater"]
                ties = raw["equal"] != 1  # scores equal to the label's besides it
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
        n = self.count if idx is None else len(idx)
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


def _with_columns(res: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-row result views and the same as (rows, 1) columns, as `_measure_chunk` writes them."""
    return res, {k: v[:, None] for k, v in res.items()}


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
