"""The on-disk format of a nested adapter: one directory, safetensors + JSON, no pickle, read strictly.

A saved adapter is a directory holding

- ``adapter_model.safetensors``: the factors at full ``r_max`` — ``<layer>.lora_A`` (``r_max × in``) and
  ``<layer>.lora_B`` (``out × r_max``), PEFT's orientation — plus the tensors of ``modules_to_save`` under their
  ``state_dict`` keys, and nothing else.
- ``matlora_config.json``: the fields of :data:`FIELDS` (docs/adapters.md has the schema with every type).

Reading is strict: every field the writer writes is required, an unknown field is an error, every type is
checked, the weights' SHA-256 must match, only the listed tensors may be present, at the listed shapes, and
non-finite factors are refused unless asked for. Every problem raises :class:`AdapterFormatError` naming the
file and the field. Writes are atomic (:mod:`lightning_matlora.atomic`); a path left empty by a save killed
mid-swap is read from the previous adapter kept beside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_directory, fsync_path, interrupted_previous
from .config import MatLoRAConfig, legacy_values, stored_types
from .curve import RankCurve
from .version import __version__

FORMAT = "matryoshka-lora"
FORMAT_VERSION = 2
CONFIG_NAME = "matlora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
OWN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME})


class AdapterFormatError(ValueError):
    """A saved adapter directory is missing, incomplete, corrupted or not in a format this version reads.

    The message names the file and the field (or tensor) at fault.

    >>> import pathlib, tempfile
    >>> bad = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (bad / "matlora_config.json").write_text('{"format_version": 2}')
    >>> _ = (bad / "adapter_model.safetensors").write_bytes(b"")
    >>> try:
    ...     read_adapter(bad)
    ... except AdapterFormatError as err:   # a ValueError naming the file and the field
    ...     print(isinstance(err, ValueError), str(err).split(": ", 1)[1])
    True field 'format' must be 'matryoshka-lora': this is not a MatryoshkaLoRA adapter config.
    """


# ------------------------------------------------------------------------------------------------ in memory
@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """An adapted layer as stored: its input and output sizes and whether the base is a GPT-2 ``Conv1D``."""

    in_features: int
    out_features: int
    conv1d: bool


@dataclasses.dataclass
class SavedAdapter:
    """An adapter held in memory: what :func:`~lightning_matlora.save_adapter` writes and :func:`read_adapter`
    returns.

    ``tensors`` maps keys relative to the transformers model to CPU tensors: ``<layer>.lora_A`` (``r_max × in``),
    ``<layer>.lora_B`` (``out × r_max``) for each of ``layers``, and the ``modules_to_save`` tensors.
    ``curves`` are the measured rank curves (one per metric) recorded with the adapter.

    >>> import tempfile
    >>> from lightning_matlora import MatryoshkaLoRA, save_adapter
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                   num_attention_heads=2, num_key_value_heads=1)
    >>> model = LlamaForCausalLM(cfg)
    >>> _ = MatryoshkaLoRA(r_max=4, target_modules=["q_proj"], verbose=False).apply(model)
    >>> adapter = read_adapter(save_adapter(model, tempfile.mkdtemp() + "/ad"))
    >>> adapter.config.r_max, sorted(adapter.layers)
    (4, ['model.layers.0.self_attn.q_proj'])
    >>> tuple(adapter.tensors["model.layers.0.self_attn.q_proj.lora_A"].shape)
    (4, 16)
    """

    config: MatLoRAConfig
    layers: dict[str, LayerInfo]
    tensors: dict[str, torch.Tensor]
    saved_modules: list[str]  # module names (relative to the transformers model) of modules_to_save
    base_model_name_or_path: str | None = None
    base_model_class: str | None = None
    task_type: str | None = None
    peft_target_modules: list[str] | None = None
    curves: list[RankCurve] = dataclasses.field(default_factory=list)
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    library_version: str | None = None

    @property
    def r_max(self) -> int:
        return self.config.r_max

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A ``r_max × in``, lora_B ``out × r_max``) of layer ``name``."""
        return self.tensors[f"{name}.lora_A"], self.tensors[f"{name}.lora_B"]

    @property
    def saved_keys(self) -> list[str]:
        """Keys of the ``modules_to_save`` tensors."""
        return sorted(k for k in self.tensors if not is_factor_key(k))


def is_factor_key(key: str) -> bool:
    return key.endswith(".lora_A") or key.endswith(".lora_B")


