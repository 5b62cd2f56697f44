"""The `MatryoshkaLoRA` Lightning callback: adapt, freeze, train nested ranks, keep checkpoints small."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from .adapter_checkpoint import AdapterCheckpoint, callback_checkpoint, trainer_checkpoints
from .config import CallbackSettings, MatLoRAConfig, fields_with_role, legacy_values, options_doc
from .curve import RankCurve
from .rank_validation import RankCurveValidation, check_rank_eval
from .distributed import check_not_sharded, clean_name, is_deepspeed, prepare_strategy
from .adapted_model import combine_pass_losses, controller_of, model_state_of, pass_loss, run_paired_passes
from .isolation import isolated
from .quantized import check_strategy_for_quantized
from .inject import adapted_layers, freeze_base, inject, linear_layer_names, no_match_message
from .model_state import ModelState
from .rank import RankController
from .summary import format_summary

_WRAPPED = "_matlora_wrapped_hooks"


class MatryoshkaLoRA(pl.Callback):
    """Train a nested LoRA adapter: any prefix rank k ≤ ``r_max`` of it is a usable adapter.

    At ``setup`` (and again after the module's ``configure_model``, for models built there) the targeted layers
    are replaced by :class:`~lightning_matlora.MatryoshkaLinear`, every base parameter is frozen and the
    training diagonal P is built. The user's LightningModule needs no changes.

    {options}

    Example: adapt without a Trainer (a Trainer does the same at ``setup``)::

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> cb = MatryoshkaLoRA(r_max=8, mode="matryoshka", verbose=False)
    >>> cb.apply(model)
    ['0', '2']
    >>> cb.config.ranks, [round(float(v), 4) for v in cb.p[[0, 1, 2, 4]]]
    ([1, 2, 4, 8], [2.5607, 1.5607, 0.8536, 0.3536])
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)   # only the factors train
    416
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the arguments are the fields of MatLoRAConfig and CallbackSettings (see _signature(), the one list)
        bound = _SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        super().__init__()
        self.config = MatLoRAConfig(**{f.name: values[f.name] for f in dataclasses.fields(MatLoRAConfig)})
        self.settings = CallbackSettings(**{f.name: values[f.name] for f in dataclasses.fields(CallbackSettings)})
        self.controller = RankController(self.config)
        self._setting_before: Any = None  # the rank setting a validate/test/predict run gives back (see setup)
        self.verbose = verbose = self.settings.verbose
        self.adapted: list[str] = []
        self.save_adapter, self.save_best, self.save_best_mode = (self.settings.save_adapter, self.settings.save_best,
                                                                  self.settings.save_best_mode)
        # the saving policy (see lightning_matlora.adapter_checkpoint); None when nothing is saved
        self._saver: AdapterCheckpoint | None = callback_checkpoint(self.save_adapter, self.save_best,
                                                                    self.save_best_mode, verbose)
        self._saver_active = True  # False when the Trainer has its own AdapterCheckpoint
        rank_eval = self.settings.rank_eval
        self.rank_eval = (RankCurveValidation(self.config, rank_eval, verbose=verbose,
                                              base_scores=self.settings.base_scores)
                          if check_rank_eval(rank_eval) is not None else None)

    # ----------------------------------------------------------------------------------------- public API
    @property
    def p(self) -> torch.Tensor:
        """The training diagonal (float64, length r_max)."""
        return self.controller.p

    @property
    def last_curves(self) -> list[RankCurve]:
        """The last validation epoch's rank curves, one :class:`~lightning_matlora.RankCurve` per metric (the loss
        curve first, then the module's ``RankCurveMetric``s by name); an empty list before the first epoch or
        with ``rank_eval=None``. The adapter saved at the end of ``fit`` records them."""
        return self.rank_eval.last_curves() if self.rank_eval is not None else []

    @property
    def last_test_curves(self) -> list[RankCurve]:
        """The last ``trainer.test`` run's rank curves (logged as ``test/<name>@r<k>``); empty before any."""
        return list(self.rank_eval.test_curves) if self.rank_eval is not None else []

    @property
    def base_scores(self) -> dict[str, float] | None:
        """The base model's scores by curve name, shown in the rank-curve table (a ``base`` row) and plots (a line);
        settable during the run, e.g. once measured in the module's ``on_fit_start``."""
        return self.settings.base_scores

    @base_scores.setter
    def base_scores(self, scores: dict[str, float] | None) -> None:
        self.settings.base_scores = dict(scores) if scores is not None else None
        if self.rank_eval is not None:
            self.rank_eval.base_scores = self.settings.base_scores

    @property
    def adapter_path(self) -> str | None:
        """Where the adapter was saved at the end of ``fit`` (``None`` before, or when not saved)."""
        return self._saver.last_adapter_path if self._saver is not None else None

    @property
    def best_adapter_path(self) -> str | None:
        """Where the best adapter (``save_best``) was saved last (``None`` if none was)."""
        return self._saver.best_adapter_path if self._saver is not None else None

    @property
    def best_score(self) -> float | None:
        """The best value of the ``save_best`` metric so far (kept across a resume)."""
        return self._saver.best_score if self._saver is not None else None

    def apply(self, module: nn.Module) -> list[str]:
        """Adapt ``module`` without a Trainer: inject, freeze the base, return the adapted layers' names.

        Raises if ``target_modules`` matches nothing (listing the layers that exist) or if ``module`` is already
        adapted by another MatryoshkaLoRA.
        """
        names = self._inject(module)
        if not adapted_layers(module):
            raise ValueError(no_match_message(module, self.config))
        self._finish(module, announce=bool(names))
        return names

    # -------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # already adapted by us (fit then validate with the same trainer, or `.apply(module)` before the fit):
        # skip the injection, but checkpoints must still load as adapter-only below
        check_strategy_for_quantized(trainer.strategy, pl_module)  # FSDP/ZeRO-3 cannot shard a quantized base
        if not self._owns(pl_module):
            prepare_strategy(trainer, pl_module)  # refuses unsupported strategies and ZeRO-3 on a materialised model
            self._inject(pl_module)
            builds_later = _overrides(pl_module, "configure_model")
            if builds_later:
                _wrap_hook(pl_module, "configure_model", after=lambda: self._after_configure_model(pl_module))
            elif not adapted_layers(pl_module):
                hint = ("" if linear_layer_names(pl_module) else
                        " If your LightningModule builds its model in `setup()`, build it in `configure_model()` "
                        "instead: Lightning calls callbacks' setup before the module's, and MatryoshkaLoRA adapts "
                        "models built in configure_model right after that hook.")
                raise ValueError(no_match_message(pl_module, self.config) + hint)
            if adapted_layers(pl_module):
                self._finish(pl_module)
        if self.rank_eval is not None:  # the module's RankCurveMetrics: checked before the first step
            self.rank_eval.bind(pl_module)
        if self.config.max_pass and stage == "fit" and pl_module.automatic_optimization:
            # manual optimization: the user's training_step calls paired_loss itself (a step that does not trains
            # the one-pass approximation and warns, naming paired_loss)
            _wrap_training_step(pl_module)
        _wrap_hook(pl_module, "on_load_checkpoint", before=lambda ckpt: self._check_checkpoint(pl_module, ckpt))
        # checkpoints hold only the adapter, so loading them must not demand the frozen base's keys
        pl_module.strict_loading = False
        # validate/test/predict give the model back at the rank setting it had (a rank, a rank per layer): the
        # per-rank passes change it and teardown restores it; fit leaves it at the training forward
        self._setting_before = self.controller.setting if stage != "fit" and self._owns(pl_module) else None

    def _after_configure_model(self, pl_module: pl.LightningModule) -> None:
        check_strategy_for_quantized(pl_module.trainer.strategy, pl_module)
        names = self._inject(pl_module)
        check_not_sharded(pl_module, names)  # fully_shard ran before the adapters existed
        if not adapted_layers(pl_module):
            raise ValueError(no_match_message(pl_module, self.config))
        # freeze whatever configure_model built; announce only layers this hook adapted (no second summary)
        self._finish(pl_module, announce=bool(names))

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        merged = model_state_of(pl_module).merged_rank
        if merged is not None:
            raise RuntimeError(f"The model is merged at rank {merged}: a merged adapter does not train. Call "
                               f"lightning_matlora.unmerge(model) before trainer.fit.")
        if self.rank_eval is not None:  # RankCurveMetrics built in configure_model
            self.rank_eval.bind(pl_module)
        if not is_deepspeed(trainer.strategy):  # DeepSpeed builds its optimizer from the trainable parameters only
            _drop_frozen_from_optimizers(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._saver is None:
            return
        own = trainer_checkpoints(trainer.callbacks)
        self._saver_active = not own
        if own:
            rank_zero_info("MatryoshkaLoRA: the Trainer has an AdapterCheckpoint, which saves the adapter; the "
                           "callback's own save_adapter/save_best settings are not used.")
        else:
            self._saver.on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.controller.setting is not None:
            self.controller.set(None)
        if self.controller.num_processes != trainer.world_size:
            self.controller.set_process(trainer.global_rank, trainer.world_size)
        self.controller.begin_step(trainer.global_step, batch_idx)

    # per-rank validation and test: lightning_matlora.rank_validation (one hook serves both stages)
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rank_eval is not None:
            self.rank_eval.epoch_start(trainer, pl_module, "test" if trainer.testing else "validate")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.rank_eval is not None:
            self.rank_eval.batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rank_eval is not None:
            self.rank_eval.epoch_end(trainer, pl_module)
            if trainer.testing:
                self.rank_eval.report(trainer, "test")

    on_test_epoch_start = on_validation_epoch_start
    on_test_batch_end = on_validation_batch_end
    on_test_epoch_end = on_validation_epoch_end

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rank_eval is not None and trainer.state.fn == "validate":
            self.rank_eval.report(trainer)
        if self._saver is not None and self._saver_active:
            self._saver.on_validation_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.rank_eval is not None:
            self.rank_eval.report(trainer)
        if self._saver is not None and self._saver_active:
            self._saver.on_fit_end(trainer, pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        if state:  # DeepSpeed writes its own shards and no "state_dict" here
            keep = _owned_keys(pl_module)
            checkpoint["state_dict"] = {k: v for k, v in state.items() if clean_name(k) in keep}

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.controller.set(self._setting_before if stage != "fit" else None)
        self._setting_before = None

    def state_dict(self) -> dict[str, Any]:
        state = {"config": self.config.to_dict(), "adapted": list(self.adapted)}
        if self._saver is not None:
            state["adapter_checkpoint"] = self._saver.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._check_config(state_dict.get("config", {}))
        if self._saver is not None:  # a resumed run keeps its adapter directory and its best score unless beaten
            saved = state_dict.get("adapter_checkpoint")
            if saved is None and "best_score" in state_dict:  # checkpoints of lightning_matlora 0.1
                saved = {"best_score": state_dict["best_score"]}
            self._saver.load_state_dict(saved or {})

    # ---------------------------------------------------------------------------------------- internals
    def _owns(self, module: nn.Module) -> bool:
        layers = adapted_layers(module)
        return bool(layers) and all(m.controller is self.controller for m in layers.values())

    def _inject(self, module: nn.Module) -> list[str]:
        state = ModelState.of_controller(self.controller)
        if state is not None and state.layers and not adapted_layers(module):
            # this callback already adapted another model: the new one gets a controller of its own
            self.controller = RankController(self.config)
        return inject(module, self.config, self.controller)

    def _finish(self, module: nn.Module, announce: bool = True) -> None:
        freeze_base(module, self.config)
        self.adapted = sorted(adapted_layers(module))
        if self.verbose and announce:
            rank_zero_info(format_summary(module, self.config, self.adapted))

    def _check_config(self, saved: dict[str, Any]) -> None:
        if not saved:
            return
        mine = self.config.to_dict()
        if saved.get("r_max") != mine["r_max"]:
            raise ValueError(f"The checkpoint's adapter has r_max={saved.get('r_max')} but this MatryoshkaLoRA has "
                             f"r_max={mine['r_max']}: resume with MatryoshkaLoRA(r_max={saved.get('r_max')}, ...) "
                             f"(the same settings as the run that wrote the checkpoint).")
        for field in fields_with_role("adapter"):
            a, b = _norm(saved.get(field)), _norm(mine[field])
            if a != b:
                raise ValueError(f"The checkpoint's adapter was built with {field}={saved.get(field)!r} but this "
                                 f"MatryoshkaLoRA has {field}={mine[field]!r}: resume with the same {field}.")
        # fields added later: a checkpoint without one was trained with its legacy value
        legacy = legacy_values()
        changed = [f for f in fields_with_role("objective") if _norm(saved.get(f, legacy.get(f))) != _norm(mine[f])]
        if changed:
            warnings.warn(f"Resuming with a different training objective than the checkpoint's ({', '.join(changed)} "
                          f"changed): the adapter continues training under the new settings.", stacklevel=2)

    def _check_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("config")
        if saved:
            self._check_config(saved)
        state = checkpoint.get("state_dict")
        if state is None:
            return
        expected = _owned_keys(pl_module)
        missing = sorted(expected - {clean_name(k) for k in state})
        if missing:
            raise ValueError(f"The checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]!r}): it was not "
                             f"written by a run with this MatryoshkaLoRA configuration and target layers; resuming "
                             f"would leave those layers untrained. Use the matching configuration.")
        foreign = sorted(k for k in state
                         if clean_name(k) not in expected and (k.endswith(".lora_A") or k.endswith(".lora_B")))
        if foreign:
            raise ValueError(f"The checkpoint holds {len(foreign)} adapter tensors this model has no layer for (e.g. "
                             f"{foreign[0]!r}): the target_modules differ from the run that wrote it.")


def _owned_keys(pl_module: nn.Module) -> set[str]:
    """The state-dict keys of the tensors the adapter owns, without the components wrappers insert."""
    return {clean_name(k) for k, _ in model_state_of(pl_module).owned_tensors(pl_module)}


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def _overrides(pl_module: pl.LightningModule, name: str) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden(name, pl_module)


def _wrap_hook(pl_module: nn.Module, name: str, before: Callable | None = None, after: Callable | None = None) -> None:
    """Run ``before(*args)`` / ``after()`` around the module's hook ``name``, on this instance only (idempotent)."""
    wrapped: set[str] = pl_module.__dict__.setdefault(_WRAPPED, set())
    if name in wrapped:
        return
    original = getattr(pl_module, name)

    @functools.wraps(original)
    def hook(*args: Any, **kwargs: Any) -> Any:
        if before is not None:
            before(*args, **kwargs)
        out = original(*args, **kwargs)
        if after is not None:
            after()
        return out

    object.__setattr__(pl_module, name, hook)
    wrapped.add(name)


def _wrap_training_step(pl_module: pl.LightningModule) -> None:
    """Make the module's ``training_step`` (this instance only, idempotent) a ``max_pass`` step: the user's step runs
    in the max pass, then again on the same batch in the low pass, isolated (:func:`~lightning_matlora.isolation.
    isolated`: its ``self.log`` calls dropped, its torchmetrics updates discarded), and returns the combination of
    both (see :func:`_combine_passes`). Lightning's DDP/FSDP/DeepSpeed
    wrappers call the module's ``training_step`` attribute, so they run this one."""
    wrapped: set[str] = pl_module.__dict__.setdefault(_WRAPPED, set())
    if "training_step" in wrapped:
        return
    original = pl_module.training_step

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        state = model_state_of(pl_module)
        ctrl = state.controller
        if not ctrl.config.max_pass:  # another callback's adapter on the same module
            return original(*args, **kwargs)
        high, low, kl = run_paired_passes(state, lambda: original(*args, **kwargs),
                                          low_context=lambda: isolated(pl_module))
        return _combine_passes(pl_module, high, low, kl, ctrl.config.distill)

    object.__setattr__(pl_module, "training_step", training_step)
    wrapped.add("training_step")


def _combine_passes(pl_module: pl.LightningModule, high: Any, low: Any, kl: torch.Tensor | None = None,
                    weight: float = 0.0) -> Any:
    """The value of a ``max_pass`` step from the max pass's output ``high`` and the low pass's ``low``: a tensor →
    the paired loss (:func:`~lightning_matlora.adapted_model.combine_pass_losses`); a dict → ``high`` with ``"loss"``
    replaced by it; ``None`` from either pass → ``None`` (the step is skipped). Logs the low pass's loss as
    ``train/loss_low_ranks`` and ``kl`` as ``train/distill_kl``."""
    if high is None or low is None:
        return None
    high_loss, low_loss = pass_loss(high, "max"), pass_loss(low, "low")
    pl_module.log("train/loss_low_ranks", low_loss.detach())
    if kl is not None:
        pl_module.log("train/distill_kl", kl.detach())
    loss = combine_pass_losses(high_loss, low_loss, kl, weight)
    if isinstance(high, dict):
        return {**high, "loss": loss}
    return loss


def _drop_frozen_from_optimizers(trainer: pl.Trainer) -> None:
    """Remove frozen parameters from the optimizers' param groups (the user may pass ``self.parameters()``)."""
    for opt in trainer.optimizers:
        opt = getattr(opt, "optimizer", opt)  # LightningOptimizer
        if not isinstance(opt, torch.optim.Optimizer):
            continue
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
        if not any(group["params"] for group in opt.param_groups):
            raise ValueError("The optimizer holds no trainable parameter after MatryoshkaLoRA froze the base: build it "
                             "from self.parameters() (or the adapter's parameters) in configure_optimizers.")


def prepare_for_sharding(pl_module: pl.LightningModule) -> list[str]:
    """Add the Trainer's MatryoshkaLoRA adapters to ``pl_module`` now, inside ``configure_model``, before sharding.

    Call it after building the model and before ``fully_shard`` (FSDP2 / ``ModelParallelStrategy``)::

        def configure_model(self):
            self.model = build_model()
            lightning_matlora.prepare_for_sharding(self)
            for block in self.model.model.layers:
                fully_shard(block, mesh=self.device_mesh["data_parallel"])
            fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    Returns the names of the adapted layers. Raises if the module has no Trainer with a MatryoshkaLoRA callback;
    outside a Trainer it says what to do instead:

    >>> prepare_for_sharding(pl.LightningModule())
    Traceback (most recent call last):
      ...
    RuntimeError: prepare_for_sharding(module) adds the adapters of the Trainer's MatryoshkaLoRA callback: ...
    """
    trainer = getattr(pl_module, "_trainer", None)
    callbacks = [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, MatryoshkaLoRA)]
    if not callbacks:
        raise RuntimeError("prepare_for_sharding(module) adds the adapters of the Trainer's MatryoshkaLoRA callback: "
                           "call it inside configure_model of a module run by a Trainer(callbacks=[MatryoshkaLoRA("
                           "...)]). Without a Trainer, adapt the model with MatryoshkaLoRA(...).apply(model).")
    if len(callbacks) > 1:
        raise RuntimeError(f"The Trainer has {len(callbacks)} MatryoshkaLoRA callbacks; use one.")
    return callbacks[0].apply(pl_module)


def _signature() -> inspect.Signature:
    """``MatryoshkaLoRA(...)``'s signature, derived from the fields of :class:`MatLoRAConfig` and
    :class:`CallbackSettings` (names, types, defaults; LightningCLI reads it). The adapter fields that adapter
    files had from the start may be given by position; the fields added later and the callback's own settings are
    keyword-only."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for cls in (MatLoRAConfig, CallbackSettings):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            positional = cls is MatLoRAConfig and f.name not in legacy_values()
            kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if positional else inspect.Parameter.KEYWORD_ONLY
            params.append(inspect.Parameter(f.name, kind, default=f.default, annotation=hints[f.name]))
    return inspect.Signature(params, return_annotation=None)


MatryoshkaLoRA.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
_SIGNATURE = inspect.signature(MatryoshkaLoRA)  # without self
MatryoshkaLoRA.__doc__ = (MatryoshkaLoRA.__doc__ or "").replace(
    "{options}", options_doc(MatLoRAConfig, CallbackSettings).replace("\n", "\n    "))
