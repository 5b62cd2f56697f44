"""The adapter of a model in memory: where its keys are rooted, what base it belongs to, and saving it.

:func:`snapshot` turns an adapted model into a :class:`~lightning_matlora.adapter_format.SavedAdapter` (gathering
sharded factors); :func:`save_adapter` writes it with :func:`~lightning_matlora.adapter_format.write_adapter`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .adapter_format import LayerInfo, SavedAdapter, as_curves, json_metadata, write_adapter
from .config import MatLoRAConfig
from .curve import RankCurve
from .adapter_state import clean_name, full_adapter_state_dict
from .inject import adapted_layers, saved_prefixes
from .adapted_model import controller_of, model_state_of
from .version import __version__


def transformers_types() -> tuple[type, ...]:
    try:
        from transformers import PreTrainedModel
    except Exception:  # pragma: no cover - transformers is a dependency
        return ()
    return (PreTrainedModel,)


def model_root(model: nn.Module, accept: Callable[[str, nn.Module], bool]) -> tuple[str, nn.Module] | None:
    """The (name, module) whose module names adapter keys are relative to.

    Candidates, in order: every transformers ``PreTrainedModel`` inside ``model`` (outermost first, ``model``
    itself included), then ``model``. The first one that ``accept(name, module)`` agrees with is returned; None
    if none.
    """
    types = transformers_types()
    candidates = [(n, m) for n, m in model.named_modules() if types and isinstance(m, types)]
    if not any(m is model for _, m in candidates):
        candidates.append(("", model))
    for name, module in candidates:
        if accept(name, module):
            return name, module
    return None


def base_model_name(root: nn.Module) -> str | None:
    """``config._name_or_path`` of a transformers model (None when unknown or empty)."""
    cfg = getattr(root, "config", None)
    name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None)
    return str(name) if name else None


def task_type_of(root: nn.Module) -> str | None:
    """PEFT's ``task_type`` for known transformers heads (``CAUSAL_LM`` for ``*ForCausalLM``/``*LMHeadModel``)."""
    cls = type(root).__name__
    if cls.endswith("ForCausalLM") or cls.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if cls.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if cls.endswith("ForConditionalGeneration") and hasattr(root, "get_encoder"):
        return "SEQ_2_SEQ_LM"
    return None


def peft_target_modules(root: nn.Module, names: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` selecting exactly ``names`` in ``root``: the name suffixes (``["q_proj", ...]``,
    the usual form) when they select nothing else, else the full module names."""
    names = set(names)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {clean_name(n) for n, _ in root.named_modules()}
    selected = {n for n in selected
                if n and not n.endswith(".base_layer") and any(n == s or n.endswith("." + s) for s in suffixes)}
    return suffixes if selected == names else sorted(names)


def snapshot(model: nn.Module, *, curves: RankCurve | Sequence[RankCurve] | None = None,
             metadata: Mapping[str, Any] | None = None) -> SavedAdapter:
    """The adapter of an adapted ``model`` (a transformers model, or a module holding one) as a
    :class:`SavedAdapter` on CPU, with keys relative to the transformers model. See :func:`save_adapter`.

    Under a distributed strategy this gathers sharded factors: call it on every process.
    """
    ctrl = controller_of(model)
    layers = adapted_layers(model)
    model_state_of(model).check_unmerged("saving or exporting its adapter (the factors are saved, not merged weights)")
    curves, metadata = as_curves(curves), json_metadata(metadata)
    # the full adapter on every process (gathers FSDP/FSDP2/ZeRO-3 shards: a collective), wrapper names cleaned
    state = full_adapter_state_dict(model)
    layers = {clean_name(n): m for n, m in layers.items()}
    saved = [clean_name(p) for p in saved_prefixes(model, ctrl.config)]
    owned = list(layers) + saved
    root_name, root = model_root(model, lambda n, _m: not n or all(o.startswith(clean_name(n) + ".") for o in owned))
    prefix = clean_name(root_name) + "." if root_name else ""
    tensors = {k[len(prefix):]: v.contiguous() for k, v in state.items()}
    infos = {name[len(prefix):]: LayerInfo(int(layer.in_features), int(layer.out_features), bool(layer.is_conv1d))
             for name, layer in sorted(layers.items())}
    return SavedAdapter(
        config=MatLoRAConfig.from_dict(ctrl.config.to_dict()), layers=infos, tensors=tensors,
        saved_modules=[m[len(prefix):] for m in saved],
        base_model_name_or_path=base_model_name(root), base_model_class=type(root).__name__,
        task_type=task_type_of(root), peft_target_modules=peft_target_modules(root, list(infos)),
        curves=curves, metadata=metadata, library_version=__version__)


def save_adapter(model: nn.Module, path: str | os.PathLike, *,
                 curves: RankCurve | Sequence[RankCurve] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> Path:
    """Save the nested adapter of ``model`` (all ``r_max`` components) to the directory ``path``.

    Args:
        model: an adapted model: a transformers model, or a module (e.g. a LightningModule) holding one; keys are
            stored relative to the transformers model.
        path: the adapter directory. An existing adapter directory there is replaced atomically; any other
            existing non-empty directory is refused.
        curves: the measured rank curves: a :class:`~lightning_matlora.curve.RankCurve` or a list of them, one
            per metric (``matlora info`` prints them, exported cards quote them).
        metadata: further JSON-serialisable facts to keep (e.g. ``{"step": 1000}``).

    Returns the directory's path. Writes ``adapter_model.safetensors`` and ``matlora_config.json``
    (docs/adapters.md has the schema). An adapter with NaN/inf values is saved with a warning (reading it back
    needs ``allow_nonfinite=True``).

    Example:
        >>> import tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_matlora import MatryoshkaLoRA, save_adapter, read_adapter
        >>> from lightning_matlora.curve import RankCurve
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
        >>> acc = RankCurve((1, 2, 4), (0.41, 0.44, 0.46), metric="acc")
        >>> path = save_adapter(model, tempfile.mkdtemp() + "/ad", curves=acc, metadata={"dataset": "gsm8k"})
        >>> read_adapter(path).curves[0].score_at(2)
        0.44
    """
    return write_adapter(snapshot(model, curves=curves, metadata=metadata), path)
