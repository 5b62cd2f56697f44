"""Choosing the layers to adapt (PEFT's conventions), replacing them, and freezing the base."""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Sequence

from torch import nn

from .config import DTYPES, MatLoRAConfig
from .distill import find_distill_module
from .layer import MatryoshkaLinear, is_supported
from .model_state import STATE_ATTR, ModelState
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
    """Every ``MatryoshkaLinear`` in ``model`` by its module name (a scan of the module tree).

    >>> from torch import nn
    >>> from lightning_matlora import MatryoshkaLoRA
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> _ = MatryoshkaLoRA(r_max=2, verbose=False).apply(model)
    >>> sorted(adapted_layers(model))
    ['0', '2']
    """
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


def init_seed(seed: int, name: str) -> int:
    """The seed of the initial factors of layer ``name``: a stable hash of (``seed``, ``name``), the same in every
    process and Python session, independent of torch's global generator and of the order layers are adapted in."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def inject(model: nn.Module, config: MatLoRAConfig, controller: RankController, distill_required: bool = True) -> list[str]:
    """Replace every selected layer of ``model`` by a ``MatryoshkaLinear`` sharing ``controller`` and attach the
    model state (:class:`~lightning_matlora.model_state.ModelState`, holding ``controller``) to ``model``: it then
    knows every adapted layer and ``modules_to_save`` module of ``model``.

    The factors of layer ``name`` are initialised from :func:`init_seed` (``config.seed``, ``name``). Warns once,
    naming them, about layers narrower than ``r_max``. With ``config.distill`` > 0 it registers the distillation hook
    on the distilled module (:meth:`ModelState.enable_distillation`; raises, naming ``distill_module``,
    if there is none). Returns the names of the newly adapted layers (may be empty: the caller decides whether that
    is an error). Raises if ``model`` already holds adapters of a different controller. ``distill_required=False``
    (loading an adapter for serving): a missing distilled module leaves the hook off instead of raising, since
    distillation only matters to training.
    """
    existing = adapted_layers(model)
    foreign = [n for n, m in existing.items() if m.controller is not controller]
    if foreign:
        raise RuntimeError(f"The model is already adapted ({len(foreign)} MatryoshkaLinear layers, e.g. {foreign[0]!r}) "
                           f"by another MatryoshkaLoRA: adapt a fresh base model, or load the adapter with "
                           f"load_adapter() instead of applying a second one.")
    dtype = DTYPES[config.adapter_dtype] if config.adapter_dtype else None
    names = find_targets(model, config)
    distill = config.distill > 0 and (names or existing)
    if distill and not distill_required:
        try:
            find_distill_module(model, config.distill_module)
        except ValueError:
            distill = False
    elif distill:  # before the model changes
        find_distill_module(model, config.distill_module)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = MatryoshkaLinear(base, controller, dropout=config.dropout, adapter_dtype=dtype,
                                 init_seed=init_seed(config.seed, name))
        setattr(parent, child, layer.train(base.training))  # an eval-mode model stays in eval mode
    layers = adapted_layers(model)
    _warn_narrow(config.r_max, {n: layers[n] for n in names})
    saved = {n: model.get_submodule(n) for n in saved_prefixes(model, config)}
    state = ModelState.attach(model, controller, layers, saved)
    if layers and distill:
        state.enable_distillation(model)
    return names


def _warn_narrow(r_max: int, layers: dict[str, MatryoshkaLinear]) -> None:
    narrow = sorted(n for n, m in layers.items() if r_max > min(m.in_features, m.out_features))
    if narrow:
        shown = ", ".join(narrow[:6]) + (f", … ({len(narrow)} in all)" if len(narrow) > 6 else "")
        width = min(min(layers[n].in_features, layers[n].out_features) for n in narrow)
        warnings.warn(f"r_max={r_max} exceeds min(in_features, out_features) of {len(narrow)} adapted layers "
                      f"({shown}; the narrowest is {width} wide): a rank above a layer's width adds parameters but "
                      f"no expressive power there. Choose r_max ≤ {width}, or exclude those layers.",
                      UserWarning, stacklevel=3)


def saved_prefixes(model: nn.Module, config: MatLoRAConfig) -> list[str]:
    """Names of the submodules of ``model`` that ``config.modules_to_save`` selects (trained and saved whole)."""
    saved = config.modules_to_save or []
    return [n for n, _ in model.named_modules() if n and _matches(n, saved)]


def freeze_base(model: nn.Module, config: MatLoRAConfig | None = None) -> None:
    """Freeze every parameter of ``model`` except the tensors its adapter owns (the factors and the parameters of
    ``modules_to_save``, as :meth:`ModelState.owned_tensors` lists them). ``model`` is a module ``inject`` adapted;
    ``config`` is not needed (the model's state knows what it owns) and is accepted for callers that pass it."""
    state = getattr(model, STATE_ATTR, None)
    if not isinstance(state, ModelState):
        raise RuntimeError("freeze_base(model) needs a model adapted by inject(model, ...), which attaches the "
                           "adapter's model state to it.")
    keep = {id(t) for _, t in state.owned_tensors(model)}
    for param in model.parameters():
        param.requires_grad_(id(param) in keep)
