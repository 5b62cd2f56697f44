"""The base model an adapter belongs to: locate it, check that the adapter fits it, load it.

Every adapter records what it needs of its base: the layers it adapts (name, input and output features, whether
the layer is a GPT-2 ``Conv1D``), the shapes of its ``modules_to_save`` tensors and, for our own format, the
transformers class it was trained on. :class:`BaseRecord` holds that record, and :func:`check_fits` is the one
"does this adapter fit this model?" check (loading, merging, exporting for a base, nesting a PEFT adapter).

A base given as a directory or hub name is checked *before* any weight is loaded (:func:`locate_base`):

1. :func:`resolve_base` turns the argument into what ``from_pretrained`` reads (the one place a base path is
   resolved: a missing directory, a file or a symlink loop is refused here, naming the path);
2. its ``config.json`` is read, and a different architecture (``model_type``) than the adapter's is refused;
3. the model is built on the ``meta`` device (shapes only, no memory), and :func:`check_fits` runs on it.

Only then does :func:`load_base` call ``from_pretrained``. So ``merge`` of a Llama adapter with a GPT-2 directory
fails in one line instead of building a default-size Llama.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapter_format import SavedAdapter
from .adapter_save import model_root
from .gguf_base import gguf_path
from .gguf_base import resolve_base as resolve_gguf
from .layer import MatryoshkaLinear, is_supported, layer_dims

#: PEFT ``task_type`` → the transformers auto class that loads a base for it (causal LM when unknown)
AUTO_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
                "QUESTION_ANS": "AutoModelForQuestionAnswering", "FEATURE_EXTRACTION": "AutoModel"}


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """An adapted layer as the adapter needs it: features in and out; ``conv1d`` True for a GPT-2 ``Conv1D``,
    False for ``nn.Linear``, None when the adapter does not say; the rank of its factors."""

    in_features: int
    out_features: int
    conv1d: bool | None = None
    rank: int | None = None  # the factors' rank (lora_A is rank × in, lora_B out × rank), for messages


@dataclasses.dataclass(frozen=True)
class BaseRecord:
    """What an adapter records about the base model it fits.

    layers: layer name (relative to the transformers model) → :class:`LayerShape`.
    saved: ``modules_to_save`` tensor key → shape.
    base_name / base_class / task_type: the recorded base (``base_model_name_or_path``), its transformers class
    name and PEFT task type, each None when unknown.

    >>> record = BaseRecord({"fc": LayerShape(4, 2, conv1d=False)}, {}, base_name="tiny")
    >>> check_fits(record, nn.ModuleDict({"fc": nn.Linear(4, 2)}))[0]
    ''
    >>> try:
    ...     check_fits(record, nn.ModuleDict({"fc": nn.Linear(8, 2)}))
    ... except ValueError as err:
    ...     print(str(err).split(" but")[0])
    Shape mismatch at layer 'fc': the model's layer maps 8 → 2 features
    """

    layers: Mapping[str, LayerShape]
    saved: Mapping[str, tuple[int, ...]]
    base_name: str | None = None
    base_class: str | None = None
    task_type: str | None = None

    def made_for(self) -> str:
        """Where the adapter comes from, for messages: "saved from 'x'", "saved from a LlamaForCausalLM"…"""
        if self.base_name:
            return f"saved from {self.base_name!r}"
        if self.base_class:
            return f"saved from a {self.base_class}"
        return "base unknown"


def record_of(adapter: SavedAdapter) -> BaseRecord:
    """The :class:`BaseRecord` of one of our adapters."""
    return BaseRecord(
        layers={n: LayerShape(i.in_features, i.out_features, i.conv1d, adapter.r_max) for n, i in adapter.layers.items()},
        saved={k: tuple(adapter.tensors[k].shape) for k in adapter.saved_keys},
        base_name=adapter.base_model_name_or_path, base_class=adapter.base_model_class, task_type=adapter.task_type)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is (or wraps) a GPT-2 ``Conv1D``, whose weight is stored ``in × out``."""
    if isinstance(module, MatryoshkaLinear):
        return bool(module.is_conv1d)
    return isinstance(module, Conv1D)


