"""Saving and loading a nested adapter: one directory, safetensors + JSON, no pickle.

A saved adapter is a directory holding

- ``adapter_model.safetensors``: the factors at full ``r_max`` — ``<layer>.lora_A`` (``r_max × in``) and
  ``<layer>.lora_B`` (``out × r_max``), PEFT's orientation — plus the tensors of ``modules_to_save`` under their
  ``state_dict`` keys. Keys are relative to the transformers model (a LightningModule attribute prefix such as
  ``model.`` is stripped), so the adapter loads into a bare ``AutoModelForCausalLM`` as well as into the module it
  was trained in.
- ``matlora_config.json``: ``format_version``, the :class:`MatLoRAConfig`, the adapted layers with their shapes,
  the base model's ``name_or_path`` and class when known, the library version, the SHA-256 of the weights file,
  and the measured rank curve and AURAC when given.

Writes are atomic: everything is written into a hidden temporary directory beside the target, flushed, and only
then renamed into place, so a crash or a full disk mid-save leaves the previous adapter as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MatLoRAConfig
from .distributed import clean_name, full_adapter_state_dict
from .inject import _saved_prefixes, adapted_layers, freeze_base, inject
from .layer import MatryoshkaLinear, is_supported, layer_dims
from .model import controller_of
from .rank import RankController

FORMAT = "matryoshka-lora"
FORMAT_VERSION = 1
CONFIG_NAME = "matlora_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_OWN_FILES = {CONFIG_NAME, WEIGHTS_NAME}


def _library_version() -> str:
    from . import __version__

    return __version__


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """An adapted layer as stored: its input and output sizes and whether the base is a GPT-2 ``Conv1D``."""

    in_features: int
    out_features: int
    conv1d: bool


@dataclasses.dataclass
class SavedAdapter:
    """An adapter held in memory: what :func:`save_adapter` writes and :func:`read_adapter` returns.

    ``tensors`` maps keys relative to the transformers model to CPU tensors: ``<layer>.lora_A`` (``r_max × in``),
    ``<layer>.lora_B`` (``out × r_max``) for each of ``layers``, and the ``modules_to_save`` tensors.
    """

    config: MatLoRAConfig
    layers: dict[str, LayerInfo]
    tensors: dict[str, torch.Tensor]
    saved_modules: list[str]  # module names (relative to the transformers model) of modules_to_save
    base_model_name_or_path: str | None = None
    base_model_class: str | None = None
    task_type: str | None = None
    peft_target_modules: list[str] | None = None
    rank_curve: dict[str, Any] | None = None
    aurac: float | None = None
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
        return sorted(k for k in self.tensors if not _is_factor_key(k))

    def score_at(self, rank: int) -> float | None:
        """The stored measured score at ``rank`` (None if no curve, or the rank was not measured)."""
        if not self.rank_curve:
            return None
        for r, s in zip(self.rank_curve["ranks"], self.rank_curve["scores"]):
            if r == rank:
                return s
        return None


def _is_factor_key(key: str) -> bool:
    return key.endswith(".lora_A") or key.endswith(".lora_B")


# --------------------------------------------------------------------------------------- the model's root
def _transformers_types() -> tuple[type, ...]:
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
    types = _transformers_types()
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


# ---------------------------------------------------------------------------------------------- snapshot
def snapshot(model: nn.Module, *, curve: Any = None, aurac: float | None = None,
             **metadata: Any) -> SavedAdapter:
    """The adapter of an adapted ``model`` (a transformers model, or a module holding one) as a
    :class:`SavedAdapter` on CPU, with keys relative to the transformers model. See :func:`save_adapter`."""
    ctrl = controller_of(model)
    layers = adapted_layers(model)
    merged = sorted(n for n, m in layers.items() if m.merged_rank is not None)
    if merged:
        raise RuntimeError(f"The model is merged at rank {layers[merged[0]].merged_rank}: call unmerge(model) before "
                           f"saving or exporting its adapter (the factors are saved, not merged weights).")
    # the full adapter on every process (gathers FSDP/FSDP2/ZeRO-3 shards: a collective), wrapper names cleaned
    state = full_adapter_state_dict(model)
    layers = {clean_name(n): m for n, m in layers.items()}
    saved_prefixes = [clean_name(p) for p in _saved_prefixes(model, ctrl.config)]
    owned = list(layers) + saved_prefixes
    root_name, root = model_root(model, lambda n, _m: not n or all(o.startswith(clean_name(n) + ".") for o in owned))
    prefix = clean_name(root_name) + "." if root_name else ""
    tensors = {k[len(prefix):]: v.contiguous() for k, v in state.items()}
    infos = {name[len(prefix):]: LayerInfo(layer.in_features, layer.out_features, bool(layer.is_conv1d))
             for name, layer in sorted(layers.items())}
    rel_layers = list(infos)
    return SavedAdapter(
        config=MatLoRAConfig.from_dict(ctrl.config.to_dict()), layers=infos, tensors=tensors,
        saved_modules=[m[len(prefix):] for m in saved_prefixes],
        base_model_name_or_path=base_model_name(root), base_model_class=type(root).__name__,
        task_type=task_type_of(root), peft_target_modules=peft_target_modules(root, rel_layers),
        rank_curve=normalize_curve(curve), aurac=_check_aurac(aurac), metadata=_jsonable(metadata),
        library_version=_library_version())


def normalize_curve(curve: Any, metric: str | None = None) -> dict[str, Any] | None:
    """A rank curve as stored: ``{"metric": name, "ranks": [...], "scores": [...]}`` (ranks ascending).

    Accepts that dict itself, a mapping rank → score, a sequence of (rank, score) pairs, or an object with
    ``ranks``/``scores`` attributes (and optionally ``metric``) or a ``to_dict()`` method returning one of these.
    """
    if curve is None:
        return None
    if hasattr(curve, "to_dict") and callable(curve.to_dict):
        curve = curve.to_dict()
    elif hasattr(curve, "ranks") and hasattr(curve, "scores"):
        curve = {"metric": getattr(curve, "metric", metric), "ranks": list(curve.ranks), "scores": list(curve.scores)}
    if isinstance(curve, Mapping) and "ranks" in curve and "scores" in curve:
        metric = curve.get("metric", metric)
        pairs = list(zip(curve["ranks"], curve["scores"]))
        if len(pairs) != len(curve["ranks"]) or len(pairs) != len(curve["scores"]):
            raise ValueError("curve has different numbers of ranks and scores: give one score per rank.")
    elif isinstance(curve, Mapping):
        pairs = list(curve.items())
    else:
        try:
            pairs = [tuple(p) for p in curve]
        except TypeError:
            raise ValueError(f"curve must be a mapping rank → score, (rank, score) pairs or {{'ranks': [...], "
                             f"'scores': [...]}}, got {type(curve).__name__}.") from None
    out = []
    for r, s in pairs:
        r = int(r.item() if isinstance(r, torch.Tensor) else r)
        s = float(s.item() if isinstance(s, torch.Tensor) else s)
        out.append((r, s if math.isfinite(s) else None))  # a diverged rank: stored as null (JSON has no NaN)
    out.sort(key=lambda p: p[0])
    return {"metric": str(metric) if metric else "score", "ranks": [r for r, _ in out], "scores": [s for _, s in out]}


def _check_aurac(aurac: Any) -> float | None:
    if aurac is None:
        return None
    value = float(aurac.item() if isinstance(aurac, torch.Tensor) else aurac)
    return value if math.isfinite(value) else None  # a diverged run: stored as null (JSON has no NaN)


def _jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(metadata))
    except TypeError as e:
        raise ValueError(f"save_adapter metadata must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from None


# ------------------------------------------------------------------------------------------------- write
def save_adapter(model: nn.Module, path: str | os.PathLike, *, curve: Any = None, aurac: float | None = None,
                 **metadata: Any) -> Path:
    """Save the nested adapter of ``model`` (all ``r_max`` components) to the directory ``path``.

    Args:
        model: an adapted model: a transformers model, or a module (e.g. a LightningModule) holding one; keys are
            stored relative to the transformers model.
        path: the adapter directory. An existing adapter directory there is replaced atomically; any other
            existing non-empty directory is refused.
        curve: the measured rank curve (mapping rank → score, or ``{"metric", "ranks", "scores"}``).
        aurac: the measured AURAC of that curve.
        **metadata: further JSON-serialisable facts to keep (e.g. ``step=1000``).

    Returns the directory's path. Writes ``adapter_model.safetensors`` and ``matlora_config.json``.
    """
    return write_adapter(snapshot(model, curve=curve, aurac=aurac, **metadata), path)


def write_adapter(adapter: SavedAdapter, path: str | os.PathLike) -> Path:
    """Write a :class:`SavedAdapter` to ``path`` atomically (see :func:`save_adapter`)."""
    path = Path(path)
    _refuse_foreign_dir(path)

    def write(tmp: Path) -> None:
        weights = tmp / WEIGHTS_NAME
        save_file(adapter.tensors, str(weights), metadata={"format": "pt", "matlora_format_version": str(FORMAT_VERSION)})
        _fsync(weights)
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "library_version": adapter.library_version or _library_version(),
            "config": adapter.config.to_dict(),
            "adapted_layers": {n: dataclasses.asdict(i) for n, i in adapter.layers.items()},
            "modules_to_save": list(adapter.saved_modules),
            "base_model_name_or_path": adapter.base_model_name_or_path,
            "base_model_class": adapter.base_model_class,
            "task_type": adapter.task_type,
            "peft_target_modules": adapter.peft_target_modules,
            "rank_curve": adapter.rank_curve,
            "aurac": adapter.aurac,
            "metadata": adapter.metadata,
            "weights_sha256": _sha256(weights),
        }
        cfg = tmp / CONFIG_NAME
        cfg.write_text(json.dumps(doc, indent=2) + "\n")
        _fsync(cfg)

    atomic_directory(path, write, replace=True)
    return path


def _refuse_foreign_dir(path: Path) -> None:
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory: choose another adapter path.")
        foreign = sorted(p.name for p in path.iterdir() if p.name not in _OWN_FILES)
        if foreign:
            raise FileExistsError(f"{path} exists and holds files that are not a MatryoshkaLoRA adapter "
                                  f"({', '.join(foreign[:5])}): save the adapter into a new or empty directory.")


def atomic_directory(path: Path, write: Callable[[Path], None], replace: bool) -> None:
    """Build a directory with ``write(tmp)`` in a hidden temporary directory beside ``path``, then rename it to
    ``path``. With ``replace``, an existing ``path`` is swapped out only after the new one is complete; on any
    failure the temporary directory is removed and ``path`` is left as it was."""
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists: choose another output directory or pass overwrite=True "
                              f"(--overwrite on the command line).")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        write(tmp)
        _fsync(tmp)
        if path.exists():
            old = parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(p: Path) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:  # pragma: no cover - some filesystems refuse opening directories
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -------------------------------------------------------------------------------------------------- read
def read_adapter(path: str | os.PathLike) -> SavedAdapter:
    """Read and fully validate a saved adapter directory (checksum, keys and shapes) without touching a model.

    Raises ``FileNotFoundError`` for a missing directory or file, ``ValueError`` for a corrupted, truncated or
    inconsistent adapter or one written by a newer version of the format.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"No adapter directory at {path}.")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        if (path / "adapter_config.json").is_file():
            raise ValueError(f"{path} holds a PEFT adapter (adapter_config.json), not a MatryoshkaLoRA adapter: load it "
                             f"with peft.PeftModel.from_pretrained(base, {str(path)!r}).")
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: it is not an adapter written by save_adapter "
                                f"(or the save did not complete).")
    try:
        doc = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}): the file is corrupted; save the adapter again.") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or "format_version" not in doc:
        raise ValueError(f"{cfg_path} is not a MatryoshkaLoRA adapter config (no format={FORMAT!r} and format_version).")
    version = doc["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} uses adapter format version {version!r}, newer than this lightning_matlora "
                         f"({_library_version()}) reads (version {FORMAT_VERSION}): upgrade lightning_matlora "
                         f"(pip install -U lightning_matlora) to load it (written by version "
                         f"{doc.get('library_version')}).")
    config = MatLoRAConfig.from_dict(doc["config"])
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has no {WEIGHTS_NAME}: the adapter is incomplete; save it again.")
    expected_hash = doc.get("weights_sha256")
    if expected_hash and _sha256(weights) != expected_hash:
        raise ValueError(f"{weights} is corrupted or truncated (its SHA-256 differs from the one recorded at save "
                         f"time, {weights.stat().st_size} bytes on disk): copy or save the adapter again.")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{weights} is corrupted or truncated and cannot be read ({e}): copy or save the adapter "
                         f"again.") from None
    layers = {n: LayerInfo(int(i["in_features"]), int(i["out_features"]), bool(i["conv1d"]))
              for n, i in doc["adapted_layers"].items()}
    adapter = SavedAdapter(
        config=config, layers=layers, tensors=tensors, saved_modules=list(doc.get("modules_to_save") or []),
        base_model_name_or_path=doc.get("base_model_name_or_path"), base_model_class=doc.get("base_model_class"),
        task_type=doc.get("task_type"), peft_target_modules=doc.get("peft_target_modules"),
        rank_curve=doc.get("rank_curve"), aurac=doc.get("aurac"), metadata=doc.get("metadata") or {},
        library_version=doc.get("library_version"))
    _check_consistent(adapter, path)
    return adapter


