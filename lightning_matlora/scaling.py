"""The per-rank scale s(r) and the training diagonal P: the one home of both.

Notation follows the method spec: a rank-R adapter with factors A (``in × R``) and B (``R × out``), train ranks
S = {r_1 < … < r_n}, per-rank scale s(r) and the diagonal P = diag(p) used by the training forward

    y = x·W0 + x·A·diag(p)·B,   p_i = Σ_{r ∈ S, r ≥ i} s(r).

Both are computed in float64; layers cast them once to their own dtype (a float64 model is exact to float64).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

SCALINGS = ("none", "rank", "sqrt")

#: The largest ``r_max`` accepted. An adapter's rank is useful up to min(in, out) of its layers; the widest linear
#: layers of today's models are far below this, and a larger value is a typo that would allocate O(r_max) memory.
MAX_R_MAX = 65536


def default_ranks(r_max: int) -> list[int]:
    """The default train ranks: every power of two ≤ ``r_max``, plus ``r_max`` itself if it is not one.

    >>> default_ranks(64)
    [1, 2, 4, 8, 16, 32, 64]
    >>> default_ranks(48)
    [1, 2, 4, 8, 16, 32, 48]
    """
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
    if r_max > MAX_R_MAX:
        raise ValueError(f"r_max={r_max} is larger than the limit {MAX_R_MAX}: an adapter's rank is useful only up to "
                         f"min(in_features, out_features) of its layers; choose an r_max at most that width.")
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


def scale_of_rank(r: int | torch.Tensor, scaling: str = "sqrt", alpha: float = 1.0) -> float | torch.Tensor:
    """s(r): the scale of a rank-r adapter, ``alpha`` times 1, 1/r or 1/√r for scaling 'none', 'rank', 'sqrt'.

    ``r`` may be an int (returns a Python float) or an integer tensor (returns a float64 tensor of the same shape).

    >>> scale_of_rank(4)            # 1/√4
    0.5
    >>> scale_of_rank(4, "rank", alpha=2.0)
    0.5
    >>> scale_of_rank(torch.tensor([1, 4, 16]), "sqrt")
    tensor([1.0000, 0.5000, 0.2500], dtype=torch.float64)
    """
    check_scaling(scaling)
    if isinstance(r, torch.Tensor):
        r = r.to(torch.float64)
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
    """Algorithm 1 of the paper: the training diagonal p (float64, length ``r_max``).

    Walks i from R down to 1 and sets p_i to the sum of the scales s(r) of the train ranks r ≥ i, so that
    x·A·diag(p)·B equals Σ_{r∈S} s(r)·x·A[:, :r]·B[:r, :]. Computed as a reverse cumulative sum (the same walk,
    vectorised): O(r_max) time and memory.

    >>> build_p([1, 2, 4], 4, scaling="none")
    tensor([3., 2., 1., 1.], dtype=torch.float64)
    >>> build_p([1, 2, 4, 8, 16, 32], 32)[[0, 1, 2, 4, 8, 16]]   # the method's worked example, sqrt scaling
    tensor([2.9874, 1.9874, 1.2803, 0.7803, 0.4268, 0.1768], dtype=torch.float64)
    """
    ranks = check_ranks(ranks, r_max)
    check_scaling(scaling)
    at = torch.zeros(r_max, dtype=torch.float64)  # at[r - 1] = s(r) for every train rank r
    at[torch.tensor(ranks) - 1] = scale_of_rank(torch.tensor(ranks), scaling, alpha)
    return at.flip(0).cumsum(0).flip(0)  # p_i = Σ_{r ≥ i} s(r), accumulated from R down to 1


def check_p(p: Sequence[float] | torch.Tensor, r_max: int) -> torch.Tensor:
    """Validate an explicit training diagonal: length r_max, finite, non-negative. Returns a float64 tensor."""
    t = torch.as_tensor(p, dtype=torch.float64).flatten().clone()
    if t.numel() != r_max:
        raise ValueError(f"p has length {t.numel()} but r_max is {r_max}: give one diagonal entry per adapter "
                         f"component (or p=None for Algorithm 1's P built from ranks and scaling).")
    if not torch.isfinite(t).all():
        raise ValueError("p has NaN or infinite entries: every entry of the training diagonal must be finite.")
    if (t < 0).any():
        raise ValueError("p has negative entries: the training diagonal must be non-negative.")
    return t
