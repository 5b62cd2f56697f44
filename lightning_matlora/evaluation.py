"""The ``MatryoshkaLoRA`` callback's rank-curve validation: every eval rank, every validation epoch.

Contract with the user's LightningModule (nothing to change in it):

1. Lightning runs ``validation_step(batch, batch_idx)`` as usual, at the model's training forward (rank setting
   ``None``); whatever it logs with ``self.log`` and whatever it returns stay the user's own.
2. Its return value must be the loss: a tensor, or a dict with ``"loss"``. A scalar is a batch mean; a 1-D tensor
   with one loss per row of the batch (or a dict with a ``"per_row_loss"`` of that shape) is *per-row*.
3. Right after, in ``on_validation_batch_end``, the callback evaluates every eval rank by calling
   ``validation_step`` again (through the strategy, as Lightning does: same precision context and model
   wrappers) with ``self.log``/``self.log_dict`` silenced and the states of the module's
   torchmetrics metrics restored afterwards:

   - *one pass* (``rank_eval="auto"`` when the step's loss is per-row, or ``"mixed"``): the batch is replicated
     once per eval rank along its first dimension, the rows of copy i run at eval rank i in one forward
     (``set_rank(model, per_row_ranks)``), and the per-row losses are averaged per rank;
   - *one pass per rank* (``"auto"`` with a scalar loss, or ``"sequential"``): ``validation_step`` runs once at
     each eval rank and its loss is that rank's point.

   Each rank's loss is averaged over the epoch weighted by batch rows (a per-row loss is first averaged over
   the batch), so both paths give the same curve for the same per-row losses.
4. At the end of the epoch the curve is reduced across processes and logged with ``pl_module.log`` as
   ``val/loss@r<k>`` (k zero-padded so names sort by rank) and ``val/aurac_loss`` (on the progress bar).

Side effects of ``validation_step`` other than ``self.log`` and torchmetrics states (appending to a list,
counters) happen once per extra call; set ``rank_eval=None`` and use :class:`RankCurveMetric` for full control.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torchmetrics import Metric

from .config import MatLoRAConfig
from .curve import format_curve_table, plot_rank_curves
from .metric import RankCurveMetric
from .control import at_rank

RANK_EVAL_MODES = ("auto", "mixed", "sequential")
PREFIX = "val"
NAME = "loss"

_HOW_TO = (
    "MatryoshkaLoRA evaluates every eval rank each validation epoch from the loss your validation_step returns. "
    "Return the loss (`return loss`, or `return {\"loss\": loss}`; a 1-D per-row loss enables the one-pass "
    "evaluation), or measure other scores yourself: build MatryoshkaLoRA(..., rank_eval=None) and, in your "
    "module, `self.curve = RankCurveMetric(MulticlassAccuracy(...), ranks=<eval ranks>)`; in validation_step "
    "`for k in self.curve.ranks: with at_rank(self, k): self.curve.update(k, preds, target)`; and in "
    "on_validation_epoch_end log `self.curve.compute()` and reset it."
)


def check_rank_eval(mode: str | None) -> str | None:
    if mode is not None and mode not in RANK_EVAL_MODES:
        raise ValueError(f"rank_eval must be one of {RANK_EVAL_MODES} or None (no per-rank validation), got "
                         f"{mode!r}.")
    return mode


def metric_name(rank: int, r_width: int, prefix: str = PREFIX, name: str = NAME) -> str:
    """``val/loss@r08``: the rank zero-padded to ``r_width`` digits so that names sort by rank."""
    return f"{prefix}/{name}@r{rank:0{r_width}d}"


def aurac_name(prefix: str = PREFIX, name: str = NAME) -> str:
    return f"{prefix}/aurac_{name}"


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


@contextlib.contextmanager
def silenced(module: pl.LightningModule) -> Iterator[None]:
    """Run user code without its ``self.log``/``self.log_dict`` reaching Lightning and with the states of the
    module's torchmetrics metrics restored afterwards."""
    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    saved = []
    for m in metrics:
        state = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else
                     [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in v])
                 for k, v in m.metric_state.items()}
        saved.append((m, state, getattr(m, "_update_count", None), getattr(m, "_computed", None)))
    patched = {}
    for name in ("log", "log_dict"):
        patched[name] = module.__dict__.get(name)
        object.__setattr__(module, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        for name, previous in patched.items():
            if previous is None:
                del module.__dict__[name]
            else:
                object.__setattr__(module, name, previous)
        for m, state, count, computed in saved:
            for k, v in state.items():
                setattr(m, k, v)
            if count is not None:
                m._update_count = count
            m._computed = computed


# ------------------------------------------------------------------------------------------- the evaluator
class RankCurveValidation:
    """Evaluates every eval rank during validation and reports the curve (driven by ``MatryoshkaLoRA``'s hooks).

    Args:
        config: the adapter's config (``eval_ranks`` are the curve's ranks).
        mode: ``"auto"``, ``"mixed"`` (always one pass), ``"sequential"`` (one pass per rank); see the module doc.
        tolerance: relative tolerance of the rank advice printed with the table.
        verbose: print the table at the end of ``fit``/``validate``.
    """

    def __init__(self, config: MatLoRAConfig, mode: str = "auto", tolerance: float = 0.01,
                 verbose: bool = True) -> None:
        self.mode = check_rank_eval(mode)
        self.ranks = list(config.eval_ranks)
        self.width = len(str(max(self.ranks)))
        self.tolerance = tolerance
        self.verbose = verbose
        self.metric = RankCurveMetric(ranks=self.ranks, higher_is_better=False)
        self.history: list[tuple[int, dict[int, float], float]] = []  # (epoch, curve, aurac)
        self.used_mixed: bool | None = None  # which path the last batch took (for tests and the table)
        self._mixed_failed = False

    # ------------------------------------------------------------------------------------------------ hooks
    def epoch_start(self, pl_module: pl.LightningModule) -> None:
        device = pl_module.device if pl_module.device.type != "mps" else torch.device("cpu")  # float64 states
        self.metric = self.metric.to(device)
        self.metric.reset()

    def batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                  batch_idx: int, dataloader_idx: int = 0) -> None:
        _, per_row = step_loss(outputs)
        rows = batch_rows(batch)
        kwargs = {"dataloader_idx": dataloader_idx} if len(trainer.num_val_batches) > 1 else {}
        mixed = self.mode == "mixed" or (self.mode == "auto" and per_row is not None and rows is not None
                                          and per_row.numel() == rows and not self._mixed_failed)
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

    def _mixed(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, rows: int,
               kwargs: dict[str, Any]) -> None:
        K = len(self.ranks)
        per_row_ranks = torch.tensor(self.ranks, dtype=torch.long).repeat_interleave(rows)
        big = replicate_batch(batch, K)
        try:
            with silenced(pl_module), at_rank(pl_module, per_row_ranks):
                _, per_row = step_loss(trainer.strategy.validation_step(big, batch_idx, **kwargs))
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
            self.metric.update(k, means[i], rows)

    def _sequential(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                    rows: int | None, kwargs: dict[str, Any]) -> None:
        for k in self.ranks:
            with silenced(pl_module), at_rank(pl_module, k):
                loss, per_row = step_loss(trainer.strategy.validation_step(batch, batch_idx, **kwargs))
            value = (per_row if per_row is not None else loss).detach().float().mean()
            self.metric.update(k, value, rows or 1)

    def epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        result = self.metric.compute()  # reduces across processes: every process must get here
        self.metric.reset()
        if trainer.sanity_checking:
            return
        curve = {k: float(v) for k, v in result["curve"].items()}
        area = float(result["aurac"])
        # the values are already reduced across processes (identical everywhere); sync_dist only keeps Lightning
        # from warning about unsynchronised epoch-level logging
        for k in self.ranks:
            pl_module.log(metric_name(k, self.width), curve[k], add_dataloader_idx=False, sync_dist=True)
        pl_module.log(aurac_name(), area, prog_bar=True, add_dataloader_idx=False, sync_dist=True)
        self.history.append((trainer.current_epoch, curve, area))
        path = self.plot_path(trainer)  # trainer.log_dir is a collective under DDP: every process asks
        if trainer.is_global_zero:
            self._plot(trainer, path)

    def last_curve(self) -> dict[str, Any] | None:
        """The last validation epoch's curve as ``{"metric": "val/loss", "ranks": [...], "scores": [...]}``
        (what a saved adapter records); ``None`` before the first epoch."""
        if not self.history:
            return None
        curve = self.history[-1][1]
        return {"metric": f"{PREFIX}/{NAME}", "ranks": list(curve), "scores": list(curve.values())}

    def last_aurac(self) -> float | None:
        """The last epoch's AURAC; ``None`` before the first epoch or when it is not finite (a NaN rank)."""
        if not self.history or not math.isfinite(self.history[-1][2]):
            return None
        return self.history[-1][2]

    def report(self, trainer: pl.Trainer) -> None:
        """Print the table of the last epoch's curve with the rank advice (global rank zero only)."""
        if not self.history or not self.verbose:
            return
        epoch, curve, _ = self.history[-1]
        rank_zero_info(format_curve_table(
            curve, name=f"{PREFIX}/{NAME}", higher_is_better=False, tolerance=self.tolerance,
            title=f"MatryoshkaLoRA rank curve after epoch {epoch} ({PREFIX}/{NAME}, lower is better):"))

    # ------------------------------------------------------------------------------------------------- plot
    def plot_path(self, trainer: pl.Trainer) -> str:
        return os.path.join(trainer.log_dir or trainer.default_root_dir, f"rank_curve_{NAME}.png")

    def _plot(self, trainer: pl.Trainer, path: str) -> None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return
        few = len(self.history) <= 12  # beyond that a legend hides the plot: colours go dark → bright by epoch
        fig, _ = plot_rank_curves([c for _, c, _ in self.history],
                                  labels=[f"epoch {e}: AURAC {a:.4g}" for e, _, a in self.history] if few else None,
                                  ylabel=f"{PREFIX}/{NAME}",
                                  title="MatryoshkaLoRA rank curve" + ("" if few else
                                                                       f", epochs {self.history[0][0]}–"
                                                                       f"{self.history[-1][0]} (dark → bright)"))
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"{PREFIX}/rank_curve_{NAME}", fig, global_step=trainer.global_step)


class _MixedUnsupported(Exception):
    """The one-pass evaluation cannot run this validation_step (falls back to one pass per rank)."""

