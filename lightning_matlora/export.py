"""Rank k out of the nested adapter: a standard PEFT LoRA adapter, or a plain merged transformers model.

Both are exact: rank k of a nested adapter under its ``rank_scale`` rule is x·A[:, :k]·diag(c)·B[:k, :] with the
coefficients c = ``RankController.rank_coefficients(k)``, which is a rank-k LoRA adapter.

- ``rank_scale="rank"``: c = s(k)·1 is a constant, which maps onto PEFT's scaling fields: s = α/√k →
  ``lora_alpha=α, use_rslora=True``; s = α/k → ``lora_alpha=α``; s = α → ``lora_alpha=α·k``. The factors are the
  first k rows of A and columns of B, unchanged.
- ``rank_scale="trained"``: c = p_1…p_k is folded into ``lora_B`` (column i times p_i), ``lora_alpha=k`` so that
  PEFT's scaling is 1. ``fold_scale=True`` does the same for the ``"rank"`` rule (for servers that do not read
  ``use_rslora``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Union

import torch
from safetensors.torch import save_file
from torch import nn

from .adapter_format import SavedAdapter, read_adapter
from .adapter_load import uncovered_layers
from .adapter_save import base_model_name, model_root, snapshot, transformers_types
from .base_model import check_fits, load_base, locate_base, record_of
from .adapted_model import model_state_of
from .inject import adapted_layers
from .layer import MatryoshkaLinear
from .layer_ranks import layer_parameters, pattern_matches, resolve_layer_ranks
from .output_dir import check_output_dir, write_output_dir
from .quantized import is_quantized
from .rank_plan import adapter_dims
from .rank import RankController

AdapterSource = Union[str, os.PathLike, nn.Module, SavedAdapter]


def _adapter(adapter: AdapterSource) -> SavedAdapter:
    if isinstance(adapter, SavedAdapter):
        return adapter
    if isinstance(adapter, nn.Module):
        return snapshot(adapter)
    return read_adapter(adapter)


def check_rank(rank: Any, r_max: int) -> int:
    """``rank`` as an int in 1…r_max, or a ``ValueError`` that names the valid range."""
    if isinstance(rank, str) and rank.strip().isdigit():
        rank = int(rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= r_max:
        raise ValueError(f"rank must be an integer in 1…r_max={r_max} (the adapter's allocated rank), got {rank!r}.")
    return rank


def _local(path: Any) -> str | os.PathLike | None:
    """``path`` when it names something on this machine (a directory to protect), else None."""
    return path if isinstance(path, (str, os.PathLike)) and os.path.lexists(path) else None


# --------------------------------------------------------------------------------------------------- PEFT
def _peft_alpha(cfg, k: int, fold: bool) -> tuple[float, bool]:
    """(lora_alpha, use_rslora) under which PEFT's scaling of a rank-k layer is the rule's coefficient: 1 when the
    coefficients are folded into ``lora_B``, else s(k) (see the module docstring)."""
    if fold:
        return float(k), False  # PEFT scaling lora_alpha / r = 1; the coefficients live in lora_B
    if cfg.scaling == "sqrt":
        lora_alpha, use_rslora = cfg.alpha, True
    elif cfg.scaling == "rank":
        lora_alpha, use_rslora = cfg.alpha, False
    else:
        lora_alpha, use_rslora = cfg.alpha * k, False
    s = float(RankController(cfg).rank_coefficients(k)[0])
    peft_scaling = lora_alpha / (math.sqrt(k) if use_rslora else k)
    if not math.isclose(peft_scaling, s, rel_tol=1e-6):  # pragma: no cover - guards the mapping above
        raise AssertionError(f"PEFT scaling {peft_scaling} differs from s({k}) = {s}.")
    return lora_alpha, use_rslora


def _json_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x  # servers that type lora_alpha as an int read 1, not 1.0


def _peft_patterns(ranks: Mapping[str, int], default: Any, value) -> dict[str, Any]:
    """PEFT ``rank_pattern``/``alpha_pattern`` entries: ``{"^name": value(k)}`` for each layer whose value differs
    from ``default``. PEFT matches a key as ``re.match(rf"(.*\.)?({key})$", name)``, so ``^name`` names exactly one
    layer; a name that another layer's key would also match is written regex-escaped."""
    names = list(ranks)
    keys = {n: "^" + n for n in names}
    if any(pattern_matches(keys[a], b) for a in names for b in names if a != b):
        keys = {n: "^" + re.escape(n) for n in names}
    return {keys[n]: value(k) for n, k in ranks.items() if value(k) != default}


