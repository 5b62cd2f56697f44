"""Choosing the layers to adapt (PEFT's conventions), replacing them, and freezing the base."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .config import DTYPES, MatLoRAConfig
from .layer import MatryoshkaLinear, is_supported
from .rank import RankController


def _matches(name: str, spec: str | Sequence[str] | None) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list holds names or name suffixes."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the model's output head (never adapted under ``"all-linear"``, as in PEFT)."""
    heads: list[nn.Module] = []
    for module in model.modules():  # the model itself or transformers models held inside a LightningModule
        get = getattr(module, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except Exception:
                head = None
            if isinstance(head, nn.Module):
                heads.append(head)
    return {n for n, m in model.named_modules() if any(m is h for h in heads)}


def adapted_layers(model: nn.Module) -> dict[str, MatryoshkaLinear]:
    """Every ``MatryoshkaLinear`` in ``model`` by its module name (names include ``.base_layer``-free paths)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MatryoshkaLinear)}


def find_targets(model: nn.Module, config: MatLoRAConfig) -> list[str]:
    """Names of the modules that ``config`` selects for adaptation (not yet adapted ones only).

    Raises ``TypeError`` if a name-matched module is not a supported layer type.
    """
    heads = output_head_names(model)
    saved = config.modules_to_save or []
    inside_saved: set[str] = set()
    for name, _ in model.named_modules():
        if name and _matches(name, saved):
            inside_saved.add(name)
    bypassed = _bypassed_layers(model)
    selected = []
    for name, module in model.named_modules():
        if not name or isinstance(module, MatryoshkaLinear) or ".base_layer" in name or name.endswith("base_layer"):
            continue
        if any(name == s or name.startswith(s + ".") for s in inside_saved):
            continue
        if _matches(name, config.exclude_modules):
            continue
        if config.target_modules == "all-linear":
            if is_supported(module) and name not in heads and name not in bypassed:
                selected.append(name)
            continue
        if _matches(name, config.target_modules):
            if not is_supported(module):
                raise TypeError(_unsupported(name, module))
            if name in bypassed:
                raise TypeError(f"target_modules selects {name!r}, a linear layer inside {bypassed[name]}, which "
                                f"reads its weight directly instead of calling it, so an adapter there would never "
                                f"run: narrow target_modules (or add {name!r} to exclude_modules).")
            selected.append(name)
    return selected


def _bypassed_layers(model: nn.Module) -> dict[str, str]:
    """Linear layers whose parent uses their weight without calling them (``nn.MultiheadAttention.out_proj``),
    by name → the parent's type name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for child_name, _ in module.named_children():
                out[f"{name}.{child_name}" if name else child_name] = type(module).__name__
    return out


def _unsupported(name: str, module: nn.Module) -> str:
    return (f"target_modules selects {name!r}, a {type(module).__name__}, but only nn.Linear and transformers' Conv1D "
            f"can be adapted: narrow target_modules (or add {name!r} to exclude_modules).")


def linear_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and is_supported(m)]


def no_match_message(model: nn.Module, config: MatLoRAConfig) -> str:
    names = linear_layer_names(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
    return (f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) matches no "
            f"adaptable layer. Adaptable layers: {shown or 'none'}. Their name suffixes: {suffixes}. "
            f"Use 'all-linear', a list of suffixes such as {suffixes[:2]}, or a regex on full names.")


def inject(model: nn.Module, config: MatLoRAConfig, controller: RankController) -> list[str]:
    """Replace every selected layer of ``model`` by a ``MatryoshkaLinear`` sharing ``controller``.

    Returns the names of the newly adapted layers (may be empty: the caller decides whether that is an error).
    Raises if ``model`` already holds adapters of a different controller.
    """
    existing = adapted_layers(model)
    foreign = [n for n, m in existing.items() if m.controller is not controller]
    if foreign:
        raise RuntimeError(f"The model is already adapted ({len(foreign)} MatryoshkaLinear layers, e.g. {foreign[0]!r}) "
                           f"by another MatryoshkaLoRA: adapt a fresh base model, or load the adapter with "
                           f"load_adapter() instead of applying a second one.")
    dtype = DTYPES[config.adapter_dtype] if config.adapter_dtype else None
    names = find_targets(model, config)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        setattr(parent, child, MatryoshkaLinear(base, controller, dropout=config.dropout, adapter_dtype=dtype))
    return names


def is_adapter_parameter(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B") or name in ("lora_A", "lora_B")


def _owned(name: str, saved_prefixes: list[str]) -> bool:
    return is_adapter_parameter(name) or any(name.startswith(k + ".") for k in saved_prefixes)


def _saved_prefixes(model: nn.Module, config: MatLoRAConfig) -> list[str]:
    saved = config.modules_to_save or []
    return [n for n, _ in model.named_modules() if n and _matches(n, saved)]


def adapter_parameter_names(model: nn.Module, config: MatLoRAConfig) -> list[str]:
    """Names of the parameters a nested adapter owns: the factors and the parameters of ``modules_to_save``."""
    prefixes = _saved_prefixes(model, config)
    # remove_duplicate=False: a tied parameter (GPT-2's lm_head.weight is wte.weight) is listed under every name
    return [n for n, _ in model.named_parameters(remove_duplicate=False) if _owned(n, prefixes)]


def adapter_state_keys(model: nn.Module, config: MatLoRAConfig) -> list[str]:
    """Keys of ``model.state_dict()`` a nested adapter owns (its parameters and the buffers of modules_to_save)."""
    prefixes = _saved_prefixes(model, config)
    return [n for n in model.state_dict() if _owned(n, prefixes)]


def freeze_base(model: nn.Module, config: MatLoRAConfig) -> None:
    """Freeze every parameter except the adapter factors and the parameters of ``modules_to_save``."""
    owned = set(adapter_parameter_names(model, config))
    keep = {id(p) for n, p in model.named_parameters(remove_duplicate=False) if n in owned}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
