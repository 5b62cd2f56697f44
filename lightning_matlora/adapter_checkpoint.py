"""`AdapterCheckpoint`: when and where a training run saves its deployable adapter (last and best).

Shaped like Lightning's ``ModelCheckpoint``: ``dirpath``, ``monitor``, ``mode``, ``save_last``, and afterwards
``last_adapter_path``, ``best_adapter_path``, ``best_score``. ``MatryoshkaLoRA(save_adapter=..., save_best=...)``
runs one inside the callback; add one to the Trainer's callbacks yourself for the other options (it then
replaces the callback's own).

Where adapters go when ``dirpath`` is not given (runs never overwrite each other):

- with a logger that versions its runs (TensorBoard, CSV): ``<trainer.log_dir>/matlora_adapter``, i.e.
  ``lightning_logs/version_N/matlora_adapter``;
- otherwise: a new ``<log_dir or default_root_dir>/matlora_adapter/version_N`` per run (N one above the largest
  existing version), chosen once per run and kept across a resume (it is part of the checkpoint state);
- the best adapter goes to the last adapter's directory name plus ``_best``.

A default directory that already holds an adapter of another run is refused before the first training step,
unless ``overwrite=True``; an explicit ``dirpath`` is the user's choice and is replaced.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from .adapter_format import as_curves, write_adapter
from .adapter_save import snapshot
from .curve import RankCurve, aurac_key

ADAPTER_DIRNAME = "matlora_adapter"
MODES = ("auto", "min", "max")


def save_from_trainer(trainer: pl.Trainer, module: nn.Module, path: str | os.PathLike, *,
                      curves: RankCurve | Sequence[RankCurve] | None = None,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Save ``module``'s adapter from inside a run: every process takes part (sharded factors are gathered),
    global rank 0 writes ``path`` (replacing an adapter there). Call it on every process. Returns the path."""
    adapter = snapshot(module, curves=curves, metadata=metadata)
    path = Path(path)
    if trainer.is_global_zero:
        write_adapter(adapter, path)
    trainer.strategy.barrier("matlora_save_adapter")
    return path


def run_curves(trainer: pl.Trainer) -> list[RankCurve]:
    """The latest measured rank curves of the run: the ``last_curves`` of every callback exposing them (the
    ``MatryoshkaLoRA`` callback does), one per metric name (the first callback's curve wins)."""
    out: dict[str, RankCurve] = {}
    for cb in trainer.callbacks:
        curves = getattr(cb, "last_curves", None)
        for c in as_curves(curves) if curves else []:
            out.setdefault(c.metric, c)
    return list(out.values())


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be 'auto' (minimise metrics whose name contains 'loss', maximise the others), "
                         f"'min' or 'max', got {mode!r}.")
    return mode


def _next_version(base: Path) -> int:
    found = [int(m.group(1)) for p in (base.iterdir() if base.is_dir() else [])
             if (m := re.fullmatch(r"version_(\d+)(_best)?", p.name))]
    return max(found) + 1 if found else 0