def _check_consistent(adapter: SavedAdapter, path: Path) -> None:
    r = adapter.r_max
    expected = {f"{n}.lora_{x}" for n in adapter.layers for x in "AB"}
    factor_keys = {k for k in adapter.tensors if _is_factor_key(k)}
    missing, extra = sorted(expected - factor_keys), sorted(factor_keys - expected)
    if missing or extra:
        raise ValueError(f"{path}: the weights file and {CONFIG_NAME} disagree (missing tensors {missing[:3]}, "
                         f"unlisted tensors {extra[:3]}): the adapter is corrupted; save it again.")
    for name, info in adapter.layers.items():
        A, B = adapter.factors(name)
        if tuple(A.shape) != (r, info.in_features) or tuple(B.shape) != (info.out_features, r):
            raise ValueError(f"{path}: layer {name!r} stores lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} but "
                             f"its config says r_max={r}, in={info.in_features}, out={info.out_features} (expected "
                             f"{(r, info.in_features)} and {(info.out_features, r)}): the adapter is corrupted.")


# -------------------------------------------------------------------------------------------------- load
def check_base(adapter: SavedAdapter, model: nn.Module) -> tuple[str, nn.Module]:
    """Find where ``adapter`` belongs in an un-adapted ``model`` and check every layer and shape.

    Returns (name, root) of the module that the adapter's keys are relative to. Raises ``ValueError`` naming the
    first difference (a missing layer, a layer of another type, a shape mismatch) when the adapter does not fit.
    """
    def fits(_name: str, root: nn.Module) -> bool:
        mods = dict(root.named_modules())
        return all(n in mods for n in adapter.layers)

    found = model_root(model, fits)
    if found is None:
        root = model_root(model, lambda n, m: True)[1]  # the outermost transformers model (or model) for the message
        mods = dict(root.named_modules())
        missing = [n for n in adapter.layers if n not in mods]
        raise ValueError(f"The model has no layer {missing[0]!r} ({len(missing)} of the adapter's {len(adapter.layers)} "
                         f"layers are missing): the adapter was trained on a different base model "
                         f"({_base_text(adapter)}), or on a model of a different architecture.")
    name, root = found
    mods = dict(root.named_modules())
    for layer_name, info in adapter.layers.items():
        module = mods[layer_name]
        if isinstance(module, MatryoshkaLinear):
            raise ValueError("The model is already adapted: load the adapter into a fresh base model.")
        if not is_supported(module):
            raise ValueError(f"Layer {layer_name!r} of the model is a {type(module).__name__}, not a linear layer: the "
                             f"adapter was trained on a different base ({_base_text(adapter)}).")
        in_f, out_f = layer_dims(module)
        if (in_f, out_f) != (info.in_features, info.out_features):
            A, B = adapter.factors(layer_name)
            raise ValueError(f"Shape mismatch at layer {layer_name!r}: the model's layer maps {in_f} → {out_f} features "
                             f"but the adapter's factors lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} were "
                             f"trained for {info.in_features} → {info.out_features}: the adapter belongs to a different "
                             f"base model ({_base_text(adapter)}).")
    state = root.state_dict()
    for key in adapter.saved_keys:
        if key not in state:
            raise ValueError(f"The model has no tensor {key!r} (modules_to_save): the adapter belongs to a different base "
                             f"model ({_base_text(adapter)}).")
        if tuple(state[key].shape) != tuple(adapter.tensors[key].shape):
            raise ValueError(f"Shape mismatch at {key!r} (modules_to_save): the model has {tuple(state[key].shape)}, "
                             f"the adapter {tuple(adapter.tensors[key].shape)}: the adapter belongs to a different "
                             f"base model ({_base_text(adapter)}).")
    return name, root