def check_fits(record: BaseRecord, model: nn.Module, *, adapted: bool = False) -> tuple[str, nn.Module]:
    """Find where the adapter belongs in ``model`` and check every layer and tensor shape against ``record``.

    ``model`` may be a real model or one built on the ``meta`` device. With ``adapted`` the layers are expected
    to be :class:`MatryoshkaLinear` already (an adapter loaded over another); otherwise an adapted layer is
    refused. Returns (name, root) of the module that the adapter's keys are relative to. Raises ``ValueError``
    naming the first difference: a missing layer, a layer of another type, a shape or orientation mismatch, a
    missing or differently shaped ``modules_to_save`` tensor.
    """
    found = model_root(model, lambda _n, root: all(n in dict(root.named_modules()) for n in record.layers))
    if found is None:
        root = model_root(model, lambda n, m: True)[1]  # the outermost transformers model (or model) for the message
        mods = dict(root.named_modules())
        missing = [n for n in record.layers if n not in mods]
        raise ValueError(f"The model has no layer {missing[0]!r} ({len(missing)} of the adapter's {len(record.layers)} "
                         f"layers are missing): the adapter was trained on a different base model "
                         f"({record.made_for()}), or on a model of a different architecture.")
    name, root = found
    mods = dict(root.named_modules())
    for layer_name, want in record.layers.items():
        module = mods[layer_name]
        if isinstance(module, MatryoshkaLinear):
            if not adapted:
                raise ValueError("The model is already adapted: load the adapter into a fresh base model.")
            in_f, out_f = module.in_features, module.out_features
        elif not is_supported(module):
            raise ValueError(f"Layer {layer_name!r} of the model is a {type(module).__name__}; only LoRA on Linear "
                             f"(and GPT-2 Conv1D) layers is supported, so the adapter was trained on a different base "
                             f"({record.made_for()}).")
        else:
            in_f, out_f = layer_dims(module)
        if (in_f, out_f) != (want.in_features, want.out_features):
            factors = (f" lora_A {(want.rank, want.in_features)} and lora_B {(want.out_features, want.rank)}"
                       if want.rank is not None else "")
            raise ValueError(f"Shape mismatch at layer {layer_name!r}: the model's layer maps {in_f} → {out_f} features "
                             f"but the adapter's factors{factors} were trained for {want.in_features} → "
                             f"{want.out_features}: the adapter belongs to a different base model "
                             f"({record.made_for()}).")
        if want.conv1d is not None and want.conv1d != is_conv1d(module):
            kinds = ("a GPT-2 Conv1D", "an nn.Linear")
            raise ValueError(f"Layer {layer_name!r} of the model is {kinds[not is_conv1d(module)]} but the adapter was "
                             f"trained on {kinds[not want.conv1d]} (its weight is stored transposed): the adapter "
                             f"belongs to a different base model ({record.made_for()}).")
    state = root.state_dict()
    for key, shape in record.saved.items():
        if key not in state:
            raise ValueError(f"The model has no tensor {key!r} (modules_to_save): the adapter belongs to a different "
                             f"base model ({record.made_for()}).")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"Shape mismatch at {key!r} (modules_to_save): the model has {tuple(state[key].shape)}, "
                             f"the adapter {tuple(shape)}: the adapter belongs to a different base model "
                             f"({record.made_for()}).")
    return name, root