class AdapterCheckpoint(pl.Callback):
    """Save the run's adapter at the end of ``fit`` (``save_last``) and the best one by a monitored metric.

    Args:
        dirpath: the adapter directory; default: the run's versioned directory (see the module docstring). The
            best adapter goes to ``<dirpath>_best``.
        monitor: a logged metric (e.g. ``"val/aurac_acc"``); after each validation in ``fit`` where it improves,
            the adapter is saved to the best directory. ``None``: no best adapter.
        mode: ``"min"``, ``"max"``, or ``"auto"`` (minimise names containing "loss", maximise the others).
        save_last: save the adapter at the end of ``fit``.
        overwrite: allow replacing an adapter of another run in the default directory (an explicit ``dirpath``
            is always replaced).
        verbose: log each save.

    The saved adapters record the run's latest rank curves (``MatryoshkaLoRA.last_curves``), the global step and
    epoch, and for the best one the monitored metric and its value.

    Example:
        >>> from lightning_matlora import AdapterCheckpoint
        >>> ckpt = AdapterCheckpoint(monitor="val/aurac_acc")   # Trainer(callbacks=[MatryoshkaLoRA(...), ckpt])
        >>> ckpt.direction, ckpt.best_score, ckpt.last_adapter_path
        ('max', None, None)
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, monitor: str | None = None, mode: str = "auto",
                 save_last: bool = True, overwrite: bool = False, verbose: bool = True) -> None:
        super().__init__()
        if dirpath is not None and not (isinstance(dirpath, (str, os.PathLike)) and str(dirpath).strip()):
            raise ValueError(f"dirpath must be a non-empty directory path or None, got {dirpath!r}.")
        if monitor is not None and not (isinstance(monitor, str) and monitor):
            raise ValueError(f"monitor must be the name of a logged metric (e.g. 'val/aurac_loss') or None, got "
                             f"{monitor!r}.")
        self.dirpath = str(dirpath) if dirpath is not None else None
        self.monitor = monitor
        self.mode = check_mode(mode)
        self.save_last = bool(save_last)
        self.overwrite = bool(overwrite)
        self.verbose = verbose
        self._dir: Path | None = None  # resolved at the start of training, kept in the checkpoint state
        self._last_path: str | None = None
        self._best_path: str | None = None
        self._best_score: float | None = None

    # ------------------------------------------------------------------------------------------ read-only
    @property
    def last_adapter_path(self) -> str | None:
        """Where the end-of-fit adapter was saved (``None`` until then)."""
        return self._last_path

    @property
    def best_adapter_path(self) -> str | None:
        """Where the best adapter was saved (``None`` until one was)."""
        return self._best_path

    @property
    def best_score(self) -> float | None:
        """The monitored metric's best value so far (kept across a resume)."""
        return self._best_score

    @property
    def direction(self) -> str:
        """``"min"`` or ``"max"``: ``mode`` with ``"auto"`` resolved from the monitored name."""
        if self.mode != "auto":
            return self.mode
        return "min" if "loss" in (self.monitor or "").lower() else "max"

    def adapter_dir(self, trainer: pl.Trainer) -> Path:
        """The directory of the last adapter (resolved once per run: call it on every process)."""
        if self._dir is None:
            self._dir = self._resolve(trainer)
        return self._dir

    def best_dir(self, trainer: pl.Trainer) -> Path:
        final = self.adapter_dir(trainer)
        return final.with_name(final.name + "_best")

    # ---------------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after a checkpoint's state was restored (a resumed run keeps its directory) and before the first step
        self.adapter_dir(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        value = None if value is None else float(value.item() if isinstance(value, torch.Tensor) else value)
        if value is None or not math.isfinite(value):
            rank_zero_warn(f"AdapterCheckpoint(monitor={self.monitor!r}): the metric was not logged (or is not finite) "
                           f"in this validation (logged: {sorted(trainer.callback_metrics)}); the best adapter is not "
                           f"updated.")
            return
        best = self._best_score
        if best is not None and not (value < best if self.direction == "min" else value > best):
            return
        path = self._save(trainer, pl_module, self.best_dir(trainer), monitor=self.monitor, monitor_value=value)
        self._best_score, self._best_path = value, str(path)
        if self.verbose:
            rank_zero_info(f"MatryoshkaLoRA: {self.monitor}={value:.4g} is the best so far; saved the adapter to {path}.")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.save_last:
            return
        path = self._save(trainer, pl_module, self.adapter_dir(trainer))
        self._last_path = str(path)
        if self.verbose:
            r_max = _r_max(pl_module)
            rank_zero_info(f"MatryoshkaLoRA: saved the adapter{f' (r_max={r_max})' if r_max else ''} to {path} — "
                           f"export a rank with `matlora export {path} --rank K --out DIR`.")

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self._dir) if self._dir is not None else None, "best_score": self._best_score,
                "best_adapter_path": self._best_path, "last_adapter_path": self._last_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # a resumed run keeps its directory and its best adapter unless beaten
        if state_dict.get("dirpath") and self.dirpath is None:
            self._dir = Path(state_dict["dirpath"])
        self._best_score = state_dict.get("best_score")
        self._best_path = state_dict.get("best_adapter_path")
        self._last_path = state_dict.get("last_adapter_path")

    # ------------------------------------------------------------------------------------------ internals
    def _resolve(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        log_dir = trainer.log_dir  # a collective under DDP: every process asks
        root = Path(log_dir or trainer.default_root_dir)
        # trainer.log_dir is lightning_logs/version_N for these loggers; for others (or none) we version ourselves
        versioned = bool(trainer.loggers) and isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger))
        path, problem = root / ADAPTER_DIRNAME, None
        if trainer.is_global_zero:  # one process decides (the file system may not be shared)
            if not versioned:
                path = path / f"version_{_next_version(path)}"
            clash = [p for p in (path, path.with_name(path.name + "_best")) if p.exists()]
            if clash and not self.overwrite:
                problem = (f"{clash[0]} already holds an adapter of another run, and runs do not overwrite each other's "
                           f"adapters: use another logger version, pass an explicit directory "
                           f"(MatryoshkaLoRA(save_adapter='DIR') or AdapterCheckpoint(dirpath='DIR')), or "
                           f"AdapterCheckpoint(overwrite=True).")
        path_text, problem = trainer.strategy.broadcast((str(path), problem))
        if problem:
            raise FileExistsError(problem)
        return Path(path_text)

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Path, **extra: Any) -> Path:
        meta = {"global_step": int(trainer.global_step), "epoch": last_epoch(trainer), **extra}
        return save_from_trainer(trainer, pl_module, path, curves=run_curves(trainer), metadata=meta)