def as_curves(curves: RankCurve | Sequence[RankCurve] | None) -> list[RankCurve]:
    """``None``, one :class:`RankCurve` or a sequence of them as a list (one curve per metric name)."""
    if curves is None:
        return []
    if isinstance(curves, RankCurve):
        curves = [curves]
    if isinstance(curves, (str, bytes, Mapping)) or not isinstance(curves, Sequence):
        raise TypeError(f"curves must be a lightning_matlora.curve.RankCurve or a list of them, got "
                        f"{type(curves).__name__} (build one with RankCurve(ranks, scores, metric, higher_is_better) or "
                        f"RankCurve.from_mapping({{rank: score}}, metric)).")
    out = list(curves)
    bad = [type(c).__name__ for c in out if not isinstance(c, RankCurve)]
    if bad:
        raise TypeError(f"curves must be RankCurve objects, got {bad[0]}.")
    names = [c.metric for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"curves has more than one curve for metric {dup}: record one curve per metric.")
    return out


# ------------------------------------------------------------------------------------------------ the schema
@dataclasses.dataclass(frozen=True)
class _Type:
    desc: str
    ok: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool))


STR = _Type("a string", lambda v: isinstance(v, str))
INT = _Type("an integer", _is_int)
POS_INT = _Type("an integer ≥ 1", lambda v: _is_int(v) and v >= 1)
NUM = _Type("a number", _is_num)
BOOL = _Type("true or false", lambda v: isinstance(v, bool))
OBJ = _Type("an object", lambda v: isinstance(v, dict))


def _list(t: _Type) -> _Type:
    return _Type(f"a list of {t.desc.removeprefix('a ').removeprefix('an ')}s",
                 lambda v: isinstance(v, list) and all(t.ok(x) for x in v))


def _either(*ts: _Type) -> _Type:
    return _Type(" or ".join(t.desc for t in ts), lambda v: any(t.ok(v) for t in ts))


def _null(t: _Type) -> _Type:
    return _Type(f"{t.desc} or null", lambda v: v is None or t.ok(v))


SHA256 = _Type("a SHA-256 hex digest (64 hex digits)", lambda v: isinstance(v, str) and bool(re.fullmatch(r"[0-9a-f]{64}", v)))

#: ``matlora_config.json`` of format version 2: every field, its type; all are required.
FIELDS: dict[str, _Type] = {
    "format": STR,
    "format_version": INT,
    "library_version": STR,
    "config": OBJ,
    "adapted_layers": OBJ,
    "modules_to_save": _list(STR),
    "base_model_name_or_path": _null(STR),
    "base_model_class": _null(STR),
    "task_type": _null(STR),
    "peft_target_modules": _null(_list(STR)),
    "rank_curves": _list(OBJ),
    "metadata": OBJ,
    "weights_sha256": SHA256,
}
#: format version 1 (lightning_matlora 0.1): one optional curve and its AURAC instead of ``rank_curves``.
FIELDS_V1: dict[str, _Type] = {**{k: v for k, v in FIELDS.items() if k != "rank_curves"},
                                "rank_curve": _null(OBJ), "aurac": _null(NUM)}
#: one entry of ``adapted_layers``.
LAYER_FIELDS: dict[str, _Type] = {"in_features": POS_INT, "out_features": POS_INT, "conv1d": BOOL}
_TARGETS = _either(STR, _list(STR))
#: the JSON types of :data:`lightning_matlora.config.STORED_TYPES`, by name
_STORED: dict[str, _Type] = {
    "pos_int": POS_INT, "int": INT, "num": NUM, "bool": BOOL, "str": STR, "str?": _null(STR), "[int]": _list(INT),
    "[num]?": _null(_list(NUM)), "[str]?": _null(_list(STR)), "targets": _TARGETS, "targets?": _null(_TARGETS),
    "str|[int]": _either(STR, _list(INT)),
}
#: ``config``: the :class:`MatLoRAConfig` fields, typed as each field declares (``stored`` in its metadata); the
#: values are then validated by ``MatLoRAConfig`` itself.
CONFIG_FIELDS: dict[str, _Type] = {name: _STORED[t] for name, t in stored_types().items()}
#: what a file written before each later-added field existed was trained with (not today's defaults, which
#: differ); a file without such a field reads with this value (every other config field is required).
LEGACY_CONFIG_VALUES: dict[str, Any] = legacy_values()
#: config fields added after format version 2 first shipped (optional in a file).
OPTIONAL_CONFIG_FIELDS = tuple(LEGACY_CONFIG_VALUES)
_V1_CURVE_FIELDS = {"metric": STR, "ranks": _list(INT), "scores": _list(_null(NUM))}