def _kept_ranks(ranks: Mapping[str, int]) -> dict[str, int]:
    """The layers of ``ranks`` at a rank ≥ 1; ``ValueError`` naming the fix when every layer is at rank 0."""
    kept = {n: k for n, k in ranks.items() if k > 0}
    if not kept:
        raise ValueError("Every layer is at rank 0 (no adapter anywhere): there is nothing to export; give at least "
                         "one layer a rank ≥ 1.")
    return kept


def _kept_targets(adapter: SavedAdapter, kept: Iterable[str]) -> list[str]:
    """PEFT ``target_modules`` selecting exactly the layers ``kept`` of ``adapter`` (the others are at rank 0, which
    PEFT cannot express: its ``r`` must be positive, so those layers are left out of the adapter). The module-type
    suffixes when the adapter's targets are suffixes and every layer of a kept type is kept, else the full names."""
    kept = set(kept)
    targets = adapter.peft_target_modules
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in kept})
    whole_types = all(n in kept for n in adapter.layers if n.rsplit(".", 1)[-1] in suffixes)
    if isinstance(targets, list) and targets and all("." not in t for t in targets) and whole_types:
        return suffixes
    return sorted(kept)


def peft_layer_ranks(adapter: SavedAdapter, ranks: Mapping[str, int], fold_scale: bool = False
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The PEFT ``adapter_config.json`` dict and ``adapter_model.safetensors`` tensors of the adapter cut to a rank
    per layer (``ranks``: every layer of ``adapter`` by name, each in 0…r_max). ``r`` is the most common rank; the
    other layers' ranks go in ``rank_pattern`` and their ``lora_alpha`` in ``alpha_pattern`` when it differs.
    Layers at rank 0 are left out of ``target_modules`` (PEFT's ranks are positive): PEFT leaves them as the base
    layers, which is what rank 0 serves. Raises ``ValueError`` when every layer is at rank 0."""
    kept = _kept_ranks(ranks)
    dropped = len(kept) < len(ranks)
    ranks = kept
    cfg = adapter.config
    fold = fold_scale or cfg.rank_scale != "rank"
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))
    lora_alpha, use_rslora = _peft_alpha(cfg, r, fold)
    ctrl = RankController(cfg)
    coefs = {k: ctrl.rank_coefficients(k) for k in counts} if fold else {}  # the rule's coefficients, per rank
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(ranks):
        k = ranks[name]
        A, B = adapter.factors(name)
        A_k, B_k = A[:k].contiguous(), B[:, :k]
        if fold:
            B_k = (B_k.float() * coefs[k]).to(B.dtype)
        tensors[f"base_model.model.{name}.lora_A.weight"] = A_k.clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B_k.contiguous().clone()
    for key in adapter.saved_keys:  # PEFT stores modules_to_save under the plain module path
        tensors[f"base_model.model.{key}"] = adapter.tensors[key].contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": adapter.task_type,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "r": r,
        "lora_alpha": _json_number(lora_alpha),
        "use_rslora": use_rslora,
        "lora_dropout": cfg.dropout,
        "target_modules": _kept_targets(adapter, ranks) if dropped else
        adapter.peft_target_modules or sorted({n.rsplit(".", 1)[-1] for n in adapter.layers}),
        "modules_to_save": list(adapter.saved_modules) or None,
        "fan_in_fan_out": any(i.conv1d for i in adapter.layers.values()),
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
    }
    if len(counts) > 1:
        config["rank_pattern"] = _peft_patterns(ranks, r, lambda k: k)
        alphas = {k: _json_number(_peft_alpha(cfg, k, fold)[0]) for k in counts}
        config["alpha_pattern"] = _peft_patterns(ranks, config["lora_alpha"], alphas.__getitem__)
    return config, tensors


def peft_rank_k(adapter: SavedAdapter, rank: int, fold_scale: bool = False
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The PEFT ``adapter_config.json`` dict and ``adapter_model.safetensors`` tensors of rank ``rank``."""
    k = check_rank(rank, adapter.config.r_max)
    return peft_layer_ranks(adapter, {n: k for n in adapter.layers}, fold_scale)


def _card(adapter: SavedAdapter, rank: int | Mapping[str, int]) -> str:
    cfg = adapter.config
    if isinstance(rank, Mapping):
        k = None
        params = layer_parameters(adapter_dims(adapter), rank)
        title = "Per-layer-rank LoRA adapter"
        dropped = sum(1 for k in rank.values() if k == 0)
        what = (f"- ranks per layer: {min(rank.values())}…{max(rank.values())} of r_max={cfg.r_max} over "
                f"{len(rank)} layers, {params:,} adapter parameters (`rank_pattern` in adapter_config.json)"
                + (f"; {dropped} layers at rank 0 are left out of `target_modules` (the base layers)"
                   if dropped else ""))
    else:
        k = rank
        title = f"Rank-{k} LoRA adapter"
        what = f"- rank: {k} of r_max={cfg.r_max}"
    lines = [f"# {title} (exported from a MatryoshkaLoRA nested adapter)", "",
             f"- base model: `{adapter.base_model_name_or_path or 'unknown'}`",
             f"{what} (train ranks {cfg.ranks}; rule `rank_scale={cfg.rank_scale}`, "
             f"scaling `{cfg.scaling}`, alpha {cfg.alpha})"]
    for curve in adapter.curves if k is not None else ():
        score = curve.score_at(k) if k in curve.ranks else None
        lines.append(f"- measured {curve.metric} at rank {k}: " + (f"{score:.4g}" if score is not None else "not measured")
                     + f" (AURAC of the full nested adapter: {curve.aurac():.4g})")
    if k is not None and not adapter.curves:
        lines.append("- no measured rank curve was recorded with the adapter")
    lines += ["", "A standard PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`):", "",
              "```python", "from peft import PeftModel",
              "model = PeftModel.from_pretrained(base_model, \"<this directory>\")", "```", ""]
    return "\n".join(lines)


def _write_peft(adapter: SavedAdapter, out: Path, rank: int | Mapping[str, int], fold_scale: bool) -> None:
    if isinstance(rank, Mapping):
        config, tensors = peft_layer_ranks(adapter, rank, fold_scale)
    else:
        config, tensors = peft_rank_k(adapter, rank, fold_scale)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "README.md").write_text(_card(adapter, rank))


def export_peft(adapter: AdapterSource, out_dir: str | os.PathLike, rank: int | str | Mapping[str, int], *,
                overwrite: bool = False,
                fold_scale: bool = False, base: nn.Module | str | os.PathLike | None = None,
                base_name: str | None = None) -> Path:
    """Write rank ``rank`` of a nested adapter as a standard PEFT LoRA adapter in ``out_dir``.

    Args:
        adapter: an adapted model, a saved adapter directory (see :func:`save_adapter`) or a :class:`SavedAdapter`.
            No base model is needed.
        out_dir: the output directory (``adapter_config.json``, ``adapter_model.safetensors``, ``README.md``).
        rank: k in 1…r_max, or ``"all"``: one adapter per train rank in ``out_dir/rank_<k>/``, each with a README
            card stating the measured score at that rank when the adapter stores a rank curve; or a rank per layer,
            ``{layer name or pattern: k}`` as :func:`~lightning_matlora.set_rank` takes it (e.g. the plan of
            :func:`~lightning_matlora.allocate_ranks`): one adapter whose ``adapter_config.json`` holds ``r`` (the
            most common rank) plus PEFT's ``rank_pattern`` and ``alpha_pattern`` for the other layers.
        overwrite: replace an existing ``out_dir`` that this library wrote (an export, a merged model or an
            adapter); any other directory is refused, and so is ``out_dir`` being or containing the source adapter
            or ``base``.
        fold_scale: fold the scale into ``lora_B`` (``lora_alpha = r``) even for ``rank_scale="rank"``.
        base: optional base model (a model, a local directory or a hub name) the export is meant for: the adapter
            is checked against it (architecture, every layer and shape; a directory's weights are not loaded)
            before anything is written, and a directory or name is recorded as ``base_model_name_or_path``.
        base_name: the ``base_model_name_or_path`` to record (a hub name, or a path valid where the adapter is
            used); default ``base`` when it is a directory or name, else the one the nested adapter recorded, i.e.
            what its base was loaded from, as given.

    Load with ``peft.PeftModel.from_pretrained(base, out_dir)``; the logits equal the nested model at rank k (at
    the same per-layer ranks, for a mapping).

    Example:
        >>> import json, tempfile
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_matlora import MatryoshkaLoRA, export_peft
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
        >>> out = export_peft(model, tempfile.mkdtemp() + "/r2", rank=2)
        >>> json.loads((out / "adapter_config.json").read_text())["r"]
        2
    """
    out = Path(out_dir)
    protected = {"the source adapter": _local(adapter), "the base model": _local(base)}
    check_output_dir(out, overwrite, protected)
    saved = _adapter(adapter)
    if base_name is not None and not (isinstance(base_name, str) and base_name.strip()):
        raise ValueError(f"base_name must be a hub name or a path (a non-empty string), got {base_name!r}.")
    if isinstance(base, nn.Module):
        check_fits(record_of(saved), base)
    elif base is not None:
        locate_base(base, record_of(saved))
        saved = dataclasses.replace(saved, base_model_name_or_path=os.fspath(base))
    if base_name is not None:
        saved = dataclasses.replace(saved, base_model_name_or_path=base_name.strip())
    if isinstance(rank, Mapping):
        ranks = resolve_layer_ranks(sorted(saved.layers), rank, saved.r_max)
        _kept_ranks(ranks)  # refuse an export with no adapter before anything is written

        def write(tmp: Path) -> None:
            _write_peft(saved, tmp, ranks, fold_scale)
    elif isinstance(rank, str) and rank.strip().lower() == "all":
        ranks = list(saved.config.ranks)

        def write(tmp: Path) -> None:
            for k in ranks:
                _write_peft(saved, tmp / f"rank_{k}", k, fold_scale)
    else:
        k = check_rank(rank, saved.r_max)

        def write(tmp: Path) -> None:
            _write_peft(saved, tmp, k, fold_scale)
    return write_output_dir(out, write, kind="peft-export", overwrite=overwrite, protected=protected)


# -------------------------------------------------------------------------------------------------- merge
def merge_to_base(adapter: AdapterSource, out_dir: str | os.PathLike, rank: int, *,
                  base: nn.Module | str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write a plain transformers model (``save_pretrained``) with rank ``rank`` of the adapter merged in.

    Args:
        adapter: an adapted model (its base is used and ``base`` must be None, unless that base is quantized: then
            ``base`` is the unquantized base the merge is written from), or a saved adapter directory /
            :class:`SavedAdapter` (then ``base`` is a transformers model, or a local directory or hub name loaded
            with ``from_pretrained``; default: the base recorded in the adapter).
        out_dir: the output directory; reload it with ``AutoModelForCausalLM.from_pretrained(out_dir)``, no
            lightning_matlora needed. Its logits equal the nested model at rank k.
        rank: k in 1…r_max.
        overwrite: replace an existing ``out_dir`` that this library wrote (a merged model, an export or an
            adapter); any other directory is refused, and so is ``out_dir`` being or containing the base or the
            source adapter.

    A base given as a directory or name is checked against the adapter (architecture, every layer and shape)
    before any weight is loaded: a mismatch raises ``ValueError`` naming the layer, without building the model.

    Neither the adapted model nor a passed ``base`` is changed: merged weights are new tensors handed to
    ``save_pretrained`` as its ``state_dict``. A base that cannot be loaded (e.g. a pickle that transformers'
    weights-only loading refuses) raises ``ValueError`` naming it.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
        >>> from lightning_matlora import MatryoshkaLoRA, merge_to_base
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
        >>> out = merge_to_base(model, tempfile.mkdtemp() + "/merged", rank=2)  # doctest: +SKIP
        >>> type(AutoModelForCausalLM.from_pretrained(out)).__name__  # doctest: +SKIP
        'LlamaForCausalLM'

    (Skipped as a doctest only because DeepSpeed may print a notice to stdout when ``save_pretrained`` first
    probes it; ``tests/test_export.py`` runs the same calls.)
    """
    out = Path(out_dir)
    if isinstance(adapter, nn.Module):
        quantized = [n for n, m in adapted_layers(adapter).items() if m.quantized]
        if not quantized:
            if base is not None:
                raise ValueError("merge_to_base(model, ...) merges into the model's own base: pass base=None (base is for "
                                 "a saved adapter directory, or for a model whose base is quantized).")
            return _merge_adapted(adapter, out, rank, overwrite)
        check_output_dir(out, overwrite, {"the base model": _local(base)})
        if base is None:
            raise ValueError(f"The model's base is quantized ({len(quantized)} bitsandbytes layers, e.g. "
                             f"{quantized[0]!r}) and merge_to_base writes a plain float model: pass base= the "
                             f"unquantized base model (a model, a local directory or a hub name), e.g. "
                             f"merge_to_base(model, out_dir, rank, base='path/to/float/base').")
        adapter = snapshot(adapter)  # the trained factors, merged below into the unquantized base
    protected = {"the source adapter": _local(adapter), "the base model": _local(base)}
    check_output_dir(out, overwrite, protected)
    saved = _adapter(adapter)
    k = check_rank(rank, saved.r_max)
    if base is None:
        if not saved.base_model_name_or_path:
            raise ValueError("The adapter does not record its base model: pass base= (a model, a local directory or a "
                             "hub name).")
        base = saved.base_model_name_or_path
        protected["the base model"] = _local(base)
        check_output_dir(out, overwrite, protected)
    base_model = _float_base(saved, base)
    state = _merged_state(saved, base_model, k)
    return write_output_dir(out, lambda tmp: _save(base_model, tmp, state, base), kind="merged-model",
                            overwrite=overwrite, protected=protected)


def _float_base(saved: SavedAdapter, base: nn.Module | str | os.PathLike) -> nn.Module:
    """The plain (unadapted, unquantized) transformers base that ``saved`` is merged into: loaded from a directory
    or hub name after the adapter's check against its config, or given; every layer and shape is checked to fit."""
    record = record_of(saved)
    base_model = load_base(base, record) if isinstance(base, (str, os.PathLike)) else base
    if not isinstance(base_model, transformers_types()):
        raise TypeError(f"base must be a transformers PreTrainedModel, a local directory or a hub name, got "
                        f"{type(base_model).__name__}.")
    if adapted_layers(base_model):
        raise ValueError("base is already adapted: pass the plain base model (or call merge_to_base(adapted_model, ...)).")
    quantized_base = [n for n, m in base_model.named_modules() if is_quantized(m)]
    if quantized_base:
        raise ValueError(f"base is quantized ({len(quantized_base)} bitsandbytes layers, e.g. {quantized_base[0]!r}): "
                         f"merge_to_base writes a plain float model, so pass the unquantized base (load it without "
                         f"quantization_config). To merge into the quantized weights in memory, use merge(model, rank).")
    _, root = check_fits(record, base_model)
    if root is not base_model:
        raise ValueError("The adapter's layers are not relative to base: pass the transformers model itself.")
    left = uncovered_layers(saved, base_model)
    if left:
        raise ValueError(f"{len(left)} layers of the base that the adapter's target_modules select have no adapter "
                         f"({', '.join(repr(n) for n in left[:6])}{', …' if len(left) > 6 else ''}): the adapter was "
                         f"trained on a smaller model ({record.made_for()}); merge it into the base it was trained on.")
    return base_model


def _merged_state(saved: SavedAdapter, base_model: nn.Module, k: int) -> dict[str, torch.Tensor]:
    """``base_model``'s state dict with rank ``k`` of ``saved`` merged into each adapted weight and the adapter's
    ``modules_to_save`` tensors in place; ``base_model`` itself is not changed (the merged weights are new tensors)."""
    controller = RankController(saved.config)
    modules = dict(base_model.named_modules())
    state = base_model.state_dict()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for name in saved.layers:
            base_layer = modules[name]
            layer = MatryoshkaLinear(base_layer, controller)  # not attached to the model: base stays unchanged
            A, B = saved.factors(name)
            layer.lora_A.data = A.to(layer.lora_A.device, layer.lora_A.dtype)
            layer.lora_B.data = B.to(layer.lora_B.device, layer.lora_B.dtype)
            state[f"{name}.weight"] = _merged_weight(layer, k)
        for key in saved.saved_keys:
            state[key] = saved.tensors[key].to(state[key].device, state[key].dtype)
    return state


def _merged_weight(layer: MatryoshkaLinear, k: int) -> torch.Tensor:
    w = layer.base_layer.weight
    return (w.detach().to(layer.merge_dtype()) + layer.delta_weight(k)).to(w.dtype)


def _save(model: nn.Module, tmp: Path, state: dict[str, torch.Tensor], base: Any = None) -> None:
    model.save_pretrained(str(tmp), state_dict=state)
    if isinstance(base, (str, os.PathLike)):  # keep the tokenizer with the merged model when the base has one
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(tmp))
        except Exception:
            pass


def _merge_adapted(model: nn.Module, out: Path, rank: int, overwrite: bool) -> Path:
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("The model has no MatryoshkaLoRA layers: pass an adapted model or a saved adapter directory.")
    names = list(layers)
    found = model_root(model, lambda n, m: isinstance(m, transformers_types())
                       and all(x.startswith(n + ".") or not n for x in names))
    if found is None:
        raise TypeError("merge_to_base writes a transformers model, but the adapted layers are not inside a transformers "
                        "PreTrainedModel.")
    _, root = found
    protected = {"the base model": _local(base_model_name(root))}
    check_output_dir(out, overwrite, protected)
    k = check_rank(rank, next(iter(layers.values())).r_max)
    model_state_of(model).check_unmerged("merge_to_base")
    root_layers = adapted_layers(root)
    with torch.no_grad():
        weights = {name: _merged_weight(layer, k) for name, layer in root_layers.items()}
    # unwrap in place for the save only (module objects swap; no tensor is modified), then put the wrappers back
    parents = {}
    for name, layer in root_layers.items():
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        parents[name] = (parent, child, layer)
        setattr(parent, child, layer.base_layer)
    try:
        state = root.state_dict()
        for name, w in weights.items():
            state[f"{name}.weight"] = w
        write_output_dir(out, lambda tmp: _save(root, tmp, state), kind="merged-model", overwrite=overwrite,
                         protected=protected)
    finally:
        for parent, child, layer in parents.values():
            setattr(parent, child, layer)
    return out
