"""Reading a standard PEFT LoRA adapter directory: its factors and the scale PEFT serves each layer with.

A PEFT LoRA layer serves ΔW = scaling · B·A with ``lora_A`` (``r × in``), ``lora_B`` (``out × r``) and
``scaling = lora_alpha / r`` (``lora_alpha / √r`` with ``use_rslora``), where ``r`` and ``lora_alpha`` may differ per
layer through ``rank_pattern`` and ``alpha_pattern``. Everything whose forward is not that update (DoRA, LoRA
biases, embedding LoRA, other PEFT methods, …) is refused here with a message naming what was found.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."

# adapter_config.json fields whose (truthy) value changes the forward away from scaling·B·A, or adds tensors
_REFUSED = {
    "use_dora": "DoRA (use_dora=True) rescales each output column by a learned magnitude, which no ordering of the "
                "low-rank factors can reproduce",
    "lora_bias": "lora_bias=True adds a trained bias to lora_B",
    "use_qalora": "QA-LoRA (use_qalora=True) pools the layer input before lora_A",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) switches the update on per token",
    "layer_replication": "layer_replication shares layers between positions of the model",
    "target_parameters": "target_parameters adapts raw parameters (e.g. MoE experts), not Linear layers",
    "trainable_token_indices": "trainable_token_indices trains embedding rows besides LoRA",
    "megatron_config": "megatron_config makes Megatron-parallel LoRA layers",
    "arrow_config": "arrow_config routes between several LoRA experts",
    "use_bdlora": "use_bdlora changes the LoRA factor structure",
    "kasa_config": "kasa_config adds a singular-value vector between the factors",
    "monteclora_config": "monteclora_config samples the factors",
}


#: PEFT's task types (``peft.TaskType``)
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")


class NotNestable(ValueError):
    """A PEFT adapter that cannot be nested (the message says what and why)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


def _is_regex(v: Any) -> bool:
    try:
        re.compile(v)
    except (re.error, TypeError):
        return False
    return True


def _pattern(value_ok: Any, what: str) -> Any:
    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return f"an object mapping module-name patterns to {what}"
        for key, val in v.items():
            if not _is_regex(key):
                return f"an object whose keys are regular expressions, and key {key!r} is not one"
            if not value_ok(val):
                return f"an object mapping module-name patterns to {what}, and key {key!r} maps to {val!r}"
        return None
    return check


def _simple(ok: Any, what: str) -> Any:
    return lambda v: None if ok(v) else what