def _check_fields(doc: Any, fields: Mapping[str, _Type], where: Path, field: str, required: Sequence[str] | None = None,
                  version_note: str = "") -> None:
    """Every field of ``required`` (default: all of ``fields``) present, no other field, each of its type."""
    label = f"field {field!r}" if field else "the top level"
    if not isinstance(doc, dict):
        raise AdapterFormatError(f"{where}: {label} must be an object, got {_show(doc)}.")
    required = list(fields) if required is None else list(required)
    missing = [f for f in required if f not in doc]
    if missing:
        raise AdapterFormatError(f"{where}: missing field{'s' if len(missing) > 1 else ''} "
                                 f"{', '.join(repr(_join(field, f)) for f in missing)}: the file is incomplete or was "
                                 f"edited; save the adapter again.")
    unknown = sorted(set(doc) - set(required))
    if unknown:
        raise AdapterFormatError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} "
                                 f"{', '.join(repr(_join(field, f)) for f in unknown)}{version_note}.")
    for f in required:
        t = fields.get(f)
        if t is not None and not t.ok(doc[f]):
            raise AdapterFormatError(f"{where}: field {_join(field, f)!r} must be {t.desc}, got {_show(doc[f])}.")


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, (bytes, bytearray)) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_config(doc: dict[str, Any], where: Path, note: str) -> MatLoRAConfig:
    required = [f.name for f in dataclasses.fields(MatLoRAConfig)
                if f.name not in OPTIONAL_CONFIG_FIELDS or (isinstance(doc, dict) and f.name in doc)]
    _check_fields(doc, CONFIG_FIELDS, where, "config", required, note)
    doc = {**{f: LEGACY_CONFIG_VALUES[f] for f in OPTIONAL_CONFIG_FIELDS if f not in doc}, **doc}
    try:
        return MatLoRAConfig.from_dict(doc)
    except (ValueError, TypeError) as e:
        raise AdapterFormatError(f"{where}: field 'config' is invalid: {e}") from None


def _parse_layers(doc: dict[str, Any], where: Path, note: str) -> dict[str, LayerInfo]:
    if not doc:
        raise AdapterFormatError(f"{where}: field 'adapted_layers' is empty: an adapter has at least one layer.")
    layers = {}
    for name, info in doc.items():
        _check_fields(info, LAYER_FIELDS, where, f"adapted_layers.{name}", version_note=note)
        layers[name] = LayerInfo(info["in_features"], info["out_features"], info["conv1d"])
    return layers


def _parse_curves(doc: dict[str, Any], version: int, where: Path, note: str) -> list[RankCurve]:
    if version == 1:
        old = doc["rank_curve"]
        if old is None:
            return []
        _check_fields(old, _V1_CURVE_FIELDS, where, "rank_curve", version_note=note)
        metric = old["metric"] or "score"
        try:  # version 1 did not record the direction: a name with "loss" is minimised (save_best_mode="auto")
            return [RankCurve(tuple(old["ranks"]), tuple(old["scores"]), metric, "loss" not in metric.lower())]
        except ValueError as e:
            raise AdapterFormatError(f"{where}: field 'rank_curve' is invalid: {e}") from None
    curves = []
    for i, c in enumerate(doc["rank_curves"]):
        try:
            curves.append(RankCurve.from_json(c))
        except ValueError as e:
            raise AdapterFormatError(f"{where}: field 'rank_curves[{i}]' is invalid: {e}") from None
    try:
        return as_curves(curves)
    except ValueError as e:
        raise AdapterFormatError(f"{where}: field 'rank_curves' is invalid: {e}") from None


