"""Quality against adapter size after ``fit`` (``--size_curve.budgets '[1, 2, 4, 8]'``, off by default).

For each budget k (the adapter parameters of rank k in every layer) the recipe scores, on the whole validation
split, the adapter cut to rank k everywhere and the plan ``allocate_ranks`` chooses for that budget, and prints one
row per budget with the adapter parameter count of each. The truncation sensitivities behind every plan are measured
once (:func:`lightning_matlora.rank_allocation.measure_sensitivities`), on the first ``calibration_rows`` training
examples with the model's loss; each budget then costs its plan's final check (1–2 loss evaluations of those rows)
and the scoring of the validation split at one or two settings. ``--size_curve.plot FILE.png`` also draws each
score against the parameter count (uniform ranks and allocated plans, one line each).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


from lightning_matlora import adapted_layers
from lightning_matlora.curve import panel_figure
from lightning_matlora.layer_ranks import layer_parameters
from lightning_matlora.rank_allocation import measure_sensitivities, plan_allocation

from instruct_encoding import collate

HEADS = {"loss": "loss", "token_acc": "token acc %", "exact_match": "exact match %"}


@dataclasses.dataclass
class SizePoint:
    """One budget of the size curve: the uniform rank k and the allocated plan of the same budget.

    uniform, allocated: validation scores (``loss``, ``token_acc``, and ``exact_match`` with generation).
    parameters_uniform, parameters_allocated: adapter parameters (Σ k·(in + out) over the layers) of each.
    plan: the allocation, a rank per layer type (every layer of a type shares its rank); ``None`` when the plan
        is the uniform rank itself (the allocation's final check kept it).
    """

    budget_rank: int
    parameters_uniform: int
    parameters_allocated: int
    uniform: dict[str, float]
    allocated: dict[str, float]
    plan: dict[str, int] | None


def check_budgets(budgets: list[int] | None, r_max: int) -> list[int]:
    """The budgets as sorted distinct ranks in 1…r_max; ``ValueError`` naming the option otherwise (checked before
    training)."""
    if budgets is None:
        return []
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= r_max]
    if bad or not budgets:
        raise ValueError(f"--size_curve.budgets {budgets}: give budgets as uniform ranks in 1…r_max={r_max} (the "
                         f"adapter size of that rank everywhere), e.g. --size_curve.budgets '[1, 2, 4, 8]'"
                         + (f"; {bad} are not." if bad else "."))
    return sorted(set(budgets))


def measure_size_curve(module: Any, budgets: list[int], calibration_rows: int = 64) -> list[SizePoint]:
    """The size curve of the recipe's fitted ``module`` (an ``InstructLM`` whose trainer ran ``fit``) at
    ``budgets`` (uniform ranks), scored on its datamodule's validation split."""
    model = module.model
    dm = module.trainer.datamodule
    rows = dm.splits["train"][:calibration_rows]
    pad = dm.load_tokenizer().pad_token_id
    calibration = [{n: t.to(module.device) for n, t in collate(rows[i:i + dm.batch_size], pad).items()}
                   for i in range(0, len(rows), dm.batch_size)]
    dims = {n: (m.in_features, m.out_features) for n, m in adapted_layers(model).items()}
    was_training = model.training
    model.eval()
    try:
        sensitivities = measure_sensitivities(model, calibration)
        points = []
        for k in budgets:
            found = plan_allocation(model, f"rank:{k}", calibration, sensitivities=sensitivities)
            at_uniform = module.evaluate_at(k)
            same = all(r == k for r in found.ranks.values())  # the final check kept the uniform rank
            points.append(SizePoint(
                budget_rank=k, parameters_uniform=layer_parameters(dims, k),
                parameters_allocated=found.parameters, uniform=at_uniform,
                allocated=at_uniform if same else module.evaluate_at(found.ranks),
                plan=None if same else {g: found.ranks[names[0]] for g, names in sorted(found.groups.items())}))
    finally:
        model.train(was_training)
    return points


def format_size_curve(points: list[SizePoint]) -> str:
    """The table: one row per budget; each column holds the uniform rank's value and the allocated plan's."""
    keys = [k for k in HEADS if k in points[0].uniform]
    head = ["budget", "parameters"] + [HEADS[k] for k in keys] + ["allocated plan (rank per layer type)"]
    rows = []
    for p in points:
        cells = [f"rank {p.budget_rank}", f"{p.parameters_uniform:,} | {p.parameters_allocated:,}"]
        for k in keys:
            f = "{:.4f}" if k == "loss" else "{:.1f}"
            cells.append(f"{f.format(p.uniform[k])} | {f.format(p.allocated[k])}")
        cells.append("the uniform rank" if p.plan is None else ", ".join(f"{g} {r}" for g, r in p.plan.items()))
        rows.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i in (0, len(head) - 1) else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join(["Quality against adapter size on the validation split; each cell: uniform rank | allocated "
                      "plan of the same budget (allocate_ranks):", line(head), *(line(r) for r in rows)])


def plot_size_curve(points: list[SizePoint], path: str | Path) -> Path:
    """Each score against the adapter parameter count (log2 axis), the uniform ranks and the allocated plans."""
    keys = [k for k in ("exact_match", "token_acc", "loss") if k in points[0].uniform]
    with panel_figure(path, [HEADS[k] for k in keys], xlabel="adapter parameters (log2 axis)",
                      ylabel="validation score", suptitle="Quality against adapter size") as axes:
        for ax, k in zip(axes, keys):
            ax.plot([p.parameters_uniform for p in points], [p.uniform[k] for p in points], marker="o",
                    label="uniform rank")
            ax.plot([p.parameters_allocated for p in points], [p.allocated[k] for p in points], marker="s", ls="--",
                    label="allocated (allocate_ranks)")
            ax.set_xscale("log", base=2)
            for p in points:
                ax.annotate(f"r{p.budget_rank}", (p.parameters_uniform, p.uniform[k]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
    return Path(path)