def _base_text(adapter: SavedAdapter) -> str:
    if adapter.base_model_name_or_path:
        return f"saved from {adapter.base_model_name_or_path!r}"
    if adapter.base_model_class:
        return f"saved from a {adapter.base_model_class}"
    return "base unknown"


_RULE_FIELDS = ("r_max", "scaling", "alpha", "rank_scale", "ranks", "p")


def load_adapter(model: nn.Module, path: str | os.PathLike | SavedAdapter) -> nn.Module:
    """Load a saved adapter into ``model`` and return ``model``.

    ``model`` is either a fresh base model (a transformers model or a module holding one): the adapter's layers
    are injected (as :class:`MatryoshkaLinear` sharing a new :class:`RankController` built from the saved
    config), filled, and every other parameter but ``modules_to_save`` is frozen; or a model already adapted with
    the same r_max, layers and rank rule (e.g. by the callback), whose adapter is overwritten.

    Everything is validated before the model is touched: a corrupted file, a different base (a missing layer or a
    shape mismatch, named in the error), a different r_max or rank rule leave ``model`` unchanged.
    """
    adapter = path if isinstance(path, SavedAdapter) else read_adapter(path)
    if adapted_layers(model):
        root, layers = _check_adapted(adapter, model)
    else:
        _, root = check_base(adapter, model)
        names = sorted(adapter.layers)
        load_cfg = dataclasses.replace(adapter.config, target_modules=names, exclude_modules=None,
                                       modules_to_save=list(adapter.saved_modules) or None)
        controller = RankController(MatLoRAConfig.from_dict(adapter.config.to_dict()))
        with torch.random.fork_rng(devices=[]):  # the fresh factors' random init must not move the user's RNG
            injected = inject(root, load_cfg, controller)
        if sorted(injected) != names:  # pragma: no cover - check_base guarantees the names exist
            raise RuntimeError(f"Injected layers {sorted(injected)[:3]}… differ from the adapter's {names[:3]}….")
        freeze_base(root, load_cfg)
        layers = adapted_layers(root)
    with torch.no_grad():
        for name, layer in layers.items():
            A, B = adapter.factors(name)
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        state = root.state_dict(keep_vars=True)
        for key in adapter.saved_keys:
            state[key].data.copy_(adapter.tensors[key])
    return model


