"""`RankCurveMetric`: any torchmetrics metric, measured at every eval rank, summarised by AURAC."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.wrappers.abstract import WrapperMetric

from .curve import aurac, check_axis, check_curve_ranks, plot_rank_curves, select_rank


class WeightedMean(Metric):
    """Weighted mean of a stream of values that keeps NaN (a NaN value makes the mean NaN; it is never dropped).

    torchmetrics' ``MeanMetric`` either drops NaN values (its default) or, with ``nan_strategy="disable"``,
    ignores the weights (torchmetrics 1.9.0); a rank curve needs neither. States are sums, reduced by summing
    across processes.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, value: float | torch.Tensor, weight: float | torch.Tensor = 1.0) -> None:
        """Add ``value`` (a number or a tensor, every element counted) with ``weight`` (broadcast to it)."""
        value = torch.as_tensor(value, dtype=torch.float64, device=self.total.device).detach()
        weight = torch.broadcast_to(torch.as_tensor(weight, dtype=torch.float64, device=self.total.device),
                                    value.shape)
        self.total += (value * weight).sum()
        self.weight += weight.sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.weight).float()


class RankCurveMetric(WrapperMetric):
    """One copy of a base metric per rank; ``compute()`` gives the rank curve and its AURAC.

    Each rank's copy is an ordinary torchmetrics metric, so its states reduce across processes exactly as the
    base metric's do (``compute()`` must be called on every process, as for any torchmetrics metric).

    Example (accuracy of a classifier at every eval rank)::

        curve = RankCurveMetric(MulticlassAccuracy(num_classes=10), ranks=[1, 2, 4, 8])
        for k in curve.ranks:
            with at_rank(model, k):
                curve.update(k, model(x).argmax(-1), y)
        curve.compute()   # {"curve": {1: tensor(0.61), 2: …, 8: tensor(0.83)}, "aurac": tensor(0.74)}

    Args:
        metric: the base metric (cloned once per rank; never updated itself). Default: a :class:`WeightedMean`
            for losses, so ``update(rank, loss, weight)`` averages (weight e.g. the batch size) and a NaN loss gives
            a NaN point (it is never dropped).
        ranks: the ranks to track (distinct integers ≥ 1).
        higher_is_better: direction of the score, for :meth:`select_rank`; default the base metric's own
            ``higher_is_better``, or ``False`` for the default mean (a loss).
        axis: rank axis of the AURAC: ``"log2"`` (default) or ``"linear"``.

    >>> import torch
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> curve = RankCurveMetric(MulticlassAccuracy(num_classes=3), ranks=[1, 2, 4])
    >>> target = torch.tensor([0, 1, 2, 1])
    >>> for k, pred in ((1, [0, 0, 0, 1]), (2, [0, 1, 0, 1]), (4, [0, 1, 2, 1])):
    ...     curve.update(k, torch.tensor(pred), target)
    >>> sorted(curve.compute())
    ['aurac', 'curve']
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, metric: Metric | None = None, ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                 higher_is_better: bool | None = None, axis: str = "log2", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if metric is not None and not isinstance(metric, Metric):
            raise TypeError(f"metric must be a torchmetrics Metric (e.g. MulticlassAccuracy(num_classes=...)), got "
                            f"{type(metric).__name__}.")
        self.ranks: list[int] = sorted(check_curve_ranks(list(ranks)))
        self.axis = check_axis(axis)
        base = metric if metric is not None else WeightedMean()
        if higher_is_better is None:
            higher_is_better = False if metric is None else getattr(metric, "higher_is_better", None)
        self._higher_is_better = higher_is_better
        self.metrics = nn.ModuleDict({self._key(r): base.clone() for r in self.ranks})

    @property
    def higher_is_better(self) -> bool | None:  # type: ignore[override]
        """Direction of the score (from the constructor or the base metric; ``None`` if unknown)."""
        return self._higher_is_better

    @staticmethod
    def _key(rank: int) -> str:
        return f"r{rank}"

    def _metric(self, rank: int | torch.Tensor) -> Metric:
        if isinstance(rank, torch.Tensor) and rank.numel() == 1:
            rank = int(rank)
        key = self._key(rank) if isinstance(rank, int) and not isinstance(rank, bool) else None
        if key is None or key not in self.metrics:
            raise ValueError(f"RankCurveMetric was built for ranks {self.ranks} and got update for rank {rank!r}: "
                             f"update only those ranks, or build it with ranks=[...] including {rank!r}.")
        return self.metrics[key]

    def metric_at(self, rank: int) -> Metric:
        """The base-metric copy of ``rank``."""
        return self._metric(rank)

    # ------------------------------------------------------------------------------------------ torchmetrics
    def update(self, rank: int, *args: Any, **kwargs: Any) -> None:
        """Update the copy of ``rank`` with the base metric's ``update`` arguments (for the default mean:
        ``value`` and an optional ``weight``, e.g. the batch size)."""
        self._metric(rank).update(*args, **kwargs)

    def forward(self, rank: int, *args: Any, **kwargs: Any) -> Any:
        """Update the copy of ``rank`` and return its value on this batch (torchmetrics' ``forward``)."""
        return self._metric(rank)(*args, **kwargs)

    def compute(self) -> dict[str, Any]:
        """``{"curve": {rank: value}, "aurac": value}``; the AURAC is NaN if any rank's value is NaN.

        A rank that received no update warns (torchmetrics) and its value follows the base metric's empty result.
        """
        curve = {r: self.metrics[self._key(r)].compute() for r in self.ranks}
        values = list(curve.values())
        if all(isinstance(v, torch.Tensor) for v in values):
            stacked = torch.stack([v.detach().to(torch.float64).cpu() for v in values])
            area = aurac(self.ranks, stacked, self.axis)
            device = values[0].device
            area = torch.as_tensor(area, dtype=torch.float64).to(device=device, dtype=values[0].dtype
                                                                  if values[0].is_floating_point() else torch.float32)
        else:
            area = torch.tensor(aurac(self.ranks, values, self.axis))
        return {"curve": curve, "aurac": area}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        super().reset()

    # --------------------------------------------------------------------------------------------------- help
    def select_rank(self, tolerance: float = 0.01, relative: bool = True, value: dict | None = None) -> int:
        """:func:`~lightning_matlora.select_rank` on the computed curve (or on ``value``, a result of ``compute``)."""
        if self.higher_is_better is None:
            raise ValueError("The base metric does not say whether higher is better: build RankCurveMetric with "
                             "higher_is_better=True (accuracy-like) or False (loss-like).")
        value = value if value is not None else self.compute()
        return select_rank(value["curve"], tolerance, relative, self.higher_is_better)

    def plot(self, val: dict | Sequence[dict] | None = None, ax: Any = None) -> tuple:
        """Plot the rank curve (torchmetrics' convention: ``val`` is a result of ``compute()`` or a list of them,
        one line each, e.g. one per epoch; ``None`` computes now). Returns ``(figure, axes)``."""
        val = val if val is not None else self.compute()
        vals = [val] if isinstance(val, dict) else list(val)
        curves = [v["curve"] if "curve" in v else v for v in vals]
        labels = [f"{i}: AURAC {float(v['aurac']):.4g}" for i, v in enumerate(vals)] if len(vals) > 1 and all(
            "aurac" in v for v in vals) else None
        name = type(next(iter(self.metrics.values()))).__name__
        return plot_rank_curves(curves, labels=labels, ax=ax, axis=self.axis, ylabel=name)
