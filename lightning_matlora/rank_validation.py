"""The ``MatryoshkaLoRA`` callback's rank curves: every eval rank, every validation (and test) epoch.

Contract with the user's LightningModule (nothing MatryoshkaLoRA-specific in it):

1. Lightning runs ``validation_step(batch, batch_idx)`` as usual, at the model's rank setting (the training
   forward, ``None``, during fit; whatever the user set, e.g. a rank per layer, for ``trainer.validate``/``test``);
   whatever it logs with ``self.log`` and whatever it returns stay the user's own. The per-rank passes below
   restore that setting after each batch, and the callback's teardown gives it back after validate/test.
2. Two kinds of curves are measured:

   - the *loss curve*, from the step's return value: a tensor, or a dict with ``"loss"``. A scalar is a batch
     mean; a 1-D tensor with one loss per row of the batch (or a dict with a ``"per_row_loss"`` of that shape)
     is *per-row*. It is logged as ``val/loss@r<k>`` and ``val/aurac_loss``. A ``RankCurveMetric`` named
     ``loss`` on the module takes its place (the return value is then not read).
   - one curve per :class:`~lightning_matlora.RankCurveMetric` found on the module (any attribute, also inside
     ``nn.ModuleDict``), logged as ``val/<name>@r<k>`` and ``val/aurac_<name>``.

3. Right after Lightning's call, in ``on_validation_batch_end``, the callback evaluates every eval rank by
   calling ``validation_step`` again (through the strategy, as Lightning does: same precision context and model
   wrappers) with ``self.log``/``self.log_dict`` silenced and the updates of the module's other torchmetrics
   metrics discarded (:mod:`lightning_matlora.isolation`):

   - *one pass per rank* (``"sequential"``, and always when the module has a ``RankCurveMetric``): the model
     is set to eval rank k (``at_rank``) and ``validation_step`` runs; every ``RankCurveMetric.update`` in it
     goes to rank k's copy, and its loss is rank k's point. Updates in Lightning's own call (rank setting
     ``None``) are not counted.
   - *one pass* (``"auto"`` when the step's loss is per-row and the module has no ``RankCurveMetric``, or
     ``"mixed"``): the batch is replicated once per eval rank along its first dimension, the rows of copy i run
     at eval rank i in one forward (``set_rank(model, per_row_ranks)``), and the per-row losses are averaged
     per rank. A generic metric's ``update(preds, target)`` cannot be split by rank, which is why a module with
     a ``RankCurveMetric`` always gets one pass per rank.

   Each rank's loss is averaged over the epoch weighted by batch rows (a per-row loss is first averaged over
   the batch), so both paths give the same loss curve for the same per-row losses.
4. At the end of the epoch every curve is reduced across processes (torchmetrics states) and logged with
   ``pl_module.log``; the history keeps one :class:`~lightning_matlora.RankCurve` per metric and epoch.

``trainer.test`` is evaluated the same way (``test_step``, keys ``test/...``).

Side effects of ``validation_step`` other than ``self.log`` and torchmetrics states (appending to a list,
counters) happen once per extra call; set ``rank_eval=None`` and drive the ranks yourself for full control.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any, ContextManager

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

from .config import MatLoRAConfig
from .curve import RankCurve, format_curves_table, plot_rank_curves
from .isolation import isolated
from .metric import RankCurveMetric
from .adapted_model import at_rank, get_rank

RANK_EVAL_MODES = ("auto", "mixed", "sequential")
LOSS = "loss"  # the name of the curve measured from validation_step's returned loss

_HOW_TO = (
    "MatryoshkaLoRA evaluates every eval rank each validation epoch from the loss your validation_step returns "
    "and from the RankCurveMetrics on your module. Return the loss (`return loss`, or `return {\"loss\": loss}`; "
    "a 1-D per-row loss enables the one-pass evaluation), or measure other scores: put e.g. "
    "`self.acc = RankCurveMetric(MulticlassAccuracy(num_classes=...))` on your module and call "
    "`self.acc.update(preds, target)` in validation_step (the callback runs it at every eval rank); or turn the "
    "evaluation off with MatryoshkaLoRA(..., rank_eval=None)."
)


def check_rank_eval(mode: str | None) -> str | None:
    if mode is not None and mode not in RANK_EVAL_MODES:
        raise ValueError(f"rank_eval must be one of {RANK_EVAL_MODES} or None (no per-rank validation), got "
                         f"{mode!r}.")
    return mode


# ---------------------------------------------------------------------------------------- batch handling
def batch_rows(batch: Any) -> int | None:
    """The number of rows of a batch: the common first dimension of all its tensors (``None`` if they have no
    common first dimension, or there is no tensor)."""
    firsts: list[int] = []
    apply_to_collection(batch, torch.Tensor, lambda t: firsts.append(t.shape[0] if t.dim() else -1))
    if not firsts or firsts[0] < 1 or any(f != firsts[0] for f in firsts):
        return None
    return firsts[0]


def replicate_batch(batch: Any, copies: int) -> Any:
    """The batch with every tensor repeated ``copies`` times along its first dimension (copy i is rows
    ``i·rows … (i+1)·rows − 1``); other leaves are kept as they are."""
    return apply_to_collection(batch, torch.Tensor, lambda t: t.repeat(copies, *([1] * (t.dim() - 1))))


def step_loss(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, per_row_loss or None) from a ``validation_step`` output; raises the how-to error otherwise."""
    per_row = None
    if isinstance(output, Mapping):
        per_row = output.get("per_row_loss")
        loss = output.get("loss", per_row)
    else:
        loss = output
    if not isinstance(loss, torch.Tensor) or loss.dim() > 1 or not loss.is_floating_point():
        got = (f"a dict with keys {sorted(map(str, output))}" if isinstance(output, Mapping) else
               f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(output).__name__)
        raise ValueError(f"validation_step returned {got}, not a loss. " + _HOW_TO)
    if per_row is None and loss.dim() == 1:
        per_row = loss
    if per_row is not None and (not isinstance(per_row, torch.Tensor) or per_row.dim() != 1):
        raise ValueError("validation_step returned a 'per_row_loss' that is not a 1-D tensor (one loss per row of "
                         "the batch). " + _HOW_TO)
    return loss, per_row


