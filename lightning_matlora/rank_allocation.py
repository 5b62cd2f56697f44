"""``allocate_ranks``: a rank per layer within a parameter budget, chosen from measured truncation effects.

The search (cost: 1 + G·(C − 1) + 2 evaluations of the metric on the data, for G groups and C candidate ranks):

1. **Sensitivity.** Layers are grouped (default: by module type, the last part of the name, e.g. every
   ``q_proj``). For each group g and candidate rank c (the train ranks; 0, the group without its adapter, when
   the candidates include it), the metric is measured with g cut to c
   and every other layer at r_max: Δ(g, c) = L(g at c) − L(all at r_max).
2. **Allocation.** Assuming the effects add up, L ≈ L(all at r_max) + Σ_g Δ(g, c_g). Every group starts at the
   smallest candidate; then, while the budget allows, the upgrade (g: c → c') with the largest decrease of the
   predicted loss per added parameter is taken (any larger candidate, so a flat stretch of the curve is skipped).
3. **Final check.** The allocation and the best uniform rank within the budget are both measured; the better one
   on the metric is returned (so the interaction between groups, which step 2 ignores, can only cost the
   difference to the uniform rank, never more).

The result never holds more adapter parameters (Σ k·(in + out) over the layers) than the budget.

Step 1 does not depend on the budget: :func:`measure_sensitivities` runs it once, and ``allocate_ranks(...,
sensitivities=...)`` / ``plan_allocation(..., sensitivities=...)`` reuse it, so that a plan for each of several
budgets (a quality-against-size curve) costs the 1–2 evaluations of step 3 each.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .adapted_model import at_rank, model_state_of
from .layer_ranks import group_key, layer_parameters

Metric = Callable[[nn.Module, Any], "float | torch.Tensor"]


def default_metric(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss a model returns for ``batch``: ``model(**batch).loss`` for a mapping (a transformers model given
    ``labels``), else ``model(batch)`` itself when it is a 0-d tensor, else its ``.loss``."""
    out = model(**batch) if isinstance(batch, Mapping) else model(batch)
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ValueError("allocate_ranks measures the loss by default: give batches for which the model returns a "
                         "loss (a mapping with labels for a transformers model), or pass metric=f(model, batch) "
                         "returning a number where lower is better.")
    return loss


def budget_parameters(budget: int | str, dims: Mapping[str, tuple[int, int]], r_max: int) -> int:
    """A budget as a parameter count: an int, or ``"rank:k"`` (the size of the adapter at rank k everywhere).
    Raises ``ValueError`` naming the fix when it is below rank 1 everywhere or above r_max everywhere."""
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*rank\s*:\s*(\d+)\s*", budget)
        if m is None:
            if budget.strip().isdigit():
                budget = int(budget)
            else:
                raise ValueError(f"budget must be a parameter count or 'rank:k' (the size of rank k everywhere), "
                                 f"got {budget!r}.")
        else:
            k = int(m.group(1))
            if not 1 <= k <= r_max:
                raise ValueError(f"budget 'rank:{k}' is outside rank:1…rank:{r_max} (r_max={r_max}).")
            budget = layer_parameters(dims, k)
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise ValueError(f"budget must be a parameter count or 'rank:k', got {budget!r}.")
    lo, hi = layer_parameters(dims, 1), layer_parameters(dims, r_max)
    if budget < lo:
        raise ValueError(f"budget {budget:,} parameters is below the adapter at rank 1 everywhere ({lo:,}): every "
                         f"layer keeps at least rank 1; give a budget of at least {lo:,} (or 'rank:1').")
    if budget > hi:
        raise ValueError(f"budget {budget:,} parameters is above the adapter at r_max={r_max} everywhere ({hi:,}): "
                         f"nothing to allocate; serve the full adapter, or give a budget of at most {hi:,}.")
    return budget


@dataclasses.dataclass
class Sensitivities:
    """What :func:`measure_sensitivities` measured: step 1 of the search, the same for every budget.

    metric_full: the metric at r_max everywhere.
    delta: group → {candidate rank: metric increase with that group cut to it, the others at r_max} (0 at r_max).
    groups: group → its layer names. candidates: the candidate ranks, ascending (r_max last). r_max: the adapter's.
    evaluations: how many times the metric was averaged over the data (1 + G·(C − 1)).
    """

    metric_full: float
    delta: dict[str, dict[int, float]]
    groups: dict[str, list[str]]
    candidates: list[int]
    r_max: int
    evaluations: int


