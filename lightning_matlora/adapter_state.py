"""The tensors a model's adapter owns, by clean name, and their full (unsharded) copy.

Plain torch: saving an adapter imports this module, never Lightning. Under a Lightning strategy (FSDP, FSDP2,
DeepSpeed ZeRO) the gathering imports what it needs when it runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .adapted_model import model_state_of

if TYPE_CHECKING:
    import lightning.pytorch as pl

# `fsdp` module wrappers add these path components to parameter names; adapter keys never carry them.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")



def is_zero_param(t: torch.Tensor) -> bool:
    """Whether ``t`` is a parameter that DeepSpeed ZeRO partitions (it carries a ``ds_id``)."""
    return hasattr(t, "ds_id")


def is_fsdp_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is sharded by FSDP2 (a ``DTensor``)."""
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def clean_name(name: str) -> str:
    """A parameter or module name without the path components FSDP/checkpoint/compile wrappers insert."""
    return ".".join(p for p in name.split(".") if p not in _WRAPPER_PARTS)


def _module_of(target: Any) -> tuple[nn.Module, Any]:
    """(module, its Lightning strategy or None) of a Trainer, a LightningModule or a plain module. Read by attribute
    (a Trainer has ``lightning_module``; a LightningModule run by one has ``_trainer``), so that plain torch needs
    no Lightning."""
    if not isinstance(target, nn.Module) and hasattr(target, "lightning_module"):
        return target.lightning_module, target.strategy
    trainer = getattr(target, "_trainer", None)
    return target, (getattr(trainer, "strategy", None) if trainer is not None else None)


def adapter_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(clean name, tensor) of every adapter-owned tensor of ``module`` (:meth:`ModelState.owned_tensors`), in a
    fixed order, without calling ``state_dict`` (whose hooks would gather the whole sharded model)."""
    for name, t in model_state_of(module).owned_tensors(module):
        yield clean_name(name), t


@contextlib.contextmanager
def _gathered_zero3(params: list[torch.Tensor]) -> Iterator[None]:
    params = [p for p in params if is_zero_param(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def _fsdp1_root(strategy: Any) -> nn.Module | None:
    if strategy is None:
        return None
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy) and strategy.model is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(strategy.model, FullyShardedDataParallel):
            return strategy.model
    return None


@torch.no_grad()
def full_adapter_state_dict(target: "pl.Trainer | nn.Module") -> dict[str, torch.Tensor]:
    """The complete adapter of a model: every factor and ``modules_to_save`` tensor at its full (unsharded) shape.

    Works on a plain or DDP model, FSDP (``FSDPStrategy``), FSDP2 (``fully_shard``, DTensor parameters) and
    DeepSpeed ZeRO 1–3 (partitioned parameters are gathered with ``GatheredParameters``). Keys are module paths
    relative to ``target`` (a Trainer: its LightningModule) without wrapper prefixes, e.g.
    ``model.model.layers.0.self_attn.q_proj.lora_A``; values are detached CPU copies.

    Under a distributed strategy this is a collective: call it on every process (each gets the full dict).

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    >>> {k: tuple(v.shape) for k, v in full_adapter_state_dict(model).items()}
    {'0.lora_A': (4, 8), '0.lora_B': (8, 4), '2.lora_A': (4, 8), '2.lora_B': (2, 4)}
    """
    module, strategy = _module_of(target)
    root = _fsdp1_root(strategy)
    if root is not None:
        return _fsdp1_adapter_state(root, module)
    items = list(adapter_tensors(module))
    out: dict[str, torch.Tensor] = {}
    with _gathered_zero3([t for _, t in items]):
        for name, t in items:
            if is_fsdp_sharded(t):
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
