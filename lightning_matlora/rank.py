"""The rank state of an adapted model: which prefix of the adapter a forward uses, with which coefficients (the
one home of rank slicing).

Every adapted layer of a model shares one :class:`RankController`. The controller holds the active rank setting
and turns it into a :class:`RankPlan` — how many leading components k to use and the coefficients that multiply
x·A[:, :k] before B — so that layers never compute a scale themselves. It knows nothing of the model: its layers,
merged weights and owned tensors are the model state (:class:`lightning_matlora.model_state.ModelState`), which
holds the controller. Calls run one way: model state → layers → controller.

Rank settings (see :func:`lightning_matlora.set_rank`):

- ``None``: the training forward of the configured ``mode`` (P for ``"matryoshka"``/``"lora"``, the step's
  sampled rank for ``"dylora"``, one train rank per row for ``"rowwise"``; with ``layer_draws="type"`` one per row
  and module type, see :meth:`RankController.set_layers`). With ``max_pass`` the training forward
  also depends on the active *pass* (:meth:`RankController.in_pass`): ``"max"`` runs every row at r_max (the
  ``"rank"`` rule at r_max), ``"low"`` deals the train ranks below r_max over the rows.
- an ``int`` k in 1…r_max: inference at rank k under the configured ``rank_scale`` rule.
- a 1-D integer tensor: one rank per row of the batch (rows are the first dimension of the layer input).
- a :class:`LayerRanks`: one int rank per adapted layer, 0…r_max (0: the layer runs without its adapter; built by
  the model state from a ``{name or pattern: k}`` mapping, see :func:`lightning_matlora.set_rank`).

Coefficients are computed in float64 and cast once per (device, dtype) by :meth:`RankController.plan`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Union

import torch
from torch import nn

from .config import MatLoRAConfig
from .layer_ranks import group_key
from .scaling import scale_of_rank

_DRAWN_MODES = ("dylora", "rowwise")  # modes whose training forward depends on a per-step draw


class LayerRanks(Mapping):
    """A rank per adapted layer: a read-only mapping ``layer name → k`` covering every adapted layer of a model,
    plus the same ranks by layer object (what a layer's forward asks with). Built by
    :meth:`lightning_matlora.model_state.ModelState.layer_ranks` from a ``{name or pattern: k}`` mapping; equal to a
    plain dict with the same items.
    """

    def __init__(self, by_name: Mapping[str, int], layers: Mapping[str, nn.Module]) -> None:
        self._by_name = {n: int(k) for n, k in by_name.items()}
        self._by_id = {id(layers[n]): k for n, k in self._by_name.items()}

    def __getitem__(self, name: str) -> int:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def of(self, layer: nn.Module) -> int:
        """The rank of ``layer`` (one of the layers this mapping was built for)."""
        return self._by_id[id(layer)]

    def covers(self, layers: Mapping[str, nn.Module]) -> bool:
        """True when this mapping was built for exactly ``layers`` (the same names and layer objects)."""
        return set(self._by_name) == set(layers) and all(id(m) in self._by_id for m in layers.values())

    def uniform(self) -> int | None:
        """The rank when every layer has the same one, else None."""
        ranks = set(self._by_name.values())
        return next(iter(ranks)) if len(ranks) == 1 else None

    def __repr__(self) -> str:
        return f"LayerRanks({self._by_name!r})"


RankSetting = Union[None, int, torch.Tensor, LayerRanks]

#: the passes of a ``max_pass`` training step (``None``: no pass active)
PASSES = ("max", "low")


@dataclasses.dataclass(frozen=True)
class RankPlan:
    """How a layer runs its adapter for one forward.

    k: number of leading components used (A[:k], B[:, :k]).
    coef: coefficients on x·A[:, :k]: shape ``(k,)`` (same for every row) or ``(rows, k)`` (one row each).
    """

    k: int
    coef: torch.Tensor


class RankController:
    """The rank state of one adapted model (not an ``nn.Module``; holds no parameters and no layers).

    It holds the active setting, the pass of a paired step, the per-step draws of ``"dylora"``/``"rowwise"`` and
    the plan cache. Obtain a model's controller with :func:`lightning_matlora.adapted_model.controller_of`.

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> from lightning_matlora.adapted_model import controller_of
    >>> model = nn.Sequential(nn.Linear(8, 8))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> ctrl = controller_of(model)
    >>> ctrl.r_max, ctrl.setting is None
    (4, True)
    """

    def __init__(self, config: MatLoRAConfig) -> None:
        self.config = config
        self.p = config.train_diagonal  # float64 on CPU, length r_max
        self._setting: RankSetting = None
        self._step_rank: int | None = None  # dylora: the rank sampled for the current optimizer step
        # rowwise: where the cyclic rank assignment starts in the current step, one offset per draw group
        # (layer_draws="type": one group per module type, in sorted order; "none": one group for every layer)
        self._offsets = [0]
        self._group_of: dict[int, int] = {}  # id(layer) → its draw group (layers not registered: group 0)
        self._group_names: list[str] = []
        self._last_draw: tuple[int, int] | None = None
        self._pass: str | None = None  # max_pass: the pass of the current training forward ("max", "low", None)
        self._warned_no_pass = False
        # rowwise under data parallelism: row i of process g is row i·world + g of the global batch (the
        # interleaving of torch's DistributedSampler), so the train ranks are spread over the global batch
        self.process_index, self.num_processes = 0, 1
        self._cache: dict[tuple, RankPlan] = {}
        # per-step draws: explicit (begin_step, as the callback does) or automatic (each training forward of the
        # model the adapter was injected into draws the next step, until begin_step is called once)
        self._explicit_steps = False
        self._auto_step = 0
        self._warned_undrawn = False

    # ----------------------------------------------------------------------------------------------- settings
    @property
    def r_max(self) -> int:
        return self.config.r_max

    @property
    def setting(self) -> RankSetting:
        return self._setting

    def set(self, rank: RankSetting) -> None:
        """Activate a rank setting (validated: ints and tensor entries must lie in 1…r_max, per-layer ranks in
        0…r_max)."""
        if isinstance(rank, LayerRanks):
            bad = {n: k for n, k in rank.items() if not 0 <= k <= self.r_max}
            if bad:
                raise ValueError(f"Per-layer ranks must lie in 0…r_max={self.r_max}, got {bad}.")
        elif rank is not None:
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

    @property
    def _row_offset(self) -> int:
        """rowwise: the offset of the cyclic rank assignment of draw group 0 (every layer's without ``layer_draws``)."""
        return self._offsets[0]

    def set_layers(self, layers: Mapping[str, nn.Module]) -> None:
        """Register the adapted layers by name (the model state does, when it attaches them), so that with
        ``layer_draws="type"`` each module type's layers share one draw of row ranks per step and the types draw
        independently. Without ``layer_draws`` it only clears the registration (every layer is group 0)."""
        if self.config.layer_draws == "none":
            names: list[str] = []
            group_of: dict[int, int] = {}
        else:
            keys = {n: group_key(n, self.config.layer_draws) for n in layers}
            names = sorted(set(keys.values()))
            index = {g: i for i, g in enumerate(names)}
            group_of = {id(m): index[keys[n]] for n, m in layers.items()}
        self._group_names, self._group_of = names, group_of
        if self._last_draw is not None:  # redraw the current step for the new number of groups
            self._draw(*self._last_draw)
        else:
            self._offsets = [0] * max(1, len(names))
        self._cache.clear()

    @property
    def draw_groups(self) -> dict[str, int]:
        """group name → index of the draw groups of ``layer_draws`` (empty without it: every layer draws alike)."""
        return {g: i for i, g in enumerate(self._group_names)}

    def draw_group(self, layer: nn.Module | None) -> int:
        """The draw group index of ``layer`` (0 for every layer without ``layer_draws``, or an unregistered one)."""
        return self._group_of.get(id(layer), 0) if layer is not None else 0

    @property
    def active_pass(self) -> str | None:
        """The pass of a ``max_pass`` training step that training forwards run now: ``"max"`` (every row at r_max),
        ``"low"`` (the rows dealt over the train ranks below r_max) or ``None`` (outside a paired step)."""
        return self._pass

    @contextlib.contextmanager
    def in_pass(self, name: str | None) -> Iterator[None]:
        """Run the block's training forwards in pass ``name`` (``"max"``, ``"low"`` or ``None``) and restore the
        previous pass after, also on an exception. :func:`lightning_matlora.paired_loss` and the callback use it."""
        if name is not None and name not in PASSES:
            raise ValueError(f"Unknown pass {name!r}: use one of {PASSES} or None.")
        previous = self._pass
        self._pass = name
        self._cache.clear()
        try:
            yield
        finally:
            self._pass = previous
            self._cache.clear()

    def set_rule(self, rank_scale: str) -> None:
        """Change the inference rule at rank k (``"rank"`` or ``"trained"``) of these trained weights."""
        from .config import RANK_SCALES, check_rule_for_mode

        if rank_scale not in RANK_SCALES:
            raise ValueError(f"Unknown rank_scale {rank_scale!r}: use one of {RANK_SCALES}.")
        check_rule_for_mode(self.config.mode, rank_scale)
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

    # ------------------------------------------------------------------------------------------------- draws
    def begin_step(self, step: int, micro_step: int = 0) -> None:
        """Draw the per-step randomness of the training forward, deterministically from (seed, step).

        ``"dylora"``: samples the step's rank b uniformly from the train ranks; the same b on every process and
        for every micro-batch of one optimizer step (it depends only on ``step``). ``"rowwise"``: draws the
        offset of the cyclic rank-to-row assignment for this micro-batch. Once called, the draws are explicit:
        training forwards no longer draw the next step by themselves.
        """
        self._explicit_steps = True
        self._draw(step, micro_step)

    def _draw(self, step: int, micro_step: int) -> None:
        mode = self.config.mode
        if mode == "dylora":
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(step))
            idx = int(torch.randint(len(self.config.ranks), (1,), generator=g))
            self._step_rank = self.config.ranks[idx]
        elif mode == "rowwise":
            g = torch.Generator().manual_seed((self.config.seed * 1_000_003 + int(step)) * 1009 + int(micro_step))
            # over the cycle of a forward outside any pass (the longest), whatever pass is active now, so the
            # draws do not depend on where they are made (the low pass reads the offset modulo its shorter cycle)
            n = len(self.config.row_cycle) * (2 if self.config.max_pass else 1)
            groups = max(1, len(self._group_names))
            # one offset per draw group; without layer_draws exactly the single draw of earlier versions
            self._offsets = torch.randint(n, (groups,), generator=g).tolist()
            self._last_draw = (int(step), int(micro_step))
        else:
            return
        self._cache.clear()

    def auto_draw_hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the adapted model: in a loop that never calls ``begin_step``, each training-mode
        forward of the training setting draws step 0, 1, 2, … (the draws ``begin_step(model, step)`` makes). The max
        pass of a ``max_pass`` step draws nothing (it needs no draw), so a paired step advances the draws once."""
        if self._explicit_steps or self._setting is not None or not module.training \
                or self.config.mode not in _DRAWN_MODES or self._pass == "max":
            return
        self._draw(self._auto_step, 0)
        self._auto_step += 1

    @property
    def step_rank(self) -> int | None:
        return self._step_rank

    # ----------------------------------------------------------------------------------------- coefficients
    def rank_coefficients(self, k: int, rule: str | None = None) -> torch.Tensor:
        """The coefficients (float64, length k) that serve rank k under ``rule`` (default: ``rank_scale``).

        ``"rank"``: s(k)·1 (the paper's rule). ``"trained"``: p_1…p_k (the prefix of the training diagonal).
        Merging and exporting rank k fold exactly these into B.
        """
        if k == 0:  # a per-layer rank of 0: no component, no coefficient
            return torch.zeros(0, dtype=torch.float64)
        if (rule or self.config.rank_scale) == "trained":
            return self.p[:k].clone()
        return torch.full((k,), scale_of_rank(k, self.config.scaling, self.config.alpha), dtype=torch.float64)

    def row_coefficients(self, ranks: torch.Tensor, rule: str | None = None, k: int | None = None) -> torch.Tensor:
        """Per-row coefficients (float64, ``rows × max(ranks)``): row i is ``rank_coefficients(ranks[i])`` padded
        with zeros, i.e. a prefix mask times the row's scale. ``k``: ``max(ranks)`` when the caller knows it
        (saves a data-dependent read that ``torch.compile`` cannot trace)."""
        rule = rule or self.config.rank_scale
        k = int(ranks.max()) if k is None else k
        cols = torch.arange(k)
        mask = (cols[None, :] < ranks[:, None]).to(torch.float64)
        if rule == "trained":
            return mask * self.p[:k][None, :]
        scale = scale_of_rank(ranks, self.config.scaling, self.config.alpha)
        return mask * scale[:, None]

    def set_process(self, index: int, count: int) -> None:
        """Declare this process's place in data-parallel training (``"rowwise"`` spreads ranks globally)."""
        if not 0 <= index < count:
            raise ValueError(f"process index {index} outside 0…{count - 1}")
        self.process_index, self.num_processes = int(index), int(count)
        self._cache.clear()

    @property
    def _cycle(self) -> list[int]:
        """rowwise: the ranks dealt cyclically over a batch's rows (the config's ``row_cycle``). A ``max_pass``
        adapter's training forward outside a paired step (a loop that does not use ``paired_loss``) deals the low
        cycle followed by as many rows at r_max, the one-pass counterpart of the paired step: half of the rows
        at r_max, so that no rank is left untrained."""
        cycle = self.config.row_cycle
        if self.config.max_pass and self._pass is None:
            return cycle + [self.r_max] * len(cycle)
        return cycle

    def _rowwise_index(self, i: int, group: int = 0) -> int:
        return (self._offsets[group] + i * self.num_processes + self.process_index) % len(self._cycle)

    def rowwise_ranks(self, rows: int, group: int = 0) -> torch.Tensor:
        """The rank of each of ``rows`` rows in a ``"rowwise"`` training step: the config's ``row_cycle`` (each train
        rank repeated by its ``rank_weights`` entry) dealt cyclically over the global batch from this step's offset
        (row i of process g is global row i·world + g), so rank r gets its weight's share of the global batch's
        rows (exactly, when the global batch is a multiple of the cycle's length). With ``max_pass`` these are the
        ranks of the low pass (the max pass runs every row at r_max). ``group``: the draw group of the layer
        (:meth:`draw_group`; with ``layer_draws="type"`` each module type deals from its own offset)."""
        ranks = torch.tensor(self._cycle, dtype=torch.long)
        index = (self._offsets[group] + torch.arange(rows) * self.num_processes + self.process_index) % len(ranks)
        return ranks[index]

    # -------------------------------------------------------------------------------------------------- plan
    def plan(self, rows: int, device: torch.device, dtype: torch.dtype, training: bool = False,
             layer: nn.Module | None = None) -> RankPlan:
        """The plan for a forward whose input has ``rows`` rows, computed once per setting, device and dtype
        (the float64 coefficients are cast to ``dtype`` here, once). ``training``: the calling layer is in training
        mode (a training forward of ``"dylora"``/``"rowwise"`` before any draw warns once). ``layer``: the calling
        layer, which a per-layer setting (:class:`LayerRanks`) needs."""
        if isinstance(self._setting, LayerRanks):
            if layer is None:
                raise ValueError("A per-layer rank setting needs the calling layer: pass layer=self to plan().")
            k = self._setting.of(layer)
            key: tuple = ("layer", k, device, dtype)
            plan = self._cache.get(key)
            if plan is None:
                plan = RankPlan(k=k, coef=self.rank_coefficients(k).to(device=device, dtype=dtype))
                self._cache[key] = plan
            return plan
        group = self.draw_group(layer) if self._group_of and self._setting is None else 0
        key = (rows, device, dtype, group)
        plan = self._cache.get(key)
        if plan is None:
            if training and self._setting is None and self.config.mode in _DRAWN_MODES \
                    and not self._explicit_steps and self._auto_step == 0 and self._pass != "max":
                self._warn_undrawn()
            if training and self._setting is None and self.config.max_pass and self._pass is None:
                self._warn_no_pass()
            k, coef = self._plan_cpu(rows, group)
            plan = RankPlan(k=k, coef=coef.to(device=device, dtype=dtype))
            self._cache[key] = plan
        return plan

    def _plan_cpu(self, rows: int, group: int = 0) -> tuple[int, torch.Tensor]:
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
            if self._pass == "max":  # max_pass: every row at r_max, exactly the "rank" rule at r_max
                return self.r_max, self.rank_coefficients(self.r_max, rule="rank")
            cycle = self._cycle  # the cyclic assignment uses the largest rank once rows ≥ len(cycle)
            k = max(cycle[self._rowwise_index(i, group)] for i in range(min(rows, len(cycle))))
            coef = self.row_coefficients(self.rowwise_ranks(rows, group), rule="rank", k=k)
            return k, coef
        return self.r_max, self.p.clone()

    def _warn_no_pass(self) -> None:
        if self._warned_no_pass:
            return
        self._warned_no_pass = True
        warnings.warn("max_pass=True trains each step twice (the whole batch at r_max, then its rows dealt over the "
                      "lower train ranks), but this training forward runs outside a paired step, so it trains the one-pass "
                      "approximation instead (half of the rows at r_max, the others dealt over the lower train "
                      "ranks). Compute the loss with lightning_matlora.paired_loss(model, lambda: ...) in a "
                      "hand-written loop; the MatryoshkaLoRA callback does this in a Trainer.", UserWarning,
                      stacklevel=5)

    def _warn_undrawn(self) -> None:
        if self._warned_undrawn:
            return
        self._warned_undrawn = True
        what = ("trains one rank drawn per step; without a draw it trains r_max only (plain LoRA)"
                if self.config.mode == "dylora" else
                "assigns the train ranks to rows from a per-step draw; without a draw every step uses the same "
                "assignment")
        warnings.warn(f"mode={self.config.mode!r} {what}, and no step has been drawn. Call "
                      f"lightning_matlora.begin_step(model, step) before each training step, or call the model the "
                      f"adapter was applied to in training mode (its forward draws the next step by itself); the "
                      f"MatryoshkaLoRA callback does this in a Trainer.", UserWarning, stacklevel=5)