def last_epoch(trainer: pl.Trainer) -> int:
    """The 0-based index of the epoch the latest training step belongs to — the number the validation tables
    print ("epoch 5" for the last of 6 epochs) and Lightning's checkpoint names use (``epoch=5-step=…``). At the end
    of ``fit``, ``trainer.current_epoch`` has already moved on to the next epoch (6 after 6 epochs)."""
    started = trainer.fit_loop.epoch_progress.current.started
    return max(0, int(started) - 1) if started else int(trainer.current_epoch)


def _r_max(module: nn.Module) -> int | None:
    from .inject import adapted_layers

    layers = adapted_layers(module)
    return next(iter(layers.values())).r_max if layers else None


def trainer_checkpoints(callbacks: Iterable[Any]) -> list[AdapterCheckpoint]:
    """The ``AdapterCheckpoint`` callbacks among ``callbacks``."""
    return [c for c in callbacks if isinstance(c, AdapterCheckpoint)]


def callback_checkpoint(save_adapter: Any, save_best: Any, save_best_mode: str,
                        verbose: bool = True) -> AdapterCheckpoint | None:
    """The :class:`AdapterCheckpoint` that ``MatryoshkaLoRA(save_adapter=..., save_best=..., save_best_mode=...)``
    runs (``None`` when it saves nothing). ``save_best=True`` monitors the callback's ``val/aurac_loss``."""
    if isinstance(save_adapter, bool):
        dirpath = None
    elif isinstance(save_adapter, (str, os.PathLike)) and str(save_adapter).strip():
        dirpath = str(save_adapter)
    else:
        raise ValueError(f"save_adapter must be True (the run's own directory), False (do not save) or a directory "
                         f"path, got {save_adapter!r}.")
    if save_best_mode not in MODES:
        raise ValueError(f"save_best_mode must be 'auto' (minimise metrics whose name contains 'loss', maximise the "
                         f"others), 'min' or 'max', got {save_best_mode!r}.")
    if save_best is True:
        monitor = aurac_key("loss")
    elif save_best:
        monitor = str(save_best)
    else:
        monitor = None
    if save_adapter is False and monitor is None:
        return None
    return AdapterCheckpoint(dirpath=dirpath, monitor=monitor, mode=save_best_mode, save_last=save_adapter is not False,
                             verbose=verbose)
