"""Nested adapters under DDP, FSDP, FSDP2 and DeepSpeed: strategy checks, injection before sharding, gathering.

The one home of everything strategy-specific:

- :func:`check_strategy`: refuses strategies the plugin cannot support, naming the supported ones.
- :func:`prepare_strategy`: adjusts a supported strategy at setup (DeepSpeed checkpoints exclude the frozen base;
  ZeRO-3 refuses a model that was materialised before the strategy could partition it).
- :func:`check_not_sharded`: the error (naming ``MatryoshkaLoRA``'s ``prepare_for_sharding``) for adapters that would be injected into an already sharded model.

Lightning is imported inside the functions that need it. The full, unsharded adapter of a sharded model
(:func:`full_adapter_state_dict`, a collective call) lives in :mod:`lightning_matlora.adapter_state` and is
re-exported here.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapter_state import clean_name, full_adapter_state_dict, is_fsdp_sharded, is_zero_param
from .inject import adapted_layers
from .zero_stage import is_deepspeed, zero_stage

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = ["SUPPORTED_STRATEGIES", "check_strategy", "prepare_strategy", "check_not_sharded", "is_deepspeed",
           "zero_stage", "clean_name", "full_adapter_state_dict"]

SUPPORTED_STRATEGIES = (
    "single device (CPU, GPU or MPS); DDP on one or many nodes (strategy='ddp', 'ddp_spawn', 'ddp_fork', "
    "'ddp_notebook' or DDPStrategy); FSDP (strategy='fsdp' or FSDPStrategy); FSDP2 (ModelParallelStrategy with "
    "fully_shard applied in configure_model); DeepSpeed ZeRO stages 1, 2 and 3 (strategy='deepspeed_stage_2', "
    "'deepspeed_stage_3', ... or DeepSpeedStrategy)")

def _supported_types() -> tuple[type, ...]:
    from lightning.pytorch.strategies import (DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy,
                                              SingleDeviceStrategy)

    return SingleDeviceStrategy, DDPStrategy, FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy


def _unsupported_types() -> tuple[type, ...]:
    # XLA strategies subclass DDP/single-device ones; per-step rank changes ("dylora", "rowwise", eval ranks) change
    # the traced graph and would recompile every step.
    from lightning.pytorch.strategies import SingleDeviceXLAStrategy, XLAStrategy

    return SingleDeviceXLAStrategy, XLAStrategy


def check_strategy(strategy: Any) -> None:
    """Raise a ``ValueError`` naming the supported strategies if ``strategy`` is not one of them (or a subclass)."""
    if isinstance(strategy, _unsupported_types()) or not isinstance(strategy, _supported_types()):
        raise ValueError(f"MatryoshkaLoRA does not support the {type(strategy).__name__} strategy. Supported: "
                         f"{SUPPORTED_STRATEGIES}.")


def prepare_strategy(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Adjust ``trainer.strategy`` for nested adapters at ``setup`` (before the model is built or wrapped).

    DeepSpeed: checkpoints exclude frozen parameters (the base is rebuilt from its own weights on resume). ZeRO-3:
    raises if ``pl_module`` already holds materialised (unpartitioned) parameters — the model must be built in
    ``configure_model``, where the strategy partitions it as it is created.
    """
    strategy = trainer.strategy
    check_strategy(strategy)
    if _is_model_parallel(strategy):
        _load_adapter_only_from_sharded_checkpoints(strategy)
    if not is_deepspeed(strategy):
        return
    if not getattr(strategy, "exclude_frozen_parameters", False):
        strategy.exclude_frozen_parameters = True
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        rank_zero_info("MatryoshkaLoRA: DeepSpeed checkpoints will exclude the frozen base "
                       "(DeepSpeedStrategy.exclude_frozen_parameters=True).")
    if zero_stage(strategy) == 3:
        full = [n for n, p in pl_module.named_parameters() if not is_zero_param(p) and p.device.type != "meta"]
        if full:
            raise ValueError(
                f"DeepSpeed ZeRO-3: the model was materialised before the strategy could partition it ({len(full)} "
                f"full parameters at setup, e.g. {full[0]!r}). Build the model inside your LightningModule's "
                f"configure_model() hook instead of __init__: Lightning runs configure_model under "
                f"deepspeed.zero.Init, so every base weight is partitioned as it is created, and MatryoshkaLoRA adds "
                f"the adapters right after, in the same context.")


def _is_model_parallel(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


# the ModelParallelStrategy instances whose load_checkpoint loads adapter-only sharded checkpoints
_PATCHED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _load_adapter_only_from_sharded_checkpoints(strategy: Any) -> None:
    """Let ``ModelParallelStrategy`` resume from a distributed checkpoint that holds only the adapter.

    Lightning loads a distributed (DCP) checkpoint by requesting every key of the model, frozen base included, and
    fails on checkpoints without the base. On this strategy instance only, sharded checkpoints are loaded by
    requesting the trainable parameters (the adapter) and the optimizer states; the base keeps the weights it was
    built with. Full single-file checkpoints keep Lightning's own path (it honours ``strict_loading=False``).
    """
    if strategy in _PATCHED:
        return
    original = strategy.load_checkpoint

    def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        from pathlib import Path

        import torch.distributed.checkpoint as dcp
        from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME, _is_sharded_checkpoint
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict, set_model_state_dict,
                                                             set_optimizer_state_dict)

        path = Path(strategy.broadcast(checkpoint_path))
        if not _is_sharded_checkpoint(path):
            return original(checkpoint_path, weights_only=weights_only)
        module = strategy.model
        state = {"state_dict": get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=True))}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=False))
        for idx, optimizer in enumerate(strategy.optimizers):
            optimizer = getattr(optimizer, "_optimizer", optimizer)
            key = f"optimizer_{idx}"
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optim_state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optim_state[key])
        return torch.load(path / _METADATA_FILENAME, weights_only=weights_only)

    strategy.load_checkpoint = load_checkpoint
    _PATCHED.add(strategy)


def check_not_sharded(pl_module: nn.Module, names: list[str]) -> None:
    """Raise if the layers just adapted (``names``) belong to a model that FSDP2/FSDP already sharded.

    Adapters created after ``fully_shard`` would not be sharded, synchronised or saved by FSDP.
    """
    if not names:
        return
    layers = adapted_layers(pl_module)
    sharded = [n for n in names if n in layers and is_fsdp_sharded(layers[n].base_layer.weight)]
    if sharded:
        raise RuntimeError(
            f"MatryoshkaLoRA would add adapters to {len(sharded)} layers that are already sharded (e.g. "
            f"{sharded[0]!r}): configure_model applied fully_shard before the adapters existed. Call "
            f"lightning_matlora.prepare_for_sharding(self) in configure_model after building the model and before "
            f"fully_shard, or build the model in __init__ and only shard it in configure_model.")