def _check_adapted(adapter: SavedAdapter, model: nn.Module) -> tuple[nn.Module, dict[str, MatryoshkaLinear]]:
    ctrl = controller_of(model)
    mine, saved = ctrl.config.to_dict(), adapter.config.to_dict()
    if mine["r_max"] != saved["r_max"]:
        raise ValueError(f"The adapter has r_max={saved['r_max']} but the model is adapted with r_max={mine['r_max']}: "
                         f"load it into a fresh base model, or adapt with r_max={saved['r_max']}.")
    diff = [f"{f}: adapter {saved[f]!r}, model {mine[f]!r}" for f in _RULE_FIELDS if saved[f] != mine[f]]
    if diff:
        raise ValueError(f"The adapter's rank rule differs from the model's adapter ({'; '.join(diff)}): load it into a "
                         f"fresh base model so that it keeps its own settings.")
    layers = adapted_layers(model)

    def fits(_name: str, root: nn.Module) -> bool:
        return set(adapted_layers(root)) == set(adapter.layers)

    found = model_root(model, fits)
    if found is None:
        found_names = sorted(layers)
        missing = sorted(set(adapter.layers) - {n.split(".", 1)[-1] for n in found_names} - set(found_names))
        raise ValueError(f"The model's adapted layers ({len(layers)}, e.g. {found_names[0]!r}) differ from the adapter's "
                         f"({len(adapter.layers)}, e.g. missing {missing[:2] or sorted(adapter.layers)[:2]}): "
                         f"load it into a fresh base model.")
    _, root = found
    root_layers = adapted_layers(root)
    state = root.state_dict()
    for name, info in adapter.layers.items():
        layer = root_layers[name]
        if (layer.in_features, layer.out_features) != (info.in_features, info.out_features):
            raise ValueError(f"Shape mismatch at layer {name!r}: the model's layer maps {layer.in_features} → "
                             f"{layer.out_features}, the adapter's {info.in_features} → {info.out_features}: the "
                             f"adapter belongs to a different base model ({_base_text(adapter)}).")
    for key in adapter.saved_keys:
        if key not in state or tuple(state[key].shape) != tuple(adapter.tensors[key].shape):
            raise ValueError(f"The model has no tensor {key!r} of shape {tuple(adapter.tensors[key].shape)} "
                             f"(modules_to_save): the adapter belongs to a different base model or configuration.")
    return root, root_layers