# ------------------------------------------------------------------------------------------------- write
def write_adapter(adapter: SavedAdapter, path: str | os.PathLike) -> Path:
    """Write a :class:`SavedAdapter` to the directory ``path`` atomically.

    An existing adapter directory at ``path`` is replaced; any other existing non-empty directory is refused.
    Returns ``path``.
    """
    path = Path(path)
    _refuse_foreign_dir(path)
    check_tensors(adapter, path / WEIGHTS_NAME, allow_nonfinite=True)
    bad = nonfinite_tensors(adapter.tensors)
    if bad:
        warnings.warn(f"The adapter saved to {path} has NaN or infinite values in {len(bad)} tensors (e.g. {bad[0]!r}): "
                      f"training diverged. It is saved as it is; reading it back needs allow_nonfinite=True.",
                      stacklevel=3)
    curves = as_curves(adapter.curves)

    def write(tmp: Path) -> None:
        weights = tmp / WEIGHTS_NAME
        save_file(adapter.tensors, str(weights),
                  metadata={"format": "pt", "matlora_format_version": str(FORMAT_VERSION)})
        fsync_path(weights)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": adapter.library_version or __version__,
            "config": adapter.config.to_dict(),
            "adapted_layers": {n: dataclasses.asdict(i) for n, i in adapter.layers.items()},
            "modules_to_save": list(adapter.saved_modules),
            "base_model_name_or_path": adapter.base_model_name_or_path,
            "base_model_class": adapter.base_model_class,
            "task_type": adapter.task_type,
            "peft_target_modules": adapter.peft_target_modules,
            "rank_curves": [c.to_json() for c in curves],
            "metadata": adapter.metadata,
            "weights_sha256": sha256_file(weights),
        }
        cfg = tmp / CONFIG_NAME
        cfg.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        fsync_path(cfg)

    atomic_directory(path, write, replace=True)
    return path