#: adapter_config.json fields that nesting reads → a check returning None or what the field must be. A missing
#: field takes PEFT's default; a field of the wrong type is refused, as PEFT refuses it when loading.
_FIELD_CHECKS = {
    "r": _simple(lambda v: _is_int(v) and v >= 1, "an integer ≥ 1"),
    "lora_alpha": _simple(_is_num, "a finite number"),
    "lora_dropout": _simple(lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": _simple(lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": _simple(lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": _pattern(lambda v: _is_int(v) and v >= 1, "integer ranks ≥ 1"),
    "alpha_pattern": _pattern(_is_num, "finite numbers"),
    "task_type": _simple(lambda v: v is None or v in TASK_TYPES, "null or one of " + ", ".join(TASK_TYPES)),
    "modules_to_save": _simple(lambda v: v is None or isinstance(v, list) and all(isinstance(x, str) for x in v),
                               'null or a list of module names such as ["lm_head"]'),
    "target_modules": _simple(lambda v: v is None or isinstance(v, str) or isinstance(v, list)
                              and all(isinstance(x, str) for x in v), "a string or a list of module names"),
    "base_model_name_or_path": _simple(lambda v: v is None or isinstance(v, str), "null or a string"),
}


def check_fields(config: dict[str, Any], cfg_file: Path) -> None:
    """Refuse a field of ``adapter_config.json`` that nesting reads when its type or value is one PEFT would not
    accept, naming the file, the field and the value."""
    for field, check in _FIELD_CHECKS.items():
        if field in config and (config[field] is not None or field in ("r", "lora_alpha", "lora_dropout")):
            need = check(config[field])
            if need is not None:
                raise ValueError(f"{cfg_file}: field {field!r} must be {need}, got {json.dumps(config[field])}.")


@dataclasses.dataclass
class PeftLoRA:
    """A PEFT LoRA adapter in memory.

    layers: module name (relative to the transformers model) → (lora_A ``r × in``, lora_B ``out × r``, scaling).
    saved: ``modules_to_save`` tensors by ``state_dict`` key relative to the transformers model.
    config: the adapter_config.json dict.
    """

    path: Path
    config: dict[str, Any]
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    saved: dict[str, torch.Tensor]

    @property
    def ranks(self) -> dict[str, int]:
        return {n: int(a.shape[0]) for n, (a, _, _) in self.layers.items()}

    @property
    def r_max(self) -> int:
        return max(self.ranks.values())


def pattern_key(patterns: Any, name: str) -> str | None:
    """PEFT's rule for ``rank_pattern``/``alpha_pattern``: the first key that matches the end of the module name
    at a ``.`` boundary (the key is a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def layer_scaling(config: dict[str, Any], name: str, r: int) -> float:
    """The scale PEFT serves layer ``name`` of rank ``r`` with: ``lora_alpha/r``, or ``lora_alpha/√r`` (rslora)."""
    alpha_pattern = config.get("alpha_pattern") or {}
    key = pattern_key(alpha_pattern, name)
    alpha = float(alpha_pattern[key] if key is not None else config.get("lora_alpha", 8))
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _expected_rank(config: dict[str, Any], name: str) -> int:
    rank_pattern = config.get("rank_pattern") or {}
    key = pattern_key(rank_pattern, name)
    return int(rank_pattern[key] if key is not None else config.get("r", 8))


def check_config(config: dict[str, Any], path: Path) -> None:
    """Refuse what cannot be nested: another PEFT method, DoRA, biases and the other forward-changing options;
    then a field of the wrong type (:func:`check_fields`)."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise NotNestable(f"{path} is a {config.get('peft_type')!r} adapter, not LoRA: only LoRA adapters (an update "
                          f"B·A per layer) can be nested.")
    for field, why in _REFUSED.items():
        if config.get(field):
            raise NotNestable(f"{path}: {why}, so the adapter cannot be nested (only plain LoRA can). Found "
                              f"{field}={config[field]!r}.")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise NotNestable(f"{path}: bias={bias!r} trains the base layers' biases, which are not part of a low-rank "
                          f"update, so the adapter cannot be nested; only bias='none' can.")
    check_fields(config, path / PEFT_CONFIG)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    for name in PEFT_WEIGHTS:
        f = path / name
        if f.is_file():
            try:
                if name.endswith(".safetensors"):
                    return load_file(str(f))
                return torch.load(str(f), map_location="cpu", weights_only=True)  # tensors only, no pickled code
            except Exception as e:  # noqa: BLE001 - safetensors and torch raise several kinds for a bad file
                raise ValueError(f"{f} cannot be read ({' '.join(str(e).split())[:200]}): the adapter is corrupted; "
                                 f"save or copy it again.") from None
    raise FileNotFoundError(f"{path} has no {' or '.join(PEFT_WEIGHTS)}: give a PEFT adapter directory (what "
                            f"PeftModel.save_pretrained writes).")


def read_peft_lora(path: str | os.PathLike) -> PeftLoRA:
    """Read and validate the PEFT LoRA adapter directory ``path`` (``adapter_config.json`` and
    ``adapter_model.safetensors``, or ``adapter_model.bin``). Raises :class:`NotNestable` (a ``ValueError``) for
    adapters that cannot be nested and ``FileNotFoundError`` for a directory that is not a PEFT adapter."""
    path = Path(path)
    cfg_file = path / PEFT_CONFIG
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"{path} is a symbolic link that leads nowhere (a missing target or a link loop): "
                                f"give a PEFT adapter directory.")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no {PEFT_CONFIG}: give a PEFT adapter directory (what "
                                f"PeftModel.save_pretrained writes).")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{cfg_file} is not UTF-8 text (byte {e.start}): the adapter config is corrupted.") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}): the adapter is corrupted.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_file} does not hold a JSON object: the adapter is corrupted.")
    check_config(config, path)
    tensors = _load_weights(path)
    for key in tensors:  # LoRA on embeddings first: PEFT also stores the embedding's base weights beside it
        if "lora_embedding_" in key:
            raise NotNestable(f"{path}: tensor {key!r} is LoRA on an embedding layer, which is not supported: only "
                              f"LoRA on Linear (and GPT-2 Conv1D) layers can be nested.")
    for key in tensors:  # what cannot be nested, before anything else is read
        if "lora_magnitude_vector" in key:
            raise NotNestable(f"{path}: tensor {key!r} is a DoRA magnitude, so the adapter cannot be nested.")
        if ".lora_" in key and not key.endswith((".lora_A.weight", ".lora_B.weight")) or "token_adapter" in key:
            raise NotNestable(f"{path}: tensor {key!r} is not a plain LoRA factor (lora_A/lora_B weight), so the "
                              f"adapter cannot be nested.")
        if ".base_layer." in key:
            raise NotNestable(f"{path}: tensor {key!r} stores base weights of an adapted layer, which a nested adapter "
                              f"cannot carry.")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(f"{path}: tensor {key!r} does not start with {PREFIX!r}: not a PEFT adapter file.")
        rel = key[len(PREFIX):]
        for part in ("lora_A", "lora_B"):
            if rel.endswith(f".{part}.weight"):
                factors.setdefault(rel[:-len(f".{part}.weight")], {})[part] = value
                break
        else:  # modules_to_save (or a resized embedding PEFT saved): full tensors, kept as they are
            saved[rel] = value
    if not factors:
        raise ValueError(f"{path} holds no LoRA factors (no '*.lora_A.weight'): nothing to nest.")
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name in sorted(factors):
        pair = factors[name]
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{path}: layer {name!r} has {sorted(pair)} but no "
                             f"{sorted({'lora_A', 'lora_B'} - set(pair))[0]}: the adapter is corrupted.")
        A, B = pair["lora_A"], pair["lora_B"]
        if A.dim() != 2 or B.dim() != 2:
            raise NotNestable(f"{path}: layer {name!r} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}: LoRA "
                              f"on a convolution; only LoRA on Linear (and GPT-2 Conv1D) layers can be nested.")
        r = A.shape[0]
        if B.shape[1] != r:
            raise ValueError(f"{path}: layer {name!r} has lora_A {tuple(A.shape)} but lora_B {tuple(B.shape)}: the "
                             f"factors disagree on the rank; the adapter is corrupted.")
        expected = _expected_rank(config, name)
        if expected != r:
            raise ValueError(f"{path}: layer {name!r} stores rank-{r} factors but its config (r / rank_pattern) says "
                             f"r={expected}: the adapter is corrupted.")
        for part, t in (("lora_A", A), ("lora_B", B)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: tensor {PREFIX}{name}.{part}.weight has NaN or infinite values: the adapter "
                                 f"diverged or is corrupted; only finite factors can be nested.")
        layers[name] = (A, B, layer_scaling(config, name, r))
    return PeftLoRA(path=path, config=config, layers=layers, saved=saved)
