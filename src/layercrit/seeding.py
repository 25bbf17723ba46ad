"""Explicit, separate seeds: every random draw gets its own `torch.Generator`, never the global RNG."""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["derive_seed", "generator"]


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed derived from `seed` and `keys` (ints or strings), stable across runs and platforms.

    `derive_seed(seed, trial)` is the seed of trial `trial`; string keys (layer names) are hashed with
    CRC-32 so that a layer's draw does not depend on which other layers were selected.
    """
    ints = [int(seed)] + [zlib.crc32(k.encode()) if isinstance(k, str) else int(k) for k in keys]
    return int(np.random.SeedSequence(ints).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g