def silenced(module: pl.LightningModule) -> ContextManager[None]:
    """Run user code without its ``self.log``/``self.log_dict`` reaching Lightning and with the updates of the
    module's torchmetrics metrics discarded (except the ``RankCurveMetric``s: their updates in the per-rank calls
    are the point); see :func:`lightning_matlora.isolation.isolated`."""
    return isolated(module, keep=lambda m: isinstance(m, RankCurveMetric))


# ------------------------------------------------------------------------------------------ finding metrics
def find_rank_metrics(module: torch.nn.Module) -> dict[str, RankCurveMetric]:
    """The :class:`RankCurveMetric`s of ``module`` by curve name: the metric's ``name``, else the last part of its
    attribute path (``self.acc`` → ``"acc"``, ``self.curves["em"]`` → ``"em"``). Two metrics with one name are an
    error that names both."""
    found: dict[str, tuple[str, RankCurveMetric]] = {}
    for path, m in module.named_modules():
        if not isinstance(m, RankCurveMetric):
            continue
        if m.name is None:
            m.found_as = path.rsplit(".", 1)[-1]
        name = m.curve_name
        if name in found:
            raise ValueError(f"Two RankCurveMetrics of the module are named {name!r} ({found[name][0]!r} and "
                             f"{path!r}): their log keys would collide. Give one another name: "
                             f"RankCurveMetric(..., name='...').")
        found[name] = (path, m)
    return {name: m for name, (_, m) in found.items()}


# ------------------------------------------------------------------------------------------- the evaluator
STAGES = {"validate": ("val", "validation_step"), "test": ("test", "test_step")}


