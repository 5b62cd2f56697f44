"""`RankCurveMetric`: any torchmetrics metric, measured at every eval rank, summarised by AURAC."""

from __future__ import annotations

from collections.abc import Sequence
import re
from typing import Any, Protocol

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.wrappers.abstract import WrapperMetric

from .curve import RankCurve, check_axis, check_curve_ranks, plot_rank_curves


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


class RankSource(Protocol):
    """What a :class:`RankCurveMetric` asks of the code that runs the ranks (the MatryoshkaLoRA callback's per-rank
    validation, :class:`~lightning_matlora.rank_validation.RankCurveValidation`): the rank an update without a rank
    counts for now."""

    def active_rank(self, name: str) -> int | None:
        """The rank that an update of the metric named ``name`` counts for now; ``None``: not counted (Lightning's
        own call of the step). Raises where such an update is an error, saying why."""
        ...


class RankCurveMetric(WrapperMetric):
    """Any torchmetrics metric, measured at every eval rank: ``compute()`` returns a :class:`RankCurve`.

    It keeps one copy of the base metric per rank (ordinary torchmetrics metrics, so their states reduce across
    processes exactly as the base metric's do; ``compute()`` must run on every process, as for any metric).

    **With the MatryoshkaLoRA callback** (the usual way) put it on your LightningModule and update it in
    ``validation_step`` with the base metric's arguments only: the callback finds it (any attribute, also inside
    an ``nn.ModuleDict``), runs ``validation_step`` once per eval rank with the model set to that rank, and each
    update goes to the copy of the rank that is active. Every validation epoch the callback computes it, logs
    ``val/<name>@r<k>`` and ``val/aurac_<name>``, plots it and resets it::

        self.acc = RankCurveMetric(MulticlassAccuracy(num_classes=10))   # ranks: the callback's eval ranks
        ...
        def validation_step(self, batch, i):
            x, y = batch
            self.acc.update(self(x).argmax(-1), y)

    Updates made in Lightning's own call of ``validation_step`` (the training forward, before the callback's
    per-rank calls) are not counted (:attr:`active_rank` is ``None`` then: test it to skip expensive work such as
    generation). An update outside validation (or test), or without a callback evaluating ranks, is an error.

    **Driving the ranks yourself**: give the rank first, ``update(k, preds, target)`` (a Python ``int`` first
    argument is always read as the rank), and build it with ``ranks=[...]``.

    Args:
        metric: the base metric (cloned once per rank; never updated itself). Default: a :class:`WeightedMean`
            for losses: ``update(loss, weight)`` averages (weight e.g. the batch size) and a NaN loss gives a NaN
            point (it is never dropped).
        ranks: the ranks to track (distinct integers ≥ 1). Default ``None``: the callback's eval ranks (set when
            the callback finds the metric). With the callback, explicit ranks must be among its eval ranks; the
            metric then counts only those ranks' passes.
        name: the metric's name in log keys (``val/<name>@r8``) and tables; default the attribute name under which
            the callback finds it (``self.acc`` → ``"acc"``), else ``"loss"`` for the default mean, else the base
            metric's class name.
        higher_is_better: direction of the score; default the base metric's own ``higher_is_better``, or ``False``
            for the default mean (a loss). Must be known (a curve's rank advice depends on it).
        axis: rank axis of the AURAC: ``"log2"`` (default) or ``"linear"``.

    >>> import torch
    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> curve = RankCurveMetric(MulticlassAccuracy(num_classes=3), ranks=[1, 2, 4])
    >>> target = torch.tensor([0, 1, 2, 1])
    >>> for k, pred in ((1, [0, 0, 0, 1]), (2, [0, 1, 0, 1]), (4, [0, 1, 2, 1])):
    ...     curve.update(k, torch.tensor(pred), target)
    >>> result = curve.compute()   # a RankCurve
    >>> result.ranks, round(result.aurac(), 4)
    ((1, 2, 4), 0.7083)
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, metric: Metric | None = None, ranks: Sequence[int] | None = None, name: str | None = None,
                 higher_is_better: bool | None = None, axis: str = "log2", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if metric is not None and not isinstance(metric, Metric):
            raise TypeError(f"metric must be a torchmetrics Metric (e.g. MulticlassAccuracy(num_classes=...)), got "
                            f"{type(metric).__name__}.")
        self.axis = check_axis(axis)
        self.name = check_metric_name(name) if name is not None else None
        # the template of the per-rank copies, kept out of the module tree (never updated, never moved)
        object.__setattr__(self, "_base", metric if metric is not None else WeightedMean())
        self._default_name = "loss" if metric is None else type(metric).__name__
        if higher_is_better is None:
            higher_is_better = False if metric is None else getattr(metric, "higher_is_better", None)
        if not isinstance(higher_is_better, bool):
            raise ValueError(f"{type(self._base).__name__} does not say whether higher is better: build "
                             f"RankCurveMetric(..., higher_is_better=True) for accuracy-like scores or False for "
                             f"loss-like ones.")
        self._higher_is_better = higher_is_better
        self.ranks: list[int] | None = None
        self.metrics = nn.ModuleDict()
        #: the attribute name under which a callback found this metric (its default ``name``), or None
        self.found_as: str | None = None
        self._source: RankSource | None = None  # see follow()
        if ranks is not None:
            self.use_ranks(ranks)

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """Direction of the score (from the constructor or the base metric)."""
        return self._higher_is_better

    @property
    def curve_name(self) -> str:
        """The name used in log keys and tables (see ``name``)."""
        return self.name or self.found_as or self._default_name

    def use_ranks(self, ranks: Sequence[int]) -> None:
        """Track ``ranks`` (distinct integers ≥ 1): one fresh copy of the base metric per rank. The callback calls
        it with its eval ranks for a metric built without ``ranks``."""
        self.ranks = sorted(check_curve_ranks(list(ranks)))
        self.metrics = nn.ModuleDict({self._key(r): self._base.clone() for r in self.ranks})

    @staticmethod
    def _key(rank: int) -> str:
        return f"r{rank}"

    def _need_ranks(self) -> list[int]:
        if self.ranks is None:
            raise ValueError("This RankCurveMetric has no ranks yet: build it with ranks=[...] to drive the ranks "
                             "yourself, or put it on a LightningModule trained with the MatryoshkaLoRA callback (its "
                             "eval ranks are used).")
        return self.ranks

    def _metric(self, rank: Any) -> Metric:
        ranks = self._need_ranks()
        key = self._key(rank) if _is_rank(rank) else None
        if key is None or key not in self.metrics:
            raise ValueError(f"RankCurveMetric was built for ranks {ranks} and got update for rank {rank!r}: "
                             f"update only those ranks, or build it with ranks=[...] including {rank!r}.")
        return self.metrics[key]

    def metric_at(self, rank: int) -> Metric:
        """The base-metric copy of ``rank``."""
        return self._metric(rank)

    # ------------------------------------------------------------------------------------------------ routing
    def follow(self, source: RankSource | None) -> None:
        """Count updates without a rank for the rank ``source`` says is active (``None``: no source; such an update
        is then an error). The MatryoshkaLoRA callback's per-rank validation makes itself the source of every
        RankCurveMetric it finds on the module."""
        self._source = source

    @property
    def source(self) -> RankSource | None:
        """The code that runs the ranks for this metric (see :meth:`follow`), or None."""
        return self._source

    @property
    def active_rank(self) -> int | None:
        """The rank an update without a rank would be counted for now, or ``None`` when it would not be counted
        (Lightning's own call of ``validation_step``, or a pass at a rank this metric does not track). Raises
        where such an update is an error (see :meth:`update`)."""
        if self._source is None:
            raise RuntimeError(
                f"RankCurveMetric {self.curve_name!r} got an update without a rank, and no MatryoshkaLoRA callback is "
                f"evaluating ranks for it. Either train with MatryoshkaLoRA(...) in the Trainer's callbacks (with "
                f"rank_eval on, the default): it finds the metric on your LightningModule and runs validation_step "
                f"at every eval rank; or drive the ranks yourself and pass the rank first: update(k, ...).")
        rank = self._source.active_rank(self.curve_name)
        if rank is not None and rank not in self._need_ranks():
            return None  # a pass at a rank this metric does not track
        return rank

    def _route(self, args: tuple) -> tuple[Metric | None, tuple]:
        if args and _is_rank(args[0]):
            return self._metric(int(args[0])), args[1:]
        rank = self.active_rank
        return (self._metric(rank) if rank is not None else None), args

    # ------------------------------------------------------------------------------------------ torchmetrics
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Update the copy of the active rank with the base metric's ``update`` arguments (for the default mean:
        ``value`` and an optional ``weight``, e.g. the batch size); ``update(k, ...)`` updates rank k's copy.

        Without a rank the update must happen inside ``validation_step`` (or ``test_step``) while the
        MatryoshkaLoRA callback evaluates ranks; elsewhere it raises ``RuntimeError`` saying why."""
        metric, args = self._route(args)
        if metric is not None:
            metric.update(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Update as :meth:`update` and return the value on this batch (torchmetrics' ``forward``); ``None`` when
        the update is not counted."""
        metric, args = self._route(args)
        return metric(*args, **kwargs) if metric is not None else None

    def compute(self) -> RankCurve:
        """The rank curve: one score per rank (a NaN score marks a rank whose value is NaN).

        A rank that received no update warns (torchmetrics) and its value follows the base metric's empty result.
        """
        ranks = self._need_ranks()
        scores = []
        for r in ranks:
            v = self.metrics[self._key(r)].compute()
            if isinstance(v, torch.Tensor) and v.numel() != 1:
                raise ValueError(f"RankCurveMetric {self.curve_name!r}: the base metric gave a tensor of shape "
                                 f"{tuple(v.shape)} at rank {r}; a rank curve needs one number per rank (e.g. "
                                 f"average='macro' instead of None).")
            scores.append(float(v.detach().double().cpu()) if isinstance(v, torch.Tensor) else float(v))
        return RankCurve(tuple(ranks), tuple(scores), self.curve_name, self.higher_is_better)

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()
        super().reset()

    # --------------------------------------------------------------------------------------------------- help
    def select_rank(self, tolerance: float = 0.01, relative: bool = True) -> int:
        """:meth:`RankCurve.select_rank` on the computed curve."""
        return self.compute().select_rank(tolerance, relative)

    def plot(self, val: RankCurve | Sequence[RankCurve] | None = None, ax: Any = None) -> tuple:
        """Plot the rank curve (torchmetrics' convention: ``val`` is a result of ``compute()`` or a list of them,
        one line each, e.g. one per epoch; ``None`` computes now). Returns ``(figure, axes)``."""
        val = val if val is not None else self.compute()
        vals = [val] if isinstance(val, RankCurve) else list(val)
        labels = [f"{i}: AURAC {v.aurac(self.axis):.4g}" for i, v in enumerate(vals)] if len(vals) > 1 else None
        return plot_rank_curves([v.as_mapping() for v in vals], labels=labels, ax=ax, axis=self.axis,
                                ylabel=vals[0].metric)


def _is_rank(value: Any) -> bool:
    """A Python (or NumPy) integer: the explicit rank of ``update(k, ...)``. Tensors are never read as ranks."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        return False
    if isinstance(value, int):
        return True
    return type(value).__module__ == "numpy" and hasattr(value, "__index__")


def check_metric_name(name: Any) -> str:
    """A metric name usable in log keys: letters, digits, ``_``, ``-`` and ``.``."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise ValueError(f"A RankCurveMetric name is used in log keys such as 'val/<name>@r8' and must be letters, "
                         f"digits, '_', '-' or '.', got {name!r}.")
    return name
