"""The per-rank scale s(r) and the training diagonal P: the one home of both.

Notation follows the method spec: a rank-R adapter with factors A (``in × R``) and B (``R × out``), train ranks
S = {r_1 < … < r_n}, per-rank scale s(r) and the diagonal P = diag(p) used by the training forward

    y = x·W0 + x·A·diag(p)·B,   p_i = Σ_{r ∈ S, r ≥ i} s(r).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

SCALINGS = ("none", "rank", "sqrt")


def default_ranks(r_max: int) -> list[int]:
    """The default train ranks: every power of two ≤ ``r_max``, plus ``r_max`` itself if it is not one."""
    check_r_max(r_max)
    ranks = []
    r = 1
    while r <= r_max:
        ranks.append(r)
        r *= 2
    if ranks[-1] != r_max:
        ranks.append(r_max)
    return ranks


def check_r_max(r_max: int) -> int:
    if isinstance(r_max, bool) or not isinstance(r_max, int) or r_max < 1:
        raise ValueError(f"r_max must be an integer ≥ 1 (the allocated adapter rank), got {r_max!r}.")
    return r_max


def check_ranks(ranks: Iterable[int], r_max: int, what: str = "ranks") -> list[int]:
    """Validate a set of ranks against ``r_max`` and return it sorted ascending.

    Raises ``ValueError`` naming the fix for an empty list, duplicates, non-integers or ranks outside 1…r_max.
    """
    check_r_max(r_max)
    ranks = list(ranks)
    if not ranks:
        raise ValueError(f"{what} is empty: give at least one rank in 1…{r_max}, or None for the default "
                         f"(powers of two up to r_max: {default_ranks(r_max)}).")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int)]
    if bad:
        raise ValueError(f"{what} must be integers, got {bad!r}.")
    out_of_range = [r for r in ranks if not 1 <= r <= r_max]
    if out_of_range:
        raise ValueError(f"{what} {out_of_range} outside 1…r_max={r_max}: every rank must be at least 1 and at most "
                         f"r_max (raise r_max or drop those ranks).")
    duplicates = sorted({r for r in ranks if ranks.count(r) > 1})
    if duplicates:
        raise ValueError(f"{what} has duplicates {duplicates}: list each rank once.")
    return sorted(ranks)


def check_scaling(scaling: str) -> str:
    if scaling not in SCALINGS:
        raise ValueError(f"Unknown scaling {scaling!r}: use one of {SCALINGS} "
                         f"('none' → s(r)=1, 'rank' → 1/r, 'sqrt' → 1/√r).")
    return scaling


def rank_scale(r: int | torch.Tensor, scaling: str = "sqrt", alpha: float = 1.0):
    """s(r): the scale of a rank-r adapter, ``alpha`` times 1, 1/r or 1/√r for scaling 'none', 'rank', 'sqrt'.

    ``r`` may be an int (returns a float) or an integer tensor (returns a float32 tensor of the same shape).
    """
    check_scaling(scaling)
    if isinstance(r, torch.Tensor):
        r = r.to(torch.float32)
        if scaling == "none":
            return torch.full_like(r, float(alpha))
        if scaling == "rank":
            return alpha / r
        return alpha / r.sqrt()
    if scaling == "none":
        return float(alpha)
    if scaling == "rank":
        return alpha / r
    return alpha / math.sqrt(r)


def build_p(ranks: Sequence[int], r_max: int, scaling: str = "sqrt", alpha: float = 1.0) -> torch.Tensor:
    """Algorithm 1 of the paper: the training diagonal p (float32, length ``r_max``).

    Walks i from R down to 1 and sets p_i to the sum of the scales s(r) of the train ranks r ≥ i, so that
    x·A·diag(p)·B equals Σ_{r∈S} s(r)·x·A[:, :r]·B[:r, :].
    """
    ranks = check_ranks(ranks, r_max)
    check_scaling(scaling)
    p = [0.0] * r_max
    acc = 0.0
    pending = sorted(ranks, reverse=True)
    j = 0
    for i in range(r_max, 0, -1):  # 1-based component index, from R down to 1
        while j < len(pending) and pending[j] >= i:
            acc += rank_scale(pending[j], scaling, alpha)
            j += 1
        p[i - 1] = acc
    return torch.tensor(p, dtype=torch.float32)


def check_p(p: Sequence[float] | torch.Tensor, r_max: int) -> torch.Tensor:
    """Validate an explicit training diagonal: length r_max, finite, non-negative. Returns a float32 tensor."""
    t = torch.as_tensor(p, dtype=torch.float32).flatten().clone()
    if t.numel() != r_max:
        raise ValueError(f"p has length {t.numel()} but r_max is {r_max}: give one diagonal entry per adapter "
                         f"component (or p=None for Algorithm 1's P built from ranks and scaling).")
    if not torch.isfinite(t).all():
        raise ValueError("p has NaN or infinite entries: every entry of the training diagonal must be finite.")
    if (t < 0).any():
        raise ValueError("p has negative entries: the training diagonal must be non-negative.")
    return t
