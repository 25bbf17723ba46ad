"""The float32 per-row sums of vocabulary-wide softmax rows, one cache-sized chunk at a time.

The formulation (x, L, y, d, the perpendicular part of q − p, KL's series) and its measured
precision are described in `layercrit.engine.measures`, whose `Reference` prepares the unmodified
side once per batch, calls `_measure_chunk` for each chunk of a probe's rows and makes the measures of
the sums.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

_SERIES = 0.25  # float32: KL's terms e^y − 1 − y by a series where |y| ≤ this
_FAR = -0.5  # float32: where Σ p·expm1(x) = p_t/q_t − 1 is below this, q's normalizer from Σ p·e^x instead


class _Rows(NamedTuple):
    """Per-row values of the unmodified side that `_measure_chunk` reads, for a chunk of rows."""

    lse: torch.Tensor  # (rows, 1) float32 log-normalizer of p
    mass: torch.Tensor  # Σp as float32 computes it
    norm2: torch.Tensor  # ‖p‖²
    top: torch.Tensor  # p at its argmax t
    jstar: torch.Tensor  # (rows, 1) argmax t
    zero: torch.Tensor  # (rows, 1) zeros (what `scatter_` writes at t)
    labels: torch.Tensor | None  # (rows, 1) labels clamped to ≥ 0
    probs: torch.Tensor | None  # p itself, if kept for the batch
    zp: torch.Tensor | None  # the unmodified logits of these rows, if kept apart from the caller's (selected rows)

    def part(self, index: slice | torch.Tensor) -> _Rows:
        """These values of the rows `index` (a slice: views)."""
        return _Rows(*(None if v is None else v[index] for v in self))


def _measure_chunk(zp: torch.Tensor, zq: torch.Tensor, rows: _Rows, want: set[str], work: list[torch.Tensor],
                   res: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]], careful: bool = False,
                   guard: bool = False) -> None:
    """Per-row sums of one chunk of rows in float32 (see `layercrit.engine.measures`), written into
    `res`: the chunk's rows of `Reference._results` and the same as (rows, 1) columns;
    `Reference._combine` makes the measures of them.

    Written for (tokens × vocabulary) chunks that stay in cache, where every pass over the chunk counts:
    one `expm1` (the only transcendental pass besides p's `exp` and q's), every temporary one of the
    seven reused `work` buffers and every sum written in place (no allocation per chunk), no bool
    tensors, `where` or `max` with indices (slower than arithmetic here), and the per-row arithmetic
    left to `_combine`, once per batch. The fast way (`careful` False) takes q's normalizer from
    Σ p·expm1(x); the careful way also computes what the rows where that cancels need
    (`Reference._needs_care`): the normalizer from positive terms and expm1(y) directly where
    Σ p·expm1(x) < `_FAR`, and ⟨p, q⟩ = Σ p²·e^y for rows nearly perpendicular to p. `guard`: also
    max(x), for the check against `_MAX_LOG_RATIO`.
    """
    res, col = res
    if zq.dtype != torch.float32:
        zp, zq = zp.float(), zq.float()
    if len(zq) < len(work[0]):
        work = [t[: len(zq)] for t in work]
    b_p, b_x, b_u, b_d, b_1, b_2, b_3 = work
    jstar = rows.jstar
    x = torch.sub(zq, zp, out=b_x)  # exact where z_q and z_p are within a factor 2: nearly identical rows
    torch.amax(zq, 1, out=res["qmax"])  # NaN or +inf: the row is not finite
    if "at_max" in res:  # how many scores equal the maximum (argmax is the first of them): ties are measured again
        torch.sum(torch.eq(zq, col["qmax"], out=b_1), 1, out=res["at_max"])
    if "zj" in res:
        torch.gather(zq, 1, jstar, out=col["zj"])
    if rows.labels is not None:
        zl = torch.gather(zq, 1, rows.labels, out=col["zl"])
        if "greater" in res:
            _rank_counts(zq, zl, b_1, res["equal"], res["greater"])
    if "t" not in res:
        return
    p = torch.sub(zp, rows.lse, out=b_p).exp_() if rows.probs is None else rows.probs
    s = torch.gather(x, 1, jstar, out=col["s"])
    x.sub_(s)
    if guard:
        torch.amax(x, 1, out=res["xmax"])
    u = torch.expm1(x, out=b_u)
    # p is exp(log p rounded to float32): Σp = `mass` = 1 ± 1e-7, which every sum of p is divided by.
    t = torch.sum(torch.mul(p, u, out=b_1), 1, out=res["t"]).div_(rows.mass)  # Σ p·expm1(x) = p_t/q_t − 1
    L = torch.log1p(t, out=res["L"])  # log Σ p·e^x: y = x − L = log q − log p
    if careful:
        # Where q is far more confident than p in p's argmax t, 1 + t = p_t/q_t is small and the sum
        # above cancels (1 + t loses log2(q_t/p_t) bits, and e^−L with it): there L = log Σ p·e^x from
        # positive terms, and expm1(y) directly.
        far = t < _FAR
        total = torch.sum(torch.exp(x, out=b_1).mul_(p), 1).div_(rows.mass)
        L.copy_(torch.where(far, total.log(), L))
    if "d_top" not in res:
        return
    a = torch.add(t, 1).reciprocal_()  # e^−L
    w = u.sub_(col["t"]).mul_(a[:, None])  # expm1(y) = q/p − 1 = (expm1(x) − t)·e^−L
    y = x.sub_(col["L"]) if careful or "kl" in res else None
    if careful:
        w.copy_(torch.where(far[:, None], torch.expm1(y), w))
    d = torch.mul(p, w, out=b_d)  # q − p
    if "kl" in res:
        _kl_sum(p, y, w, d, b_1, b_2, b_3, res["kl"])
    # Sums over the entries other than p's argmax t, with d_t apart: a peaked p puts most of q − p
    # along p, whose part along p must then cancel; at t that is done by hand (in `_combine`).
    d_top = torch.gather(d, 1, jstar, out=col["d_top"])
    d.scatter_(1, jstar, rows.zero)
    torch.sum(torch.mul(d, p, out=b_1), 1, out=res["dp_rest"])
    torch.sum(torch.mul(d, d, out=b_1), 1, out=res["dd_rest"])
    if "ee_rest" in res:
        # ‖(q − p)⊥p‖² without its entry t, elementwise: e = d − κ·p (κ = ⟨d, p⟩/‖p‖²)
        kappa = (d_top[:, 0] * rows.top + res["dp_rest"]).div_(rows.norm2).neg_()
        e = torch.addcmul(d, p, kappa[:, None], out=b_1).scatter_(1, jstar, rows.zero)
        torch.sum(e.square_(), 1, out=res["ee_rest"])
        if careful:  # ⟨p, q⟩ = Σ p²·e^y, a sum of positive terms, where ‖p‖² + ⟨d, p⟩ cancels (q nearly ⊥ p)
            torch.sum(torch.exp(y, out=b_1).mul_(p).mul_(p), 1, out=res["pq"])
    if "l1_rest" in res:
        torch.sum(d.abs_(), 1, out=res["l1_rest"])


def _rank_counts(z: torch.Tensor, zl: torch.Tensor, buffer: torch.Tensor | None = None, equal: torch.Tensor | None = None,
                 greater: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, how many scores equal `zl` (a (R, 1) column; at least the label's own, 1 without
    ties) and how many are greater, into `equal` and `greater` if given: comparisons written as
    float32 0/1 (cheaper than bool tensors and their sums), float32 counts exact up to 2^24 columns.
    NaN scores count as neither; the rows holding them are measured again (their maximum is NaN)."""
    equal = torch.sum(torch.eq(z, zl, out=buffer), 1, out=equal)
    return equal, torch.sum(torch.gt(z, zl, out=buffer), 1, out=greater)


