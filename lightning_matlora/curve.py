"""Rank curves as plain numbers: AURAC, the rank to serve, the sentence and table that say so, and the plot.

A *rank curve* maps each evaluated rank k to a score (loss, accuracy, exact match …) of the adapter served at
rank k. Everything here works on plain Python mappings ``{rank: value}`` (values are floats or 0-dim tensors)
and has no Lightning or torchmetrics dependency; :class:`~lightning_matlora.RankCurveMetric` and the
``MatryoshkaLoRA`` callback build on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping, Sequence
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

    >>> round(aurac([1, 2, 4, 8, 16, 32], [40, 44, 46, 47, 48, 48]), 2)   # the method's worked example
    45.8
    >>> round(aurac([1, 2, 4, 8, 16, 32], [40, 44, 46, 47, 48, 48], axis="linear"), 2)
    47.29
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


#: two-sided normal quantile of the default 95% confidence level
Z95 = 1.959963984540054


def wilson_interval(score: float, n: int, max_score: float = 1.0, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy-like score measured on ``n`` independent examples.

    The score is a share of examples right: ``score / max_score`` in [0, 1] (``max_score`` 1 for fractions, 100 for
    percentages). Returns ``(low, high)`` in the score's own units; ``z`` = 1.96 gives a 95% interval. The Wilson
    interval (unlike ``p ± z·√(p(1−p)/n)``) stays inside [0, max_score] and is not empty at 0% or 100%.

    >>> [round(v, 4) for v in wilson_interval(0.1, 30)]
    [0.0346, 0.2562]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be the number of evaluated examples (an integer ≥ 1), got {n!r}.")
    if not max_score > 0:
        raise ValueError(f"max_score must be > 0 (1 for fractions, 100 for percentages), got {max_score!r}.")
    p = _float(score) / max_score
    if not -1e-9 <= p <= 1 + 1e-9:
        raise ValueError(f"An accuracy-like score must lie in [0, {max_score:g}] (max_score={max_score:g}), got "
                         f"{_float(score)!r}: pass max_score=100 for percentages, or no n for other metrics.")
    p = min(max(p, 0.0), 1.0)
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half) * max_score, min(1.0, centre + half) * max_score


def ranks_indistinguishable(curve: Mapping[int, Number], n: int, max_score: float = 1.0, z: float = Z95) -> bool:
    """Whether an accuracy-like curve measured on ``n`` examples cannot tell its ranks apart: the Wilson interval of
    every rank overlaps that of the best rank (no rank scores clearly below it). Then the best rank, and any rank
    chosen by a tolerance from it, is as likely the noise of a small evaluation set as a real difference."""
    items = [(r, v) for r, v in _curve_items(curve) if not math.isnan(v)]
    if len(items) < 2:
        return False
    top = max(v for _, v in items)
    low_of_top = wilson_interval(top, n, max_score, z)[0]
    return all(wilson_interval(v, n, max_score, z)[1] >= low_of_top for _, v in items)


def _check_n(n: int | None, higher_is_better: bool) -> None:
    if n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be the number of evaluated examples (an integer ≥ 1) or None, got {n!r}.")
    if not higher_is_better:
        raise ValueError("n (the evaluation set's size) applies to accuracy-like scores, a share of examples right "
                         "(higher_is_better=True); pass n=None for a loss.")


def select_rank(curve: Mapping[int, Number], tolerance: float = 0.01, relative: bool = True,
                higher_is_better: bool = True, n: int | None = None, max_score: float = 1.0) -> int:
    """The smallest rank whose score is within ``tolerance`` of the best rank's score.

    With ``n`` (the number of examples an accuracy-like score was measured on), the size of the evaluation set is
    taken into account: when the curve cannot tell its ranks apart (:func:`ranks_indistinguishable`: every rank's
    95% Wilson interval overlaps the best rank's), the answer is the largest rank — the adapter as trained —
    rather than whichever small rank the noise favoured; :func:`describe_rank_choice` says so.

    Args:
        curve: ``{rank: score}``.
        tolerance: allowed shortfall from the best score: a fraction of ``|best|`` when ``relative`` (0.01 = 1%),
            else in the score's own units.
        higher_is_better: ``True`` for accuracies, ``False`` for losses (then "within" means at most
            ``best + tolerance``).
        n: examples behind each score (accuracy-like scores only), or None to take the scores as exact.
        max_score: the score of a perfect result with ``n``: 1.0 for fractions, 100 for percentages.
    Raises:
        ValueError: on a negative tolerance, or if any score is NaN (name the ranks; a NaN rank is never chosen
            silently).

    >>> select_rank({1: 0.40, 2: 0.44, 4: 0.46, 8: 0.47, 16: 0.48, 32: 0.48}, tolerance=0.05)
    4
    >>> select_rank({1: 2.1, 4: 1.62, 16: 1.6}, tolerance=0.05, relative=False, higher_is_better=False)
    4
    >>> select_rank({1: 10.0, 16: 6.7}, n=30, max_score=100)   # 3 vs 2 of 30 examples: no evidence for rank 1
    16
    """
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
        raise ValueError(f"tolerance must be a number ≥ 0 (0.01 = within 1% of the best), got {tolerance!r}.")
    _check_n(n, higher_is_better)
    items = _curve_items(curve)
    nan = [r for r, v in items if math.isnan(v)]
    if nan:
        raise ValueError(f"The rank curve has NaN scores at ranks {nan}: fix the evaluation (or training) before "
                         f"choosing a rank.")
    if n is not None and ranks_indistinguishable(curve, n, max_score):
        return items[-1][0]
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
                         higher_is_better: bool = True, name: str = "accuracy", n: int | None = None,
                         max_score: float = 1.0) -> str:
    """One sentence of advice from :func:`select_rank`, e.g.
    "rank 8 keeps 99.2% of rank 64's accuracy (0.912 vs 0.919) at an eighth of the adapter size".

    Adapter size (parameters, memory, LoRA FLOPs) is proportional to the rank. Never raises on NaN scores: the
    sentence says which ranks are NaN instead. With ``n`` (see :func:`select_rank`) it says when the curve cannot
    tell the ranks apart on that many examples instead of advising a rank the noise favoured.

    >>> describe_rank_choice({8: .902, 16: .905, 64: .91})
    "rank 8 keeps 99.1% of rank 64's accuracy (0.902 vs 0.91) at an eighth of the adapter size."
    >>> describe_rank_choice({1: 10.0, 16: 6.7}, name="exact match", n=30, max_score=100)  # doctest: +ELLIPSIS
    "the curve cannot tell the ranks apart on 30 examples: ... rank 16 (the adapter as trained) is the safe choice."
    """
    _check_n(n, higher_is_better)
    items = _curve_items(curve)
    nan = [r for r, v in items if math.isnan(v)]
    if nan:
        return f"no rank advised: the scores at ranks {nan} are NaN."
    if n is not None and ranks_indistinguishable(curve, n, max_score):
        lo, hi = min(v for _, v in items), max(v for _, v in items)
        top = best_rank(curve, higher_is_better)
        a, b = wilson_interval(dict(items)[top], n, max_score)
        return (f"the curve cannot tell the ranks apart on {n} examples: {name} runs from {lo:.4g} to {hi:.4g} and "
                f"every rank's 95% interval overlaps the best rank's (rank {top}: {dict(items)[top]:.4g}, "
                f"{a:.3g} to {b:.3g}). No smaller rank is advised: measure on more examples or compare another "
                f"metric; rank {items[-1][0]} (the adapter as trained) is the safe choice.")
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


def format_curves_table(curves: Sequence["RankCurve"], tolerance: float = 0.01, title: str | None = None,
                        axis: str = "log2", base: Mapping[str, Number] | None = None) -> str:
    """A plain-text table of several rank curves measured together: one row per rank, one column per metric
    (↓ lower is better, ↑ higher), the AURAC of each, and one sentence of advice per metric
    (:func:`describe_rank_choice`). ``base``: the base model's scores by metric name, shown as a ``base`` row above
    the ranks (— where a metric has none)."""
    curves = list(curves)
    if not curves:
        raise ValueError("format_curves_table got no curve.")
    ranks = sorted({r for c in curves for r in c.ranks})
    width = max(4, len(str(ranks[-1])), len("AURAC"))
    heads = [f"{c.metric} {'↑' if c.higher_is_better else '↓'}" for c in curves]
    cols = [max(12, len(h)) for h in heads]

    def cell(v: float | None, w: int) -> str:
        return f"{'—':>{w}}" if v is None else f"{v:>{w}.5g}"

    lines = [title or "Rank curves (↓ lower is better, ↑ higher is better):",
             f"  {'rank':>{width}}  " + "  ".join(f"{h:>{w}}" for h, w in zip(heads, cols))]
    if base:
        lines.append(f"  {'base':>{width}}  " + "  ".join(
            cell(_float(base[c.metric]) if c.metric in base else None, w) for c, w in zip(curves, cols)))
    for r in ranks:
        lines.append(f"  {r:>{width}}  " + "  ".join(
            cell(c.score_at(r) if r in c.ranks else None, w) for c, w in zip(curves, cols)))
    lines.append(f"  {'AURAC':>{width}}  " + "  ".join(cell(c.aurac(axis), w) for c, w in zip(curves, cols))
                 + f"   ({axis} axis)")
    for c in curves:
        lines.append(f"  Advice ({c.metric}): " + c.describe(tolerance))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plot
def plot_rank_curves(curves: Mapping[int, Number] | Sequence[Mapping[int, Number]], labels: Sequence[str] | None = None,
                     ax: Any = None, axis: str = "log2", ylabel: str = "score", title: str | None = None,
                     base: Number | None = None) -> tuple:
    """Plot one or more rank curves (score against rank), one line each, later curves in brighter colours.

    Follows torchmetrics' plotting convention: draws into ``ax`` if given, else into a new figure, and returns
    ``(figure, axes)``. The rank axis is log2 by default, ticked at the evaluated ranks. ``base``: the base model's
    score, drawn as a dashed horizontal line labelled "base model". Needs matplotlib (no
    window opens: the figure is a ``matplotlib.figure.Figure``; save it with ``fig.savefig(path)``).

    >>> fig, ax = plot_rank_curves([{1: 0.40, 4: 0.46, 16: 0.48}, {1: 0.42, 4: 0.47, 16: 0.49}],
    ...                            labels=["epoch 1", "epoch 2"], ylabel="accuracy")
    >>> len(ax.get_lines()), ax.get_ylabel()
    (2, 'accuracy')
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
    if base is not None:
        ax.axhline(_float(base), ls="--", color="grey", label="base model")
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
    if labels is not None or base is not None:
        ax.legend(fontsize="small")
    return fig, ax



@contextlib.contextmanager
def panel_figure(path: str | os.PathLike, titles: Sequence[str], *, xlabel: str, ylabel: str, suptitle: str,
                 legend_fontsize: float = 8, figsize: tuple[float, float] = (11, 4.2), dpi: int = 110) -> Iterator[Any]:
    """A row of panels, one per title, that the ``with`` block draws into; then each panel is labelled alike
    (its title, ``xlabel``, ``ylabel``, a light grid, a legend) and the figure is saved to ``path`` (PNG at
    ``dpi``). Nothing is saved when the block raises. Needs matplotlib; no window opens.

    >>> import tempfile
    >>> with panel_figure(tempfile.mkdtemp() + "/p.png", ["r = 1", "r = 16"], xlabel="steps", ylabel="accuracy",
    ...                   suptitle="accuracy against steps") as axes:
    ...     for ax in axes:
    ...         _ = ax.plot([1, 2], [0.4, 0.5], label="rowwise")
    >>> [ax.get_title() for ax in axes]
    ['r = 1', 'r = 16']
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    axes = list(fig.subplots(1, len(titles), squeeze=False)[0])
    yield axes
    for ax, title in zip(axes, titles):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=legend_fontsize)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)

# ------------------------------------------------------------------------------------------------ log keys
def log_key(metric: str, rank: int, ranks: Sequence[int] | None = None, prefix: str = "val") -> str:
    """The logged name of ``metric`` at ``rank``: ``val/acc@r8``, ``val/acc@r16`` — the rank in plain decimal, never
    padded, so a key does not depend on r_max or on the other ranks (``ranks`` is accepted and ignored, for
    callers that pass the curve's ranks). The one home of this naming."""
    return f"{prefix}/{metric}@r{int(rank)}"


def aurac_key(metric: str, prefix: str = "val") -> str:
    """The logged name of a curve's AURAC: ``val/aurac_acc``."""
    return f"{prefix}/aurac_{metric}"


# ------------------------------------------------------------------------------------------- the value type
@dataclasses.dataclass(frozen=True)
class RankCurve:
    """One rank curve: the score of an adapter served at each evaluated rank.

    The one value type for a rank curve: :class:`~lightning_matlora.RankCurveMetric` computes it, the callback keeps
    one per metric and epoch, a saved adapter records it (:meth:`to_json`/:meth:`from_json`), and ``matlora info``
    prints it.

    Attributes:
        ranks: the evaluated ranks, ascending, distinct, each ≥ 1.
        scores: one score per rank, in the metric's units (NaN marks a rank whose score diverged).
        metric: the metric's name as logged, e.g. ``"loss"`` or ``"acc"`` (no ``val/`` prefix).
        higher_is_better: ``True`` for accuracies, ``False`` for losses.

    Example:
        >>> c = RankCurve((1, 2, 4, 8, 16, 32), (40, 44, 46, 47, 48, 48), metric="acc")
        >>> round(c.aurac(), 2), round(c.aurac("linear"), 2)
        (45.8, 47.29)
        >>> c.select_rank(tolerance=0.05)
        4
        >>> c.as_log_dict("val")["val/acc@r8"]
        47.0
    """

    ranks: tuple[int, ...]
    scores: tuple[float, ...]
    metric: str = "score"
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        ranks = check_curve_ranks(list(self.ranks))
        if isinstance(self.scores, torch.Tensor):
            scores = [float(v) for v in self.scores.detach().double().cpu().flatten()]
        else:
            scores = [float("nan") if v is None else _float(v) for v in self.scores]
        if len(scores) != len(ranks):
            raise ValueError(f"A rank curve needs one score per rank: got {len(ranks)} ranks and {len(scores)} "
                             f"scores.")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"metric must be a non-empty name such as 'loss' or 'acc', got {self.metric!r}.")
        if not isinstance(self.higher_is_better, bool):
            raise ValueError(f"higher_is_better must be True or False, got {self.higher_is_better!r}.")
        order = sorted(range(len(ranks)), key=ranks.__getitem__)
        object.__setattr__(self, "ranks", tuple(ranks[i] for i in order))
        object.__setattr__(self, "scores", tuple(scores[i] for i in order))

    @classmethod
    def from_mapping(cls, curve: Mapping[int, Number], metric: str = "score",
                     higher_is_better: bool = True) -> "RankCurve":
        """A curve from ``{rank: score}``."""
        items = _curve_items(curve)
        return cls(tuple(r for r, _ in items), tuple(v for _, v in items), metric, higher_is_better)

    def as_mapping(self) -> dict[int, float]:
        """``{rank: score}``, ranks ascending."""
        return dict(zip(self.ranks, self.scores))

    def score_at(self, rank: int) -> float:
        """The score at an evaluated ``rank`` (``KeyError`` naming the evaluated ranks otherwise)."""
        if rank not in self.ranks:
            raise KeyError(f"rank {rank} was not evaluated; the curve has ranks {list(self.ranks)}.")
        return self.scores[self.ranks.index(rank)]

    # ------------------------------------------------------------------------------------------- summaries
    def aurac(self, axis: str = "log2") -> float:
        """Area under the curve over the span of the rank axis (see :func:`aurac`); NaN if any score is NaN."""
        return aurac(self.ranks, self.scores, axis)

    def select_rank(self, tolerance: float | None = 0.01, relative: bool = True, budget: int | None = None) -> int:
        """The rank to serve.

        ``tolerance``: the smallest rank whose score is within ``tolerance`` of the best (see :func:`select_rank`).
        ``budget``: the best-scoring evaluated rank ≤ ``budget`` (the smallest on ties); with both, the smallest
        rank ≤ ``budget`` within ``tolerance`` of the best rank ≤ ``budget``.
        """
        curve = self.as_mapping()
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(f"budget must be a rank ≥ 1 (the largest rank you can serve), got {budget!r}.")
            curve = {r: v for r, v in curve.items() if r <= budget}
            if not curve:
                raise ValueError(f"No evaluated rank is ≤ budget={budget}; the curve has ranks {list(self.ranks)}.")
            if tolerance is None:
                return best_rank(curve, self.higher_is_better)
        return select_rank(curve, 0.0 if tolerance is None else tolerance, relative, self.higher_is_better)

    def describe(self, tolerance: float = 0.01) -> str:
        """One sentence of advice (see :func:`describe_rank_choice`)."""
        return describe_rank_choice(self.as_mapping(), tolerance, True, self.higher_is_better, self.metric)

    def table(self, tolerance: float = 0.01, title: str | None = None, axis: str = "log2") -> str:
        """The plain-text table of :func:`format_curve_table`."""
        return format_curve_table(self.as_mapping(), self.metric, self.higher_is_better, axis, tolerance, title)

    def log_key(self, rank: int, prefix: str = "val") -> str:
        """``val/acc@r8``: the rank in plain decimal (see :func:`log_key`)."""
        return log_key(self.metric, rank, self.ranks, prefix)

    def aurac_key(self, prefix: str = "val") -> str:
        """``val/aurac_acc``."""
        return aurac_key(self.metric, prefix)

    def as_log_dict(self, prefix: str = "val", axis: str = "log2") -> dict[str, float]:
        """``{"val/acc@r1": …, …, "val/aurac_acc": …}``: what the callback logs each validation epoch."""
        out = {self.log_key(r, prefix): v for r, v in zip(self.ranks, self.scores)}
        out[self.aurac_key(prefix)] = self.aurac(axis)
        return out

    def plot(self, ax: Any = None, axis: str = "log2", label: str | None = None) -> tuple:
        """Draw the curve (see :func:`plot_rank_curves`); returns ``(figure, axes)``."""
        return plot_rank_curves([self.as_mapping()], labels=[label] if label else None, ax=ax, axis=axis,
                                ylabel=self.metric)

    # ------------------------------------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        """``{"metric", "higher_is_better", "ranks", "scores"}``; a NaN score is written as ``null``."""
        return {"metric": self.metric, "higher_is_better": self.higher_is_better, "ranks": list(self.ranks),
                "scores": [v if math.isfinite(v) else None for v in self.scores]}

    @classmethod
    def from_json(cls, data: Any) -> "RankCurve":
        """Read :meth:`to_json`'s form strictly: every field required, no other field, types checked.

        Raises ``ValueError`` naming the field that is missing, extra or of the wrong type.
        """
        fields = ("metric", "higher_is_better", "ranks", "scores")
        if not isinstance(data, Mapping):
            raise ValueError(f"a rank curve must be an object with fields {list(fields)}, got {type(data).__name__}.")
        missing = [f for f in fields if f not in data]
        extra = sorted(set(data) - set(fields))
        if missing or extra:
            raise ValueError(f"a rank curve needs exactly the fields {list(fields)}"
                             + (f"; missing {missing}" if missing else "") + (f"; unknown {extra}" if extra else "")
                             + ".")
        if not isinstance(data["metric"], str):
            raise ValueError(f"rank curve field 'metric' must be a string, got {data['metric']!r}.")
        if not isinstance(data["higher_is_better"], bool):
            raise ValueError(f"rank curve field 'higher_is_better' must be true or false, got "
                             f"{data['higher_is_better']!r}.")
        if not isinstance(data["ranks"], list) or not all(
                isinstance(r, int) and not isinstance(r, bool) for r in data["ranks"]):
            raise ValueError(f"rank curve field 'ranks' must be a list of integers, got {data['ranks']!r}.")
        if not isinstance(data["scores"], list) or not all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in data["scores"]):
            raise ValueError(f"rank curve field 'scores' must be a list of numbers (null for a diverged rank), got "
                             f"{data['scores']!r}.")
        return cls(tuple(data["ranks"]), tuple(data["scores"]), data["metric"], data["higher_is_better"])
