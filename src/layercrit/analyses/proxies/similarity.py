"""The pure per-row math of the block proxies (the torchmetrics "functional" half): cosine with a
zero-safe denominator, Block Influence, angular distance, relative L2, last positions, sample means."""

from __future__ import annotations

import math

import torch

from ...errors import LayercritError

EPS = 1e-12  # floor of ‖a‖‖b‖ in the cosine (and of ‖x_in‖ in the relative L2 change)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, T, D) in float64: tokens stay, (B, D) is one token, (B, C, H, W, …) one flat vector."""
    x = x.detach().double()
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        return x[:, None]
    if x.ndim >= 4:
        return x.flatten(1)[:, None]
    raise LayercritError(f"expected hidden states of shape (batch, …) with at least 2 dims, got {tuple(x.shape)}")


def _valid(mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: which tokens of `x` (already (B, T, D)) count; `mask` is an attention mask."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise LayercritError(f"mask of shape {tuple(mask.shape)} does not fit hidden states {tuple(x.shape)}")
    return mask.to(x.device) != 0


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Row-wise cosine along the last dimension, in float64, clamped to [−1, 1].

    a·b / max(‖a‖‖b‖, eps): a zero vector gives 0, not NaN; the clamp keeps round-off (1 + 1e-16) out
    of `arccos`'s domain error. Never a matrix product of all rows against all rows.
    """
    a, b = a.detach().double(), b.detach().double()
    dot = (a * b).sum(-1)
    norms = a.norm(dim=-1) * b.norm(dim=-1)
    return (dot / norms.clamp_min(eps)).clamp(-1.0, 1.0)


def _masked(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(~valid, math.nan)


def block_influence(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ShortGPT's Block Influence of each token, 1 − cos(x_in, x_out): (B, T) float64, NaN where padded.

    Args:
        x_in: the residual stream entering the block.
        x_out: the block's output.
        mask: (B, T) attention mask (1 = token, 0 = padding), or None.
    """
    a, b = _tokens(x_in), _tokens(x_out)
    return _masked(1.0 - cosine(a, b), _valid(mask, a))


def angular_distance(x_a: torch.Tensor, x_b: torch.Tensor, mask: torch.Tensor | None = None,
                     last_only: bool = False) -> torch.Tensor:
    """Gromov et al.'s angular distance arccos(cos(x_a, x_b))/π ∈ [0, 1] of each token.

    Args:
        x_a: the residual stream entering block ℓ.
        x_b: the output of block ℓ+n−1 (the stream entering block ℓ+n).
        mask: (B, T) attention mask, or None.
        last_only: only the last non-padded token of each sample (Gromov et al.): shape (B,);
            else (B, T), NaN where padded.
    """
    a, b = _tokens(x_a), _tokens(x_b)
    valid = _valid(mask, a)
    if last_only:
        rows = torch.arange(len(a), device=a.device)
        last = last_positions(valid)
        return torch.arccos(cosine(a[rows, last], b[rows, last])) / math.pi
    return _masked(torch.arccos(cosine(a, b)) / math.pi, valid)


def relative_l2(x_in: torch.Tensor, x_out: torch.Tensor, mask: torch.Tensor | None = None,
                eps: float = EPS) -> torch.Tensor:
    """‖x_out − x_in‖ / max(‖x_in‖, eps) of each token: (B, T) float64, NaN where padded."""
    a, b = _tokens(x_in), _tokens(x_out)
    return _masked((b - a).norm(dim=-1) / a.norm(dim=-1).clamp_min(eps), _valid(mask, a))


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padded token of each row of a (B, T) mask (right or left padding)."""
    valid = mask != 0
    if not bool(valid.any(1).all()):
        raise LayercritError("a sample has no tokens: every position of its attention mask is 0")
    t = valid.shape[1]
    return (t - 1) - valid.flip(1).int().argmax(1)


def sample_means(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample of a (B, T) table with NaN at padding: the mean over its tokens and their number.

    The mean over all tokens of a data set is then Σ count·mean / Σ count (a ratio the bootstrap
    can resample sample by sample), the mean over sequences the plain mean of the means.
    """
    if values.ndim == 1:
        values = values[:, None]
    valid = ~values.isnan()
    count = valid.sum(1)
    return values.nan_to_num(0.0).sum(1) / count.clamp_min(1), count