def _kl_sum(p: torch.Tensor, y: torch.Tensor, w: torch.Tensor, d: torch.Tensor, b_1: torch.Tensor,
            b_2: torch.Tensor, b_3: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Σ p·(e^y − 1 − y) per row into `out`, from y, w = expm1(y) (overwritten) and d = p·w (in the buffers b_1 … b_3).

    Where |y| ≤ `_SERIES` each term is d·y·ρ(y) with ρ(y) = (e^y − 1 − y)/(y·(e^y − 1)) = ½ − y/12 +
    y³/720 − … by its series (relative truncation ≤ 7e-8): w − y would lose the digits of its
    cancellation there. Elsewhere p·(w − y). A 0/1 weight (y ≠ its clamp) chooses, exactly: `lerp`
    returns either end as it is.
    """
    ys = torch.clamp(y, -_SERIES, _SERIES, out=b_1)
    weight = torch.ne(y, ys, out=b_2)  # 1 where |y| > _SERIES, else 0
    rho = torch.addcmul(_constant(-1.0 / 12, y), ys, ys, value=1.0 / 720, out=b_3)
    rho = torch.addcmul(_constant(0.5, y), rho, ys, out=b_3)  # ½ − y/12 + y³/720
    near = torch.mul(d, y, out=b_1).mul_(rho)
    far = w.sub_(y).mul_(p)  # p·(w − y), in place of w (not read after this)
    return torch.sum(torch.lerp(near, far, weight, out=b_1), 1, out=out)


_CONSTANTS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _constant(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim float32 tensor on `like`'s device (`addcmul` takes its first operand as a tensor)."""
    key = (value, like.device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=torch.float32, device=like.device)
    return _CONSTANTS[key]
