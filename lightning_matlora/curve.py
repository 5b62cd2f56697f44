"""Rank curves as plain numbers: AURAC, the rank to serve, the sentence and table that say so, and the plot.

A *rank curve* maps each evaluated rank k to a score (loss, accuracy, exact match …) of the adapter served at
rank k. Everything here works on plain Python mappings ``{rank: value}`` (values are floats or 0-dim tensors)
and has no Lightning or torchmetrics dependency; :class:`~lightning_matlora.RankCurveMetric` and the
``MatryoshkaLoRA`` callback build on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

Number = Union[float, int, torch.Tensor]
AXES = ("log2", "linear")


# --------------------------------------------------------------------------------------------------- checks
def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise ValueError(f"axis must be 'log2' (every doubling of rank weighs the same) or 'linear', got {axis!r}.")
    return axis


def check_curve_ranks(ranks: Sequence[int], what: str = "ranks") -> list[int]:
    """Ranks of a curve: a non-empty sequence of distinct integers ≥ 1 (any order)."""
    ranks = [int(r) if isinstance(r, torch.Tensor) else r for r in ranks]
    if not ranks:
        raise ValueError(f"{what} is empty: a rank curve needs at least one rank.")
    bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
    if bad:
        raise ValueError(f"{what} must be integers ≥ 1, got {bad!r}.")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"{what} has duplicates {sorted(r for r in set(ranks) if ranks.count(r) > 1)}: list each "
                         f"rank once.")
    return ranks


def _float(v: Number) -> float:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"A rank curve needs one number per rank, got a tensor of shape {tuple(v.shape)}.")
        return float(v.detach().float().cpu())
    return float(v)


# ---------------------------------------------------------------------------------------------------- AURAC
def aurac(ranks: Sequence[int], values: Sequence[Number] | torch.Tensor, axis: str = "log2") -> Any:
    """Area under the rank curve, divided by the span of the rank axis (the spec's AURAC).

    ``Σ_{i<m} (t_{i+1} − t_i)·(a_i + a_{i+1})/2 / (t_m − t_1)`` with ``t = log2(rank)`` (default: every doubling of
    rank weighs the same) or ``t = rank`` (``axis="linear"``). Points are sorted by rank first. With one rank the
    AURAC is that rank's value. The result is in the units of the values (an average score over the axis).

    NaN values are not dropped: any NaN makes the AURAC NaN, so a diverged rank cannot hide.

    Args:
        ranks: m distinct ranks ≥ 1, any order.
        values: m scores: numbers, 0-dim tensors, or a tensor of shape ``(m, ...)`` (one AURAC per trailing
            element, e.g. per class).
    Returns:
        A ``float`` when the values are numbers or 0-dim tensors, else a float64 tensor of shape ``values.shape[1:]``.
    """
    check_axis(axis)
    ranks = check_curve_ranks(ranks)
    as_float = not isinstance(values, torch.Tensor)
    if as_float:
        values = list(values)
        if any(isinstance(v, torch.Tensor) and v.numel() != 1 for v in values):
            vals = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
            as_float = False
        else:
            vals = torch.tensor([_float(v) for v in values], dtype=torch.float64)
    else:
        vals = values.detach().to(torch.float64).cpu()
        as_float = vals.dim() == 1
    if vals.shape[0] != len(ranks):
        raise ValueError(f"aurac got {len(ranks)} ranks but {vals.shape[0]} values: give one value per rank.")
    order = sorted(range(len(ranks)), key=ranks.__getitem__)
    r = torch.tensor([ranks[i] for i in order], dtype=torch.float64)
    v = vals[order]
    if len(ranks) == 1:
        out = v[0]
    else:
        t = torch.log2(r) if axis == "log2" else r
        dt = (t[1:] - t[:-1]).view(-1, *([1] * (v.dim() - 1)))
        out = (dt * (v[1:] + v[:-1]) / 2).sum(0) / (t[-1] - t[0])
    return float(out) if as_float else out


# ---------------------------------------------------------------------------------------------- rank choice
def _curve_items(curve: Mapping[int, Number]) -> list[tuple[int, float]]:
    ranks = check_curve_ranks(list(curve), what="curve ranks")
    return sorted((r, _float(curve[r])) for r in ranks)


def select_rank(curve: Mapping[int, Number], tolerance: float = 0.01, relative: bool = True,
                higher_is_better: bool = True) -> int:
    """The smallest rank whose score is within ``tolerance`` of the best rank's score.

    Args:
        curve: ``{rank: score}``.
        tolerance: allowed shortfall from the best score: a fraction of ``|best|`` when ``relative`` (0.01 = 1%),
            else in the score's own units.
        higher_is_better: ``True`` for accuracies, ``False`` for losses (then "within" means at most
            ``best + tolerance``).
    Raises:
        ValueError: on a negative tolerance, or if any score is NaN (name the ranks; a NaN rank is never chosen
            silently).
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number ≥ 0 (0.01 = within 1% of the best), got {tolerance!r}.")
    items = _curve_items(curve)
    nan = [r for r, v in items if math.isnan(v)]
    if nan:
        raise ValueError(f"The rank curve has NaN scores at ranks {nan}: fix the evaluation (or training) before "
                         f"choosing a rank.")
    best = max(v for _, v in items) if higher_is_better else min(v for _, v in items)
    slack = tolerance * abs(best) if relative else tolerance
    for r, v in items:
        if (v >= best - slack) if higher_is_better else (v <= best + slack):
            return r
    raise AssertionError("unreachable: the best rank is always within tolerance")  # pragma: no cover


_FRACTIONS = {2: "half", 4: "a quarter", 8: "an eighth", 16: "a sixteenth", 32: "a thirty-second",
              64: "a sixty-fourth", 128: "a 128th", 256: "a 256th", 512: "a 512th", 1024: "a 1024th"}


def size_fraction(rank: int, of: int) -> str:
    """``rank/of`` in words when it is 1/2ⁿ ("an eighth"), else as a fraction ("3/64")."""
    if of % rank == 0 and of // rank in _FRACTIONS:
        return _FRACTIONS[of // rank]
    g = math.gcd(rank, of)
    return f"{rank // g}/{of // g}"


def best_rank(curve: Mapping[int, Number], higher_is_better: bool = True) -> int:
    """The rank with the best score (the smallest such rank on ties); NaN scores are never best."""
    items = [(r, v) for r, v in _curve_items(curve) if not math.isnan(v)]
    if not items:
        raise ValueError("Every score of the rank curve is NaN: there is no best rank.")
    key = (lambda rv: (-rv[1], rv[0])) if higher_is_better else (lambda rv: (rv[1], rv[0]))
    return min(items, key=key)[0]


def describe_rank_choice(curve: Mapping[int, Number], tolerance: float = 0.01, relative: bool = True,
                         higher_is_better: bool = True, name: str = "accuracy") -> str:
    """One sentence of advice from :func:`select_rank`, e.g.
    "rank 8 keeps 99.2% of rank 64's accuracy (0.912 vs 0.919) at an eighth of the adapter size".

    Adapter size (parameters, memory, LoRA FLOPs) is proportional to the rank. Never raises on NaN scores: the
    sentence says which ranks are NaN instead.
    """
    items = _curve_items(curve)
    nan = [r for r, v in items if math.isnan(v)]
    if nan:
        return f"no rank advised: the scores at ranks {nan} are NaN."
    chosen = select_rank(curve, tolerance, relative, higher_is_better)
    top = best_rank(curve, higher_is_better)
    values = dict(items)
    tol = f"{100 * tolerance:g}%" if relative else f"{tolerance:g}"
    if chosen == top:
        return f"rank {top} scores best and no smaller rank is within {tol} of its {name} ({values[top]:.4g})."
    a, b = values[chosen], values[top]
    size = f"at {size_fraction(chosen, top)} of the adapter size"
    if higher_is_better and relative and b > 0:
        return f"rank {chosen} keeps {100 * a / b:.1f}% of rank {top}'s {name} ({a:.4g} vs {b:.4g}) {size}."
    gap = (f"{100 * abs(a - b) / abs(b):.2f}%" if relative and b != 0 else f"{abs(a - b):.4g}")
    return f"rank {chosen}'s {name} is within {gap} of rank {top}'s ({a:.4g} vs {b:.4g}) {size}."


def format_curve_table(curve: Mapping[int, Number], name: str = "loss", higher_is_better: bool = False,
                       axis: str = "log2", tolerance: float = 0.01, title: str | None = None) -> str:
    """A plain-text table of one rank curve: rank, score, difference to the best rank, the AURAC and the advice
    of :func:`describe_rank_choice`."""
    items = _curve_items(curve)
    finite = [v for _, v in items if not math.isnan(v)]
    best = (max(finite) if higher_is_better else min(finite)) if finite else float("nan")
    width = max(4, len(str(items[-1][0])))
    lines = [title or f"Rank curve of {name} ({'higher' if higher_is_better else 'lower'} is better):",
             f"  {'rank':>{width}}  {name:>12}  {'vs best':>9}"]
    for r, v in items:
        rel = (v - best) / abs(best) * 100 if best != 0 and not math.isnan(best) else float("nan")
        lines.append(f"  {r:>{width}}  {v:>12.5g}  {rel:>+8.2f}%")
    lines.append(f"  AURAC ({axis} axis): {aurac([r for r, _ in items], [v for _, v in items], axis):.5g}")
    lines.append("  Advice: " + describe_rank_choice(curve, tolerance, True, higher_is_better, name))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plot
def plot_rank_curves(curves: Mapping[int, Number] | Sequence[Mapping[int, Number]], labels: Sequence[str] | None = None,
                     ax: Any = None, axis: str = "log2", ylabel: str = "score", title: str | None = None) -> tuple:
    """Plot one or more rank curves (score against rank), one line each, later curves in brighter colours.

    Follows torchmetrics' plotting convention: draws into ``ax`` if given, else into a new figure, and returns
    ``(figure, axes)``. The rank axis is log2 by default, ticked at the evaluated ranks. Needs matplotlib.
    """
    check_axis(axis)
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the `plots` extra
        raise ModuleNotFoundError("Plotting rank curves needs matplotlib: pip install 'lightning_matlora[plots]' "
                                  "(or pip install matplotlib).") from err
    if isinstance(curves, Mapping):
        curves = [curves]
    curves = list(curves)
    if not curves:
        raise ValueError("plot_rank_curves got no curve to plot.")
    if labels is not None and len(labels) != len(curves):
        raise ValueError(f"plot_rank_curves got {len(curves)} curves but {len(labels)} labels.")
    if ax is None:
        fig = Figure(figsize=(6.4, 4.0), layout="constrained")
        ax = fig.subplots()
    else:
        fig = ax.get_figure()
    cmap = colormaps["viridis"]
    all_ranks: set[int] = set()
    for i, curve in enumerate(curves):
        items = _curve_items(curve)
        all_ranks.update(r for r, _ in items)
        color = cmap(0.15 + 0.7 * i / max(1, len(curves) - 1)) if len(curves) > 1 else "C0"
        ax.plot([r for r, _ in items], [v for _, v in items], marker="o", color=color,
                label=labels[i] if labels is not None else None)
    if axis == "log2":
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ticks = sorted(all_ranks)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(r) for r in ticks])
    ax.set_xlabel("rank" + (" (log2 axis)" if axis == "log2" else ""))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title)
    if labels is not None:
        ax.legend(fontsize="small")
    return fig, ax