@dataclasses.dataclass
class Allocation:
    """What :func:`plan_allocation` measured and chose.

    ranks: the answer (a rank per layer: the greedy plan or the uniform rank, whichever measured better).
    greedy: the greedy plan by the additive prediction, before the final check.
    uniform_rank: the largest uniform rank within the budget.
    metric_full, metric_greedy, metric_uniform: the metric at r_max everywhere, for ``greedy`` and at
        ``uniform_rank`` (``metric_greedy`` is None when the greedy plan was the uniform one).
    sensitivity: group → {candidate rank: metric increase with that group cut to it, the others at r_max}.
    groups: group → its layer names. budget, parameters: the budget and the answer's size (parameters).
    evaluations: how many times the metric was averaged over the data by this call (with ``sensitivities=``
        given, only the final check's 1–2).
    """

    ranks: dict[str, int]
    greedy: dict[str, int]
    uniform_rank: int
    metric_full: float
    metric_greedy: float | None
    metric_uniform: float
    sensitivity: dict[str, dict[int, float]]
    groups: dict[str, list[str]]
    budget: int
    parameters: int
    evaluations: int

    def predicted_greedy(self) -> float:
        """The metric the additive model predicts for ``greedy``: metric_full + Σ_g Δ(g, the greedy rank of g)."""
        return self.metric_full + sum(self.sensitivity[g][self.greedy[names[0]]] for g, names in self.groups.items())

    def record(self, digits: int = 4) -> dict[str, Any]:
        """A JSON-able summary (numbers rounded to ``digits``): the greedy rank per group, the metric at r_max,
        at the uniform rank, for the greedy plan as measured (None when it was the uniform rank) and as predicted,
        and the sensitivities (group → {rank as a string: Δ})."""
        return {"greedy_by_group": {g: self.greedy[names[0]] for g, names in sorted(self.groups.items())},
                "metric": {"full": round(self.metric_full, digits), "uniform": round(self.metric_uniform, digits),
                           "greedy": None if self.metric_greedy is None else round(self.metric_greedy, digits),
                           "predicted_greedy": round(self.predicted_greedy(), digits)},
                "sensitivity": {g: {str(c): round(v, digits) for c, v in sorted(d.items())}
                                for g, d in sorted(self.sensitivity.items())}}


def allocate_ranks(model: nn.Module, budget: int | str, data: Iterable[Any] | None = None,
                   metric: Metric | None = None, *, candidates: Iterable[int] | None = None,
                   group: str | Callable[[str], str] = "type", sensitivities: Sensitivities | None = None,
                   ) -> dict[str, int]:
    """A rank per adapted layer of ``model`` whose adapter fits ``budget``, chosen on ``data`` (see the module
    docstring for the search; :func:`plan_allocation` returns what it measured as well).

    Args:
        model: an adapted model (not merged). Its rank setting is restored after.
        budget: adapter parameters (Σ k·(in + out) over the layers), or ``"rank:k"``: the size of rank k everywhere.
        data: the batches to measure on (iterated once per evaluation: a list or a DataLoader).
        metric: ``metric(model, batch)`` → a number, lower is better, averaged over the batches; default: the
            model's loss (:func:`default_metric`). For an accuracy, return its negative.
        candidates: the ranks a layer may take (default: the train ranks), each in 0…r_max. 0 lets a group drop
            its adapter (its layers then run as the base layers), so that even the budget of rank 1 everywhere can
            be spent unevenly; without 0 every group keeps at least rank 1.
        group: layers that share one rank: ``"type"`` (default, e.g. every ``q_proj``), ``"block"``, ``"layer"``
            (each its own; costs one evaluation per layer and candidate) or a function of the layer name.
        sensitivities: what :func:`measure_sensitivities` measured on this model (with its own ``data``,
            ``metric``, ``candidates`` and ``group``): the search skips step 1 and evaluates only the final check,
            on ``data`` with ``metric``. Give ``data`` and ``metric`` as they were measured with, and leave
            ``candidates`` and ``group`` out.

    Returns ``{layer name: k}`` for every adapted layer (``set_rank``, ``merge`` and ``export_peft`` take it).

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> data = [torch.randn(4, 8)]
    >>> ranks = allocate_ranks(model, "rank:2", data, metric=lambda m, x: m(x).pow(2).mean(), group="layer")
    >>> sorted(ranks), sum(k * 16 for k in ranks.values()) <= 2 * 32
    (['0', '1'], True)
    """
    return plan_allocation(model, budget, data, metric, candidates=candidates, group=group,
                           sensitivities=sensitivities).ranks


def _batches(data: Iterable[Any] | None, who: str) -> list[Any] | tuple[Any, ...]:
    batches = data if isinstance(data, (list, tuple)) else list(data) if data is not None else []
    if not batches:
        raise ValueError(f"{who} needs data: at least one batch to measure on.")
    return batches


def _averaged(model: nn.Module, batches: list[Any] | tuple[Any, ...], metric: Metric,
              ranks: Mapping[str, int]) -> float:
    """The metric averaged over the batches with ``model`` at ``ranks`` (its setting restored after)."""
    with torch.no_grad(), at_rank(model, ranks):
        return sum(float(metric(model, b)) for b in batches) / len(batches)