def _refuse_foreign_dir(path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory: choose another adapter path.")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_FILES)
        if foreign:
            raise FileExistsError(f"{path} exists and holds files that are not a MatryoshkaLoRA adapter "
                                  f"({', '.join(foreign[:5])}): save the adapter into a new or empty directory.")


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_adapter_dir(p: Path) -> bool:
    """Whether ``p`` holds both files of an adapter (not whether they are valid)."""
    return (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file()


# -------------------------------------------------------------------------------------------------- read
def read_adapter(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> SavedAdapter:
    """Read and fully validate a saved adapter directory without touching a model.

    Checks every field and type of ``matlora_config.json`` (see :data:`FIELDS`), the weights' SHA-256, that the
    weights file holds exactly the listed layers' factors and ``modules_to_save`` tensors at the listed shapes, and
    that every value is finite (``allow_nonfinite=True`` reads a diverged adapter anyway).

    When ``path`` is missing because a save was killed between its two renames, the previous adapter kept beside
    it is read instead (with a warning); the next save to ``path`` cleans up.

    Raises ``FileNotFoundError`` when there is no adapter at ``path`` and :class:`AdapterFormatError` for anything
    wrong with it, naming the file and the field.

    Example:
        >>> import tempfile, torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from lightning_matlora import MatryoshkaLoRA, save_adapter, read_adapter
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
        >>> _ = MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
        >>> path = save_adapter(model, tempfile.mkdtemp() + "/ad")
        >>> a = read_adapter(path)
        >>> a.r_max, len(a.layers), a.factors("model.layers.0.self_attn.q_proj")[0].shape
        (4, 7, torch.Size([4, 16]))
    """
    path = Path(path)
    if not path.is_dir():
        previous = interrupted_previous(path, is_adapter_dir)
        if previous is None:
            raise FileNotFoundError(f"No adapter directory at {path}.")
        warnings.warn(f"No adapter at {path}: a save there was interrupted; reading the previous adapter kept in "
                      f"{previous} (the next save to {path} replaces it and cleans up).", stacklevel=2)
        path = previous
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        if (path / "adapter_config.json").is_file():
            raise AdapterFormatError(f"{path} holds a PEFT adapter (adapter_config.json), not a MatryoshkaLoRA adapter: "
                                     f"load it with peft.PeftModel.from_pretrained(base, {str(path)!r}).")
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: it is not an adapter written by save_adapter.")
    doc = _load_json(cfg_path)
    version = _check_header(doc, cfg_path)
    fields = FIELDS if version == FORMAT_VERSION else FIELDS_V1
    note = f" (not part of adapter format version {version}, which the file declares)"
    _check_fields(doc, fields, cfg_path, "", version_note=note)
    config = _parse_config(doc["config"], cfg_path, note)
    layers = _parse_layers(doc["adapted_layers"], cfg_path, note)
    curves = _parse_curves(doc, version, cfg_path, note)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise AdapterFormatError(f"{weights} is missing: the adapter is incomplete; save it again.")
    size = weights.stat().st_size
    if sha256_file(weights) != doc["weights_sha256"]:
        raise AdapterFormatError(f"{weights} is corrupted or truncated: its SHA-256 differs from field "
                                 f"'weights_sha256' of {CONFIG_NAME} ({size} bytes on disk); copy or save the adapter "
                                 f"again.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFormatError(f"{weights} cannot be read ({' '.join(str(e).split())}): copy or save the adapter "
                                 f"again.") from None
    adapter = SavedAdapter(
        config=config, layers=layers, tensors=tensors, saved_modules=list(doc["modules_to_save"]),
        base_model_name_or_path=doc["base_model_name_or_path"], base_model_class=doc["base_model_class"],
        task_type=doc["task_type"], peft_target_modules=doc["peft_target_modules"], curves=curves,
        metadata=doc["metadata"], library_version=doc["library_version"])
    check_tensors(adapter, weights, allow_nonfinite)
    return adapter


def _load_json(cfg_path: Path) -> Any:
    def refuse(token: str) -> Any:
        raise ValueError(f"{token} is not valid JSON")

    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"), parse_constant=refuse)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path} is not valid JSON ({e}): the file is corrupted; save the adapter "
                                 f"again.") from None


def _check_header(doc: Any, cfg_path: Path) -> int:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise AdapterFormatError(f"{cfg_path}: field 'format' must be {FORMAT!r}: this is not a MatryoshkaLoRA adapter "
                                 f"config.")
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise AdapterFormatError(f"{cfg_path}: field 'format_version' must be an integer ≥ 1, got "
                                 f"{_show(version) if 'format_version' in doc else 'nothing (missing)'}.")
    if version > FORMAT_VERSION:
        raise AdapterFormatError(f"{cfg_path}: adapter format version {version}, newer than this lightning_matlora "
                                 f"({__version__}) reads (version {FORMAT_VERSION}): upgrade lightning_matlora "
                                 f"(pip install -U lightning_matlora) to load it (written by version "
                                 f"{doc.get('library_version')}).")
    return version


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of the floating-point tensors holding a NaN or infinite value."""
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))


def check_tensors(adapter: SavedAdapter, weights: Path, allow_nonfinite: bool = False) -> None:
    """The weights hold exactly the listed factors (at ``r_max × in`` / ``out × r_max``) and ``modules_to_save``
    tensors, all floating point and (unless ``allow_nonfinite``) finite."""
    r = adapter.r_max
    expected = {f"{n}.lora_{x}" for n in adapter.layers for x in "AB"}
    saved = [m + "." for m in adapter.saved_modules]
    unlisted = sorted(k for k in adapter.tensors
                      if k not in expected and not (not is_factor_key(k) and any(k.startswith(m) for m in saved)))
    if unlisted:
        raise AdapterFormatError(f"{weights}: tensor {unlisted[0]!r}{f' (and {len(unlisted) - 1} more)' if len(unlisted) > 1 else ''} "
                                 f"is neither a factor of a layer in 'adapted_layers' nor part of a module in "
                                 f"'modules_to_save': only the adapter's own tensors may be in the file; save the "
                                 f"adapter again.")
    missing = sorted(expected - set(adapter.tensors))
    if missing:
        raise AdapterFormatError(f"{weights}: tensor {missing[0]!r} of a layer in 'adapted_layers' is missing"
                                 f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the adapter is "
                                 f"incomplete; save it again.")
    for name, info in adapter.layers.items():
        for key, want in ((f"{name}.lora_A", (r, info.in_features)), (f"{name}.lora_B", (info.out_features, r))):
            got = tuple(adapter.tensors[key].shape)
            if got != want:
                raise AdapterFormatError(
                    f"{weights}: tensor {key!r} has shape {got} but 'adapted_layers' and 'config.r_max' say r_max={r}, "
                    f"in={info.in_features}, out={info.out_features} (expected {want}): the adapter is corrupted.")
    not_float = sorted(k for k, t in adapter.tensors.items() if not t.is_floating_point())
    if not_float:
        raise AdapterFormatError(f"{weights}: tensor {not_float[0]!r} has dtype {adapter.tensors[not_float[0]].dtype}, "
                                 f"not a floating-point type: the adapter is corrupted.")
    if not allow_nonfinite:
        bad = nonfinite_tensors(adapter.tensors)
        if bad:
            raise AdapterFormatError(f"{weights}: tensor {bad[0]!r}{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''} "
                                     f"holds NaN or infinite values (the training diverged): pass "
                                     f"allow_nonfinite=True to read it anyway.")


def json_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metadata`` as stored: a JSON object of finite numbers, strings, lists and objects."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping of JSON-serialisable values, got {type(metadata).__name__}.")
    try:
        return json.loads(json.dumps(dict(metadata), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"save_adapter metadata must be JSON-serialisable (finite numbers, strings, lists, dicts): "
                         f"{e}") from None