# ------------------------------------------------------------------------------------------ locate and load
def _looks_like_path(text: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, ./ ../ ~ or several '/' (hub ids have one)."""
    return (os.path.isabs(text) or text.startswith((".", "~")) or text.count("/") > 1 or os.sep != "/"
            and os.sep in text)


def resolve_base(base: str | os.PathLike) -> str:
    """What ``from_pretrained`` should read for ``base``: an existing local directory (returned as given), a GGUF
    file (``*.gguf``, or the alias ``"smollm2"``; its converted directory in the cache, converted on first use by
    :func:`lightning_matlora.gguf_base.resolve_base`), or a hub name (returned as is; transformers resolves it, from
    its cache when offline).

    The one place a base path is resolved. Raises ``FileNotFoundError`` for a local path that does not exist or
    is a symlink loop, ``ValueError`` for a file that is not a model directory or a model GGUF file
    (:class:`~lightning_matlora.gguf_base.GGUFError` for a GGUF adapter or an architecture transformers cannot read).
    """
    text = os.fspath(base)
    if not text.strip():
        raise ValueError("The base model is an empty string: give a local directory, a GGUF file or a hub model name.")
    if gguf_path(text) is not None:
        return resolve_gguf(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    if path.is_symlink() and not path.exists():
        raise FileNotFoundError(f"Base model {text}: a symbolic link that leads nowhere (a missing target or a link "
                                f"loop): give the base model's directory.")
    if path.exists():
        raise ValueError(f"Base model {text} is a file, not a directory: give the directory that holds its "
                         f"config.json and weights (what save_pretrained writes).")
    if _looks_like_path(text) or (str(path.parent) != "." and path.parent.is_dir()):
        raise FileNotFoundError(f"No base model directory at {text}: give a local directory holding config.json "
                                f"and weights (what save_pretrained writes), or a hub model name.")
    return text


def read_base_config(path: str) -> Any:
    """The transformers config of the resolved base ``path`` (its ``config.json``), read without loading any
    weight. Raises ``ValueError`` naming the file for a missing, unreadable or unknown config."""
    local = Path(path).is_dir()
    if local:
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: it is not a transformers model directory (give what "
                                    f"save_pretrained writes).")
        try:
            json.loads(cfg_file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{cfg_file} is not UTF-8 text: the file is corrupted or not a model config.") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON ({e}): the file is corrupted.") from None
    try:
        return transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        where = f"{path}/config.json" if local else f"the base model {path!r}"
        raise ValueError(f"Cannot read {where}: {_one_line(e)}") from None


def _one_line(err: BaseException, limit: int = 300) -> str:
    return " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())[:limit]


def base_class(record: BaseRecord) -> Any:
    """The transformers class that loads the base: the adapter's recorded class when transformers has it, else the
    auto class of its task type (causal LM by default)."""
    cls = getattr(transformers, record.base_class, None) if record.base_class else None
    if cls is not None and hasattr(cls, "from_pretrained") and hasattr(cls, "config_class"):
        return cls
    return getattr(transformers, AUTO_CLASSES.get(record.task_type or "CAUSAL_LM", "AutoModelForCausalLM"))


def check_architecture(record: BaseRecord, config: Any, what: str) -> None:
    """Refuse a base whose ``model_type`` differs from that of the transformers class the adapter was trained on
    (``what`` names the base in the message)."""
    cls = base_class(record)
    want = getattr(getattr(cls, "config_class", None), "model_type", None)
    have = getattr(config, "model_type", None)
    if want and have and want != have:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "architecture not recorded"
        raise ValueError(f"{what} is a {have!r} model ({archs}) but the adapter was trained on a {want!r} "
                         f"model ({record.base_class}, {record.made_for()}): pass the base model it was trained on.")


def locate_base(base: str | os.PathLike, record: BaseRecord) -> tuple[str, Any]:
    """Resolve ``base``, read its config, and check that the adapter fits it, without loading any weight (the
    model is built on the ``meta`` device). Returns (the path ``from_pretrained`` reads, the class to load it
    with). Raises ``ValueError``/``FileNotFoundError`` naming the path and the difference."""
    path = resolve_base(base)
    config = read_base_config(path)
    check_architecture(record, config, f"Base model {path}")
    cls = base_class(record)
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"Base model {path}: {cls.__name__} cannot build its config.json ({_one_line(e)}).") from None
    try:
        check_fits(record, skeleton)
    except ValueError as e:
        raise ValueError(f"Base model {path}: {e}") from None
    return path, cls


def load_base(base: str | os.PathLike, record: BaseRecord) -> nn.Module:
    """Locate and check ``base`` (:func:`locate_base`, nothing loaded yet), then load it with ``from_pretrained``
    (in eval mode). Raises ``ValueError`` naming the base when loading fails (e.g. a pickle that transformers'
    weights-only loading refuses)."""
    path, cls = locate_base(base, record)
    try:
        return cls.from_pretrained(path).eval()
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; name the base and the reason in one line
        raise ValueError(f"Cannot load the base model {path!r} with {cls.__name__}.from_pretrained: "
                         f"{_one_line(e)}") from e