class RankCurveValidation:
    """Evaluates every eval rank during validation (and test) and reports the curves (driven by
    ``MatryoshkaLoRA``'s hooks). See the module docstring for the contract.

    Args:
        config: the adapter's config (``eval_ranks`` are the curves' ranks).
        mode: ``"auto"``, ``"mixed"`` (one pass), ``"sequential"`` (one pass per rank); see the module doc.
        tolerance: relative tolerance of the rank advice printed with the table.
        verbose: print the table at the end of ``fit``/``validate``/``test``.
        base_scores: the base model's scores by curve name, shown as the table's ``base`` row and as a line on
            each plot (``None``: none).
    """

    def __init__(self, config: MatLoRAConfig, mode: str = "auto", tolerance: float = 0.01,
                 verbose: bool = True, base_scores: Mapping[str, float] | None = None) -> None:
        self.mode = check_rank_eval(mode)
        self.ranks = list(config.eval_ranks)
        self.r_max = config.r_max
        self.tolerance = tolerance
        self.verbose = verbose
        self.base_scores = base_scores  # the base model's scores by curve name: the table's base row, the plots' line
        self.loss = RankCurveMetric(ranks=self.ranks, name=LOSS, higher_is_better=False)
        self.metrics: dict[str, RankCurveMetric] = {}  # the module's RankCurveMetrics, by curve name
        self.history: list[tuple[int, list[RankCurve]]] = []  # validation epochs: (epoch, one curve per metric)
        self.test_curves: list[RankCurve] = []  # the last test run's curves
        self.used_mixed: bool | None = None  # which path the last batch took (for tests and the table)
        self._mixed_failed = False
        self._stage: str | None = None  # "validate"/"test" between epoch start and end
        self._pass_rank: int | None = None  # the eval rank of the callback's current call of the step
        self._module: torch.nn.Module | None = None
        self._loss_curve: bool | None = None  # this epoch measures the returned loss (decided at the first batch)

    # ---------------------------------------------------------------------------------------- the metrics
    def bind(self, pl_module: pl.LightningModule) -> None:
        """Find the module's RankCurveMetrics, give those without ranks the eval ranks, check the others', and
        route their updates through this evaluator. Runs at setup (errors before the first training step) and
        again at each epoch start (metrics built later, e.g. in ``configure_model``)."""
        found = find_rank_metrics(pl_module)
        for name, m in found.items():
            if m.ranks is None:
                m.use_ranks(self.ranks)
                m.to(_state_device(pl_module))  # found after the module was moved (e.g. built in configure_model)
            extra = sorted(set(m.ranks) - set(self.ranks))
            if extra:
                raise ValueError(f"RankCurveMetric {name!r} tracks ranks {extra} that MatryoshkaLoRA does not evaluate "
                                 f"(eval_ranks {self.ranks}, r_max {self.r_max}): build it without ranks= (it follows "
                                 f"the callback's eval ranks) or with ranks among {self.ranks}, or add them to "
                                 f"MatryoshkaLoRA(eval_ranks=...) (each in 1…r_max).")
            m.follow(self)
        if found and self.mode == "mixed":
            raise ValueError(f"rank_eval='mixed' evaluates all eval ranks in one forward, but the module has "
                             f"RankCurveMetrics ({sorted(found)}) whose update(preds, target) cannot be split by "
                             f"rank: use rank_eval='auto' or 'sequential' (one validation pass per rank).")
        for name, m in self.metrics.items():
            if name not in found or found[name] is not m:
                m.follow(None)
        self.metrics = found
        self._module = pl_module

    def active_rank(self, name: str) -> int | None:
        """The rank a RankCurveMetric's update counts for now (``None``: Lightning's own call, not counted)."""
        if self._stage is None:
            raise RuntimeError(
                f"RankCurveMetric {name!r} got an update without a rank outside validation: MatryoshkaLoRA evaluates "
                f"ranks only in validation_step (and test_step), where it sets the model to each eval rank. Update it "
                f"there, or give the rank yourself: update(k, ...) inside `with at_rank(model, k):`.")
        if self._pass_rank is None:
            return None
        setting = get_rank(self._module)
        if isinstance(setting, torch.Tensor) or setting is None:
            raise RuntimeError(
                f"RankCurveMetric {name!r} got an update without a rank while the model runs "
                f"{'per-row ranks' if setting is not None else 'its training forward'} inside MatryoshkaLoRA's pass at "
                f"rank {self._pass_rank}: the update cannot be assigned to one rank. Leave the rank to the callback "
                f"in validation_step, or give it: update(k, ...).")
        return int(setting)

    # ------------------------------------------------------------------------------------------------ hooks
    def setup(self, pl_module: pl.LightningModule) -> None:
        self.bind(pl_module)

    def epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        self.bind(pl_module)
        self.loss = self.loss.to(_state_device(pl_module))
        for m in self._all():
            m.reset()
        self._loss_curve = None

    def _all(self) -> list[RankCurveMetric]:
        return [self.loss] + [self.metrics[n] for n in sorted(self.metrics)]

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._loss_curve is None:
            self._loss_curve = LOSS not in self.metrics and (not self.metrics or _has_loss(outputs))
        per_row = step_loss(outputs)[1] if self._loss_curve else None
        rows = batch_rows(batch)
        num_batches = trainer.num_val_batches if self._stage == "validate" else trainer.num_test_batches
        kwargs = {"dataloader_idx": dataloader_idx} if len(num_batches) > 1 else {}
        mixed = not self.metrics and (self.mode == "mixed" or (
            self.mode == "auto" and per_row is not None and rows is not None and per_row.numel() == rows
            and not self._mixed_failed))
        if mixed:
            if rows is None:
                raise ValueError("rank_eval='mixed' replicates the batch along its first dimension, but the batch's "
                                 "tensors have no common first dimension: use rank_eval='sequential'.")
            try:
                self._mixed(trainer, pl_module, batch, batch_idx, rows, kwargs)
                self.used_mixed = True
                return
            except _MixedUnsupported as err:
                if self.mode == "mixed":
                    raise ValueError(f"rank_eval='mixed' cannot run this validation_step: {err}") from None
                warnings.warn(f"MatryoshkaLoRA falls back to one validation pass per eval rank: {err}", stacklevel=2)
                self._mixed_failed = True
        self._sequential(trainer, pl_module, batch, batch_idx, rows, kwargs)
        self.used_mixed = False

    def _step(self, trainer: pl.Trainer, batch: Any, batch_idx: int, kwargs: dict[str, Any]) -> Any:
        name = STAGES[self._stage][1]
        # as Lightning calls it: batch_idx only if the step takes it (`validation_step(self, batch)` is allowed)
        args = (batch, batch_idx) if is_param_in_hook_signature(getattr(trainer.lightning_module, name), "batch_idx",
                                                                 min_args=2) else (batch,)
        return getattr(trainer.strategy, name)(*args, **kwargs)

    def _mixed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, rows: int,
               kwargs: dict[str, Any]) -> None:
        K = len(self.ranks)
        per_row_ranks = torch.tensor(self.ranks, dtype=torch.long).repeat_interleave(rows)
        big = replicate_batch(batch, K)
        try:
            with silenced(pl_module), at_rank(pl_module, per_row_ranks):
                _, per_row = step_loss(self._step(trainer, big, batch_idx, kwargs))
        except ValueError as err:
            if "per-row ranks" in str(err):  # an adapted layer saw a first dimension other than the batch's rows
                raise _MixedUnsupported(str(err)) from None
            raise
        if per_row is None or per_row.numel() != K * rows:
            raise _MixedUnsupported(f"on the replicated batch ({K} × {rows} rows) validation_step returned "
                                    f"{'no per-row loss' if per_row is None else f'{per_row.numel()} per-row losses'}"
                                    f" instead of {K * rows}.")
        means = per_row.detach().float().view(K, rows).mean(1)
        for i, k in enumerate(self.ranks):
            self.loss.update(k, means[i], rows)

    def _sequential(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                    rows: int | None, kwargs: dict[str, Any]) -> None:
        try:
            for k in self.ranks:
                self._pass_rank = k
                with silenced(pl_module), at_rank(pl_module, k):
                    out = self._step(trainer, batch, batch_idx, kwargs)
                if self._loss_curve:
                    loss, per_row = step_loss(out)
                    value = (per_row if per_row is not None else loss).detach().float().mean()
                    self.loss.update(k, value, rows or 1)
        finally:
            self._pass_rank = None

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage, self._stage = self._stage, None
        measured = ([self.loss] if self._loss_curve else []) + [self.metrics[n] for n in sorted(self.metrics)]
        curves = [m.compute() for m in measured]  # reduces across processes: every process must get here
        for m in self._all():
            m.reset()
        if trainer.sanity_checking or stage is None:
            return
        prefix = STAGES[stage][0]
        # the values are already reduced across processes (identical everywhere); sync_dist only keeps Lightning
        # from warning about unsynchronised epoch-level logging
        for curve in curves:
            aurac_key = curve.aurac_key(prefix)
            for key, value in curve.as_log_dict(prefix).items():
                pl_module.log(key, value, prog_bar=key == aurac_key, add_dataloader_idx=False, sync_dist=True)
        if stage == "test":
            self.test_curves = curves
            return
        self.history.append((trainer.current_epoch, curves))
        paths = {c.metric: self.plot_path(trainer, c.metric) for c in curves}  # log_dir is a collective under DDP
        if trainer.is_global_zero:
            for c in curves:
                self._plot(trainer, c.metric, paths[c.metric])

    def last_curves(self) -> list[RankCurve]:
        """The last validation epoch's curves, one per metric (the loss first); empty before the first epoch."""
        return list(self.history[-1][1]) if self.history else []

    def report(self, trainer: pl.Trainer | None, stage: str = "validate") -> None:
        """Print the table of the last epoch's curves with the rank advice (global rank zero only)."""
        if not self.verbose:
            return
        if stage == "test":
            curves, what = self.test_curves, "test"
        elif self.history:
            epoch, curves = self.history[-1]
            what = f"epoch {epoch}, val"
        else:
            return
        if curves:
            rank_zero_info(format_curves_table(curves, tolerance=self.tolerance, base=self.base_scores,
                                               title=f"MatryoshkaLoRA rank curves ({what}; ↓ lower is better, "
                                                     f"↑ higher is better):"))

    # ------------------------------------------------------------------------------------------------- plot
    def plot_path(self, trainer: pl.Trainer, name: str = LOSS) -> str:
        return os.path.join(trainer.log_dir or trainer.default_root_dir, f"rank_curve_{name}.png")

    def _plot(self, trainer: pl.Trainer, name: str, path: str) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        series = [(e, c) for e, curves in self.history for c in curves if c.metric == name]
        few = len(series) <= 12  # beyond that a legend hides the plot: colours go dark → bright by epoch
        fig, _ = plot_rank_curves([c.as_mapping() for _, c in series],
                                  labels=[f"epoch {e}: AURAC {c.aurac():.4g}" for e, c in series] if few else None,
                                  ylabel=f"val/{name} ({'higher' if series[-1][1].higher_is_better else 'lower'} is "
                                         f"better)",
                                  base=(self.base_scores or {}).get(name),
                                  title=f"MatryoshkaLoRA rank curve of {name}" + (
                                      "" if few else f", epochs {series[0][0]}–{series[-1][0]} (dark → bright)"))
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"val/rank_curve_{name}", fig, global_step=trainer.global_step)


def _has_loss(outputs: Any) -> bool:
    """Whether a step output holds a loss (a tensor, or a mapping with "loss"/"per_row_loss")."""
    if isinstance(outputs, Mapping):
        return "loss" in outputs or "per_row_loss" in outputs
    return isinstance(outputs, torch.Tensor)


def _state_device(pl_module: pl.LightningModule) -> torch.device:
    return pl_module.device if pl_module.device.type != "mps" else torch.device("cpu")  # float64 states


class _MixedUnsupported(Exception):
    """The one-pass evaluation cannot run this validation_step (falls back to one pass per rank)."""