# ------------------------------------------------------------------------------------ from a Lightning run
ADAPTER_DIRNAME = "matlora_adapter"


def default_adapter_dir(trainer: Any) -> Path:
    """``<checkpoint dir>/matlora_adapter`` (next to the Lightning checkpoints), else ``<log_dir or
    default_root_dir>/matlora_adapter``."""
    ckpt = getattr(trainer, "checkpoint_callback", None)
    dirpath = getattr(ckpt, "dirpath", None) if ckpt is not None else None
    if dirpath:
        return Path(dirpath) / ADAPTER_DIRNAME
    return Path(getattr(trainer, "log_dir", None) or trainer.default_root_dir) / ADAPTER_DIRNAME


def run_metadata(trainer: Any, callbacks: Iterable[Any]) -> dict[str, Any]:
    """What a run knows about its adapter: the training step and epoch, and the latest measured rank curve and
    its AURAC — from the callback's rank curves (``MatryoshkaLoRA.last_curves``), else from the first
    of ``callbacks`` with a ``last_curve`` (and optionally ``last_aurac``) attribute."""
    meta: dict[str, Any] = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch)}
    for cb in callbacks:
        curves = getattr(cb, "last_curves", None)
        if curves:
            c = curves[0]  # the loss curve when measured (one curve is recorded until the format holds a list)
            meta["curve"] = {"metric": f"val/{c.metric}", "ranks": list(c.ranks), "scores": list(c.scores)}
            if math.isfinite(c.aurac()):  # a NaN rank makes the AURAC NaN: keep the curve, record no AURAC
                meta["aurac"] = c.aurac()
            return meta
    for cb in callbacks:
        curve = getattr(cb, "last_curve", None)
        if curve is not None:
            meta["curve"] = curve
            aurac = getattr(cb, "last_aurac", None)
            if aurac is not None:
                meta["aurac"] = aurac
            break
    return meta


