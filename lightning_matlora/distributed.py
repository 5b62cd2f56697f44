"""Nested adapters under DDP, FSDP, FSDP2 and DeepSpeed: strategy checks, injection before sharding, gathering.

The one home of everything strategy-specific:

- :func:`check_strategy`: refuses strategies the plugin cannot support, naming the supported ones.
- :func:`prepare_strategy`: adjusts a supported strategy at setup (DeepSpeed checkpoints exclude the frozen base;
  ZeRO-3 refuses a model that was materialised before the strategy could partition it).
- :func:`check_not_sharded`: the error (naming ``MatryoshkaLoRA``'s ``prepare_for_sharding``) for adapters that would be injected into an already sharded model.
- :func:`full_adapter_state_dict`: the full, unsharded adapter on every process (a collective call).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from .inject import _owned, _saved_prefixes, adapted_layers
from .model import controller_of

SUPPORTED_STRATEGIES = (
    "single device (CPU, GPU or MPS); DDP on one or many nodes (strategy='ddp', 'ddp_spawn', 'ddp_fork', "
    "'ddp_notebook' or DDPStrategy); FSDP (strategy='fsdp' or FSDPStrategy); FSDP2 (ModelParallelStrategy with "
    "fully_shard applied in configure_model); DeepSpeed ZeRO stages 1, 2 and 3 (strategy='deepspeed_stage_2', "
    "'deepspeed_stage_3', ... or DeepSpeedStrategy)")

# `fsdp` module wrappers add these path components to parameter names; adapter keys never carry them.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


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


def is_deepspeed(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    return isinstance(strategy, DeepSpeedStrategy)


def _zero_stage(strategy: Any) -> int:
    if not is_deepspeed(strategy):
        return 0
    strategy._init_config_if_needed()
    return int((strategy.config or {}).get("zero_optimization", {}).get("stage", 0))


def _is_zero_param(t: torch.Tensor) -> bool:
    return hasattr(t, "ds_id")


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
        rank_zero_info("MatryoshkaLoRA: DeepSpeed checkpoints will exclude the frozen base "
                       "(DeepSpeedStrategy.exclude_frozen_parameters=True).")
    if _zero_stage(strategy) == 3:
        full = [n for n, p in pl_module.named_parameters() if not _is_zero_param(p) and p.device.type != "meta"]
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


def _load_adapter_only_from_sharded_checkpoints(strategy: Any) -> None:
    """Let ``ModelParallelStrategy`` resume from a distributed checkpoint that holds only the adapter.

    Lightning loads a distributed (DCP) checkpoint by requesting every key of the model, frozen base included, and
    fails on checkpoints without the base. On this strategy instance only, sharded checkpoints are loaded by
    requesting the trainable parameters (the adapter) and the optimizer states; the base keeps the weights it was
    built with. Full single-file checkpoints keep Lightning's own path (it honours ``strict_loading=False``).
    """
    if getattr(strategy, "_matlora_load_patched", False):
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
    strategy._matlora_load_patched = True


def check_not_sharded(pl_module: nn.Module, names: list[str]) -> None:
    """Raise if the layers just adapted (``names``) belong to a model that FSDP2/FSDP already sharded.

    Adapters created after ``fully_shard`` would not be sharded, synchronised or saved by FSDP.
    """
    if not names:
        return
    layers = adapted_layers(pl_module)
    sharded = [n for n in names if n in layers and _is_fsdp_sharded(layers[n].base_layer.weight)]
    if sharded:
        raise RuntimeError(
            f"MatryoshkaLoRA would add adapters to {len(sharded)} layers that are already sharded (e.g. "
            f"{sharded[0]!r}): configure_model applied fully_shard before the adapters existed. Call "
            f"lightning_matlora.prepare_for_sharding(self) in configure_model after building the model and before "
            f"fully_shard, or build the model in __init__ and only shard it in configure_model.")


def _is_fsdp_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# ------------------------------------------------------------------------------------------------- gathering
def clean_name(name: str) -> str:
    """A parameter or module name without the path components FSDP/checkpoint/compile wrappers insert."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def _module_of(target: Any) -> tuple[nn.Module, Any]:
    if isinstance(target, pl.Trainer):
        return target.lightning_module, target.strategy
    trainer = getattr(target, "_trainer", None) if isinstance(target, pl.LightningModule) else None
    return target, (trainer.strategy if trainer is not None else None)


def adapter_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(clean name, tensor) of every adapter-owned parameter and buffer of ``module``, in a fixed order, without
    calling ``state_dict`` (whose hooks would gather the whole sharded model)."""
    config = controller_of(module).config
    prefixes = [clean_name(p) for p in _saved_prefixes(module, config)]
    for name, t in module.named_parameters():
        name = clean_name(name)
        if _owned(name, prefixes):
            yield name, t
    for name, t in module.named_buffers():
        name = clean_name(name)
        if any(name.startswith(k + ".") for k in prefixes):
            yield name, t


@contextlib.contextmanager
def _gathered_zero3(params: list[torch.Tensor]) -> Iterator[None]:
    params = [p for p in params if _is_zero_param(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _fsdp1_root(strategy: Any) -> nn.Module | None:
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(strategy.model, FullyShardedDataParallel):
            return strategy.model
    return None


@torch.no_grad()
def full_adapter_state_dict(target: pl.Trainer | nn.Module) -> dict[str, torch.Tensor]:
    """The complete adapter of a model: every factor and ``modules_to_save`` tensor at its full (unsharded) shape.

    Works on a plain or DDP model, FSDP (``FSDPStrategy``), FSDP2 (``fully_shard``, DTensor parameters) and
    DeepSpeed ZeRO 1–3 (partitioned parameters are gathered with ``GatheredParameters``). Keys are module paths
    relative to ``target`` (a Trainer: its LightningModule) without wrapper prefixes, e.g.
    ``model.model.layers.0.self_attn.q_proj.lora_A``; values are detached CPU copies.

    Under a distributed strategy this is a collective: call it on every process (each gets the full dict).
    """
    module, strategy = _module_of(target)
    root = _fsdp1_root(strategy)
    if root is not None:
        return _fsdp1_adapter_state(root, module)
    items = list(adapter_tensors(module))
    out: dict[str, torch.Tensor] = {}
    with _gathered_zero3([t for _, t in items]):
        for name, t in items:
            if _is_fsdp_sharded(t):
                t = t.full_tensor()
            out[name] = t.detach().to("cpu", copy=True).contiguous()
    return out


def _fsdp1_adapter_state(root: nn.Module, module: nn.Module) -> dict[str, torch.Tensor]:
    """FSDP (v1, ``use_orig_params=True``): the sharded state dict without frozen parameters, then gathered."""
    from torch.distributed._state_dict_utils import _gather_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    keys = {n for n, _ in adapter_tensors(module)}
    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=False, ignore_frozen_params=True))
    sd = _gather_state_dict(sd)
    return {clean_name(k): v.detach().to("cpu", copy=True) for k, v in sd.items() if clean_name(k) in keys}
