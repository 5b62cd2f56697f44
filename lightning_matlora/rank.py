"""Which prefix of the adapter a forward uses, and with which coefficients: the one home of rank slicing.

Every adapted layer of a model shares one :class:`RankController`. The controller holds the active rank setting
and turns it into a :class:`RankPlan` — how many leading components k to use and the coefficients that multiply
x·A[:, :k] before B — so that layers never compute a scale themselves.

Rank settings (see :func:`lightning_matlora.set_rank`):

- ``None``: the training forward of the configured ``mode`` (P for ``"matryoshka"``/``"lora"``, the step's
  sampled rank for ``"dylora"``, one train rank per row for ``"rowwise"``).
- an ``int`` k in 1…r_max: inference at rank k under the configured ``rank_scale`` rule.
- a 1-D integer tensor: one rank per row of the batch (rows are the first dimension of the layer input).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import torch

from .config import MatLoRAConfig
from .scaling import rank_scale

RankSetting = Union[None, int, torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """How a layer runs its adapter for one forward.

    k: number of leading components used (A[:k], B[:, :k]).
    coef: coefficients on x·A[:, :k]: shape ``(k,)`` (same for every row) or ``(rows, k)`` (one row each).
    """

    k: int
    coef: torch.Tensor


class RankController:
    """Shared rank state of every adapted layer of one model (not an ``nn.Module``; holds no parameters)."""

    def __init__(self, config: MatLoRAConfig) -> None:
        self.config = config
        self.p = config.train_diagonal  # float32 on CPU, length r_max
        self._setting: RankSetting = None
        self._step_rank: int | None = None  # dylora: the rank sampled for the current optimizer step
        self._row_offset = 0  # rowwise: where the cyclic rank assignment starts in the current step
        # rowwise under data parallelism: row i of process g is row i·world + g of the global batch (the
        # interleaving of torch's DistributedSampler), so the train ranks are spread over the global batch
        self.process_index, self.num_processes = 0, 1
        self._cache: dict[tuple, RankPlan] = {}

    # ----------------------------------------------------------------------------------------------- settings
    @property
    def r_max(self) -> int:
        return self.config.r_max

    @property
    def setting(self) -> RankSetting:
        return self._setting

    def set(self, rank: RankSetting) -> None:
        """Activate a rank setting (validated: ints and tensor entries must lie in 1…r_max)."""
        if rank is not None:
            if isinstance(rank, torch.Tensor) and rank.dim() == 0 and not rank.dtype.is_floating_point:
                rank = int(rank)  # a 0-d integer tensor is one rank for the whole batch
            elif not isinstance(rank, (torch.Tensor, bool)) and hasattr(rank, "__index__"):
                rank = int(rank.__index__())  # numpy integers and other int-like scalars
            if isinstance(rank, torch.Tensor):
                if rank.dim() != 1 or rank.dtype.is_floating_point or rank.dtype == torch.bool:
                    raise ValueError("A per-row rank tensor must be 1-D and of an integer dtype (one rank per row "
                                     f"of the batch), got shape {tuple(rank.shape)} and dtype {rank.dtype}.")
                if rank.numel() == 0:
                    raise ValueError("The per-row rank tensor is empty: give one rank per row of the batch.")
                lo, hi = int(rank.min()), int(rank.max())
                if lo < 1 or hi > self.r_max:
                    raise ValueError(f"Per-row ranks must lie in 1…r_max={self.r_max}, got values in {lo}…{hi}.")
                rank = rank.detach().to("cpu", torch.long)
            elif isinstance(rank, bool) or not isinstance(rank, int):
                raise ValueError(f"rank must be an int in 1…{self.r_max}, a 1-D integer tensor of per-row ranks, "
                                 f"or None for the training forward; got {rank!r}.")
            elif not 1 <= rank <= self.r_max:
                raise ValueError(f"rank {rank} is outside 1…r_max={self.r_max}: choose a rank the adapter has "
                                 f"(the adapter was allocated with r_max={self.r_max}).")
        self._setting = rank
        self._cache.clear()

    def set_rule(self, rank_scale: str) -> None:
        """Change the inference rule at rank k (``"rank"`` or ``"trained"``) of these trained weights."""
        from .config import RANK_SCALES

        if rank_scale not in RANK_SCALES:
            raise ValueError(f"Unknown rank_scale {rank_scale!r}: use one of {RANK_SCALES}.")
        self.config.rank_scale = rank_scale
        self._cache.clear()

    def reconfigure(self, **changes) -> None:
        """Change the rule and objective of a live adapter in place: ``scaling``, ``alpha``, ``rank_scale``,
        ``mode`` and ``ranks`` (``ranks=None``: the new mode's default). The changes are validated as a whole
        :class:`MatLoRAConfig` first, then written into the shared config object (so a callback holding it trains
        with them from its next step) and the training diagonal p is rebuilt. Example: after
        :func:`~lightning_matlora.nesting.nest_by_svd` on a ``mode="lora"`` run, ``reconfigure(mode="rowwise",
        ranks=None)`` continues training with every rank trained as it is served."""
        allowed = {"scaling", "alpha", "rank_scale", "mode", "ranks"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"reconfigure changes only {sorted(allowed)}, not {unknown}.")
        new = MatLoRAConfig.from_dict({**self.config.to_dict(), **changes})
        for name in changes:
            setattr(self.config, name, getattr(new, name))
        self.p = self.config.train_diagonal
        self._cache.clear()

    def begin_step(self, step: int, micro_step: int = 0) -> None:
        """Draw the per-step randomness of the training forward, deterministically from (seed, step).

        ``"dylora"``: samples the step's rank b uniformly from the train ranks; the same b on every process and
        for every micro-batch of one optimizer step (it depends only on ``step``). ``"rowwise"``: draws the
        offset of the cyclic rank-to-row assignment for this micro-batch.
        """
        mode = self.config.mode
        if mode == "dylora":
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(step))
            idx = int(torch.randint(len(self.config.ranks), (1,), generator=g))
            self._step_rank = self.config.ranks[idx]
        elif mode == "rowwise":
            g = torch.Generator().manual_seed((self.config.seed * 1_000_003 + int(step)) * 1009 + int(micro_step))
            self._row_offset = int(torch.randint(len(self._cycle), (1,), generator=g))
        else:
            return
        self._cache.clear()

    @property
    def step_rank(self) -> int | None:
        return self._step_rank

    # ----------------------------------------------------------------------------------------- coefficients
    def rank_coefficients(self, k: int, rule: str | None = None) -> torch.Tensor:
        """The coefficients (float32, length k) that serve rank k under ``rule`` (default: ``rank_scale``).

        ``"rank"``: s(k)·1 (the paper's rule). ``"trained"``: p_1…p_k (the prefix of the training diagonal).
        Merging and exporting rank k fold exactly these into B.
        """
        if (rule or self.config.rank_scale) == "trained":
            return self.p[:k].clone()
        return torch.full((k,), rank_scale(k, self.config.scaling, self.config.alpha), dtype=torch.float32)

    def row_coefficients(self, ranks: torch.Tensor, rule: str | None = None, k: int | None = None) -> torch.Tensor:
        """Per-row coefficients (float32, ``rows × max(ranks)``): row i is ``rank_coefficients(ranks[i])`` padded
        with zeros, i.e. a prefix mask times the row's scale. ``k``: ``max(ranks)`` when the caller knows it
        (saves a data-dependent read that ``torch.compile`` cannot trace)."""
        rule = rule or self.config.rank_scale
        k = int(ranks.max()) if k is None else k
        cols = torch.arange(k)
        mask = (cols[None, :] < ranks[:, None]).to(torch.float32)
        if rule == "trained":
            return mask * self.p[:k][None, :]
        scale = rank_scale(ranks, self.config.scaling, self.config.alpha)
        return mask * scale[:, None]

    def set_process(self, index: int, count: int) -> None:
        """Declare this process's place in data-parallel training (``"rowwise"`` spreads ranks globally)."""
        if not 0 <= index < count:
            raise ValueError(f"process index {index} outside 0…{count - 1}")
        self.process_index, self.num_processes = int(index), int(count)
        self._cache.clear()

    @property
    def _cycle(self) -> list[int]:
        """rowwise: the ranks dealt cyclically over a batch's rows (the config's ``row_cycle``)."""
        return self.config.row_cycle

    def _rowwise_index(self, i: int) -> int:
        return (self._row_offset + i * self.num_processes + self.process_index) % len(self._cycle)

    def rowwise_ranks(self, rows: int) -> torch.Tensor:
        """The rank of each of ``rows`` rows in a ``"rowwise"`` training step: the config's ``row_cycle`` (each train
        rank repeated by its ``rank_weights`` entry) dealt cyclically over the global batch from this step's offset
        (row i of process g is global row i·world + g), so rank r gets its weight's share of the global batch's
        rows (exactly, when the global batch is a multiple of the cycle's length)."""
        ranks = torch.tensor(self._cycle, dtype=torch.long)
        index = (self._row_offset + torch.arange(rows) * self.num_processes + self.process_index) % len(ranks)
        return ranks[index]

    # -------------------------------------------------------------------------------------------------- plan
    def plan(self, rows: int, device: torch.device, dtype: torch.dtype) -> RankPlan:
        """The plan for a forward whose input has ``rows`` rows, computed once per setting, device and dtype."""
        key = (rows, device, dtype)
        plan = self._cache.get(key)
        if plan is None:
            k, coef = self._plan_cpu(rows)
            plan = RankPlan(k=k, coef=coef.to(device=device, dtype=dtype))
            self._cache[key] = plan
        return plan

    def _plan_cpu(self, rows: int) -> tuple[int, torch.Tensor]:
        setting, mode = self._setting, self.config.mode
        if isinstance(setting, int):
            return setting, self.rank_coefficients(setting)
        if isinstance(setting, torch.Tensor):
            if setting.numel() != rows:
                raise ValueError(f"set_rank was given {setting.numel()} per-row ranks but an adapted layer received "
                                 f"an input with {rows} rows (first dimension): give one rank per row of the batch.")
            coef = self.row_coefficients(setting)
            return coef.shape[1], coef
        # the training forward of the mode
        if mode == "dylora":
            b = self._step_rank if self._step_rank is not None else self.r_max
            return b, self.rank_coefficients(b, rule="rank")  # DyLoRA trains rank b as the paper serves it
        if mode == "rowwise":
            cycle = self._cycle  # the cyclic assignment uses the largest rank once rows ≥ len(cycle)
            k = max(cycle[self._rowwise_index(i)] for i in range(min(rows, len(cycle))))
            coef = self.row_coefficients(self.rowwise_ranks(rows), rule="rank", k=k)
            return k, coef
        return self.r_max, self.p.clone()