def save_from_trainer(trainer: Any, pl_module: nn.Module, path: str | os.PathLike, callbacks: Iterable[Any],
                      **extra: Any) -> Path:
    """Save the module's adapter from inside a run: every process takes part (sharded parameters are gathered),
    global rank 0 writes. Returns the path."""
    meta = {**run_metadata(trainer, callbacks), **extra}
    adapter = snapshot(pl_module, **meta)
    path = Path(path)
    if trainer.is_global_zero:
        write_adapter(adapter, path)
    trainer.strategy.barrier("matlora_save_adapter")
    return path


def metric_value(trainer: Any, monitor: str) -> float | None:
    """The current value of a logged metric (None if it was not logged)."""
    value = trainer.callback_metrics.get(monitor)
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


def _final_dir(callback: Any, trainer: Any) -> Path:
    setting = callback.save_adapter
    return default_adapter_dir(trainer) if setting is True or setting is None else Path(setting)


def _callbacks(callback: Any, trainer: Any) -> list[Any]:
    return [callback] + [cb for cb in trainer.callbacks if cb is not callback]


def save_final_from_trainer(callback: Any, trainer: Any, pl_module: nn.Module) -> None:
    """The callback's end-of-fit save (see ``MatryoshkaLoRA(save_adapter=...)``)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    path = save_from_trainer(trainer, pl_module, _final_dir(callback, trainer), _callbacks(callback, trainer))
    callback.adapter_path = str(path)
    rank_zero_info(f"MatryoshkaLoRA: saved the adapter (r_max={callback.config.r_max}) to {path} — export a rank with "
                   f"`matlora export {path} --rank K --out DIR`.")


SAVE_BEST_MODES = ("auto", "min", "max")


def check_save_adapter(setting: Any) -> bool | str:
    """``MatryoshkaLoRA(save_adapter=...)``: True, False, or a non-empty directory path."""
    if isinstance(setting, bool):
        return setting
    if isinstance(setting, (str, os.PathLike)) and str(setting).strip():
        return str(setting)
    raise ValueError(f"save_adapter must be True (<checkpoint dir>/matlora_adapter), False (do not save) or a "
                     f"directory path, got {setting!r}.")


def check_save_best_mode(mode: str) -> str:
    if mode not in SAVE_BEST_MODES:
        raise ValueError(f"save_best_mode must be 'auto' (minimise metrics whose name contains 'loss', maximise the "
                         f"others), 'min' or 'max', got {mode!r}.")
    return mode


def best_monitor(save_best: bool | str, mode: str) -> tuple[str, str]:
    """(metric name, "min" or "max") of ``MatryoshkaLoRA(save_best=..., save_best_mode=...)``."""
    if save_best is True:
        from .curve import aurac_key

        name = aurac_key("loss")
    else:
        name = str(save_best)
    if mode == "auto":
        mode = "min" if "loss" in name.lower() else "max"
    return name, mode


def save_best_from_trainer(callback: Any, trainer: Any, pl_module: nn.Module) -> None:
    """Save to ``<final dir>_best`` when the monitored metric improves (see ``MatryoshkaLoRA(save_best=...)``)."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

    monitor, mode = best_monitor(callback.save_best, callback.save_best_mode)
    value = metric_value(trainer, monitor)
    if value is None or not math.isfinite(value):
        rank_zero_warn(f"MatryoshkaLoRA(save_best={callback.save_best!r}): {monitor!r} was not logged (or is not finite) "
                       f"in this validation (logged: {sorted(trainer.callback_metrics)}); the best adapter is not "
                       f"updated.")
        return
    best = callback.best_score
    if best is not None and not (value < best if mode == "min" else value > best):
        return
    final = _final_dir(callback, trainer)
    path = save_from_trainer(trainer, pl_module, final.with_name(final.name + "_best"), _callbacks(callback, trainer),
                             monitor=monitor, monitor_value=value)
    callback.best_score, callback.best_adapter_path = value, str(path)
    rank_zero_info(f"MatryoshkaLoRA: {monitor}={value:.4g} is the best so far; saved the adapter to {path}.")