def measure_sensitivities(model: nn.Module, data: Iterable[Any], metric: Metric | None = None, *,
                          candidates: Iterable[int] | None = None, group: str | Callable[[str], str] = "type",
                          ) -> Sensitivities:
    """Step 1 of the search, for every budget at once: the metric at r_max everywhere and with each group cut to
    each candidate rank (1 + G·(C − 1) evaluations on ``data``). Pass the result to :func:`allocate_ranks` /
    :func:`plan_allocation` as ``sensitivities=`` for each budget (the arguments as in :func:`allocate_ranks`).

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> data, metric = [torch.randn(4, 8)], lambda m, x: m(x).pow(2).mean()
    >>> found = measure_sensitivities(model, data, metric)
    >>> plans = [plan_allocation(model, b, data, metric, sensitivities=found) for b in ("rank:1", "rank:2", 100)]
    >>> found.evaluations, [p.evaluations <= 2 and p.parameters <= p.budget for p in plans]
    (5, [True, True, True])
    """
    state = model_state_of(model)
    state.check_unmerged("allocating ranks")
    ctrl = state.controller
    r_max = ctrl.r_max
    cands = sorted({int(c) for c in (candidates if candidates is not None else ctrl.config.ranks)} | {r_max})
    if not cands or cands[0] < 0 or cands[-1] > r_max:
        raise ValueError(f"candidates must be ranks in 0…r_max={r_max} (0: a group without its adapter), got "
                         f"{cands}.")
    if cands[0] > 1:
        cands = [1] + cands  # every budget ≥ rank 1 everywhere must be reachable
    metric = metric or default_metric
    batches = _batches(data, "allocate_ranks")
    groups: dict[str, list[str]] = {}
    for n in state.layers:
        groups.setdefault(group_key(n, group), []).append(n)
    full = _averaged(model, batches, metric, {"*": r_max})
    delta = {g: {r_max: 0.0} for g in groups}
    for g, names in groups.items():
        for c in cands[:-1]:
            delta[g][c] = _averaged(model, batches, metric,
                                    {**{n: r_max for n in state.layers}, **{n: c for n in names}}) - full
    return Sensitivities(metric_full=full, delta=delta, groups=groups, candidates=cands, r_max=r_max,
                         evaluations=1 + len(groups) * (len(cands) - 1))


def plan_allocation(model: nn.Module, budget: int | str, data: Iterable[Any] | None = None,
                    metric: Metric | None = None, *, candidates: Iterable[int] | None = None,
                    group: str | Callable[[str], str] = "type", sensitivities: Sensitivities | None = None,
                    ) -> Allocation:
    """:func:`allocate_ranks` with what it measured: an :class:`Allocation` (the same arguments).

    >>> import torch
    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> found = plan_allocation(model, "rank:2", [torch.randn(4, 8)], metric=lambda m, x: m(x).pow(2).mean())
    >>> found.uniform_rank, found.parameters <= found.budget, found.evaluations
    (2, True, 7)
    """
    state = model_state_of(model)
    state.check_unmerged("allocating ranks")
    r_max = state.controller.r_max
    dims = {n: (m.in_features, m.out_features) for n, m in state.layers.items()}
    limit = budget_parameters(budget, dims, r_max)
    batches = _batches(data, "allocate_ranks")  # read once: step 1 and the final check both use it
    if sensitivities is None:
        sens = measure_sensitivities(model, batches, metric, candidates=candidates, group=group)
        evaluations = sens.evaluations
    else:
        if candidates is not None or group != "type":
            raise ValueError("sensitivities= already fixes the candidates and the groups: leave candidates and "
                             "group out (or measure_sensitivities(..., candidates=..., group=...) again).")
        sens, evaluations = sensitivities, 0
        measured = sorted(n for names in sens.groups.values() for n in names)
        if measured != sorted(state.layers) or sens.r_max != r_max:
            raise ValueError("sensitivities= were measured on another adapter (other layers or r_max): call "
                             "measure_sensitivities on this model.")
    metric = metric or default_metric
    groups, delta, cands = sens.groups, sens.delta, sens.candidates
    width = {g: sum(dims[n][0] + dims[n][1] for n in names) for g, names in groups.items()}
    chosen = {g: cands[0] for g in groups}
    used = sum(width[g] * chosen[g] for g in groups)
    while True:
        best = None
        for g in groups:
            for c in cands:
                extra = width[g] * (c - chosen[g])
                if c <= chosen[g] or used + extra > limit:
                    continue
                gain = (delta[g][chosen[g]] - delta[g][c]) / extra
                if best is None or gain > best[0]:
                    best = (gain, g, c, extra)
        if best is None or best[0] <= 0:
            break
        _, g, c, extra = best
        chosen[g], used = c, used + extra
    layer_group = {n: g for g, names in groups.items() for n in names}
    greedy = {n: chosen[layer_group[n]] for n in state.layers}
    uniform_k = max(k for k in range(1, r_max + 1) if layer_parameters(dims, k) <= limit)
    uniform = {n: uniform_k for n in state.layers}
    at_uniform = _averaged(model, batches, metric, uniform)
    at_greedy = None if greedy == uniform else _averaged(model, batches, metric, greedy)
    evaluations += 1 if at_greedy is None else 2
    ranks = greedy if at_greedy is not None and at_greedy <= at_uniform else uniform
    return Allocation(ranks=ranks, greedy=greedy, uniform_rank=uniform_k, metric_full=sens.metric_full,
                      metric_greedy=at_greedy, metric_uniform=at_uniform, sensitivity=delta, groups=groups,
                      budget=limit, parameters=layer_parameters(dims, ranks), evaluations=evaluations)
