"""Output directories: what ``overwrite`` may replace, and the mark that says this library wrote a directory.

``overwrite=True`` (``--overwrite``) replaces only a directory this library wrote, so that no flag can delete a
user's files:

- an export or a merged model carries :data:`MARK` (``matlora_output.json``), which lists every file written; the
  directory is replaced only while it holds nothing else;
- a nested adapter is recognised by its own strict format (exactly ``matlora_config.json`` with
  ``"format": "matryoshka-lora"`` and ``adapter_model.safetensors``), so adapters saved before the mark existed
  are recognised too;
- a PEFT export written before the mark existed is recognised by its exact files (``adapter_config.json``,
  ``adapter_model.safetensors`` and the ``README.md`` card this library writes, or only ``rank_<k>/`` folders of
  them);
- an empty directory holds nothing to lose.

Anything else is refused in one line that says why, including a merged model written before the mark existed:
it cannot be told apart from a base model. Independently of ``overwrite``, the output may never be a protected
directory (the base model, the source adapter, the working or home directory) or a directory containing one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from .adapter_format import CONFIG_NAME, FORMAT, OWN_FILES
from .atomic import atomic_directory
from .version import __version__

MARK = "matlora_output.json"
_CARD_TITLE = "exported from a MatryoshkaLoRA nested adapter"
_PEFT_EXPORT_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError before Python 3.13, OSError after)
        raise FileNotFoundError(f"{path} is a symbolic link loop: give a real directory.") from None


def refuse_protected(out: Path, protected: Mapping[str, str | os.PathLike | None], flag: str = "--out") -> None:
    """Refuse an output directory that is, or contains, one of ``protected`` (description → path; None entries
    and paths that do not exist locally are skipped), the working directory or the home directory. Writing
    *inside* a protected directory that holds an adapter is refused too (it would add a foreign file to it)."""
    target = _resolved(out)
    named = {"the working directory": Path.cwd(), "the home directory": Path.home(), **protected}
    for what, p in named.items():
        if p is None or not Path(p).exists():
            continue
        q = _resolved(Path(p))
        if target == q or target in q.parents:
            raise ValueError(f"Refusing to write to {out}: it holds {what} ({p}). Choose a new output directory "
                             f"({flag}).")
        if q in target.parents and ((q / CONFIG_NAME).is_file() or (q / "adapter_config.json").is_file()):
            raise ValueError(f"Refusing to write to {out}: it is inside {what} ({p}), whose directory holds only the "
                             f"adapter's own files. Choose an output directory outside it ({flag}).")


def _files(path: Path) -> list[str]:
    """Every file under ``path`` (relative, '/'-separated, sorted); directories only as the files they hold."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir())


def is_adapter_dir(path: Path) -> bool:
    """A nested adapter directory: exactly our two files, the config declaring our format."""
    names = {p.name for p in path.iterdir()}
    if names != set(OWN_FILES) or not (path / CONFIG_NAME).is_file():
        return False
    try:
        return json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("format") == FORMAT
    except (ValueError, UnicodeDecodeError, AttributeError, OSError):
        return False


def _is_old_peft_export(path: Path) -> bool:
    names = {p.name for p in path.iterdir()}
    if names == _PEFT_EXPORT_FILES and (path / "README.md").is_file():
        try:
            first = (path / "README.md").read_text(encoding="utf-8").splitlines()[:1]
        except (UnicodeDecodeError, OSError):
            return False
        return bool(first) and first[0].startswith("# Rank-") and _CARD_TITLE in first[0]
    return bool(names) and all(n.startswith("rank_") and (path / n).is_dir() and _is_old_peft_export(path / n)
                               for n in names)


def why_not_replaceable(path: Path) -> str | None:
    """None when ``overwrite`` may replace the existing ``path``; otherwise the reason, as a phrase."""
    if not path.is_dir():
        return "it is a file, not a directory"
    files = _files(path)
    if not files:
        return None
    mark = path / MARK
    if mark.is_file():
        try:
            doc = json.loads(mark.read_text(encoding="utf-8"))
            listed = set(doc["files"]) | {MARK}
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return f"its {MARK} is unreadable"
        foreign = [f for f in files if f not in listed]
        if foreign:
            return (f"it holds files lightning_matlora did not write ({', '.join(foreign[:4])}"
                    f"{', …' if len(foreign) > 4 else ''})")
        return None
    if is_adapter_dir(path) or _is_old_peft_export(path):
        return None
    return (f"it holds files that lightning_matlora did not write ({', '.join(files[:4])}"
            f"{', …' if len(files) > 4 else ''}; no {MARK})")


def check_output_dir(out: Path, overwrite: bool, protected: Mapping[str, str | os.PathLike | None],
                     adapter_only: bool = False) -> None:
    """Refuse ``out`` before anything is built: a protected directory (see :func:`refuse_protected`), an
    existing directory without ``overwrite``, or with it one this library did not write (``adapter_only``: one
    that is not an adapter, for writers that replace only adapters)."""
    refuse_protected(out, protected)
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{out} already exists: choose another output directory or pass overwrite=True "
                              f"(--overwrite on the command line).")
    why = why_not_replaceable(out)
    if why is None and adapter_only and _files(out) and not is_adapter_dir(out):
        why = "it is not a nested adapter directory (this writer replaces only adapters)"
    if why is not None:
        raise FileExistsError(f"Refusing to overwrite {out}: {why}. --overwrite replaces only an adapter, export or "
                              f"merged model that lightning_matlora wrote; choose another output directory.")


def write_output_dir(out: str | os.PathLike, write: Callable[[Path], None], *, kind: str, overwrite: bool,
                     protected: Mapping[str, str | os.PathLike | None]) -> Path:
    """Check ``out`` (:func:`check_output_dir`), then build it atomically with ``write(tmp)`` and add :data:`MARK`
    listing every file written, so that a later ``overwrite`` recognises it. ``kind`` says what it holds
    (``"peft-export"``, ``"merged-model"``). Returns ``out`` as a ``Path``.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "export"
    >>> _ = write_output_dir(out, lambda tmp: (tmp / "a.txt").write_text("x"), kind="demo", overwrite=False,
    ...                      protected={})
    >>> sorted(p.name for p in out.iterdir()), why_not_replaceable(out) is None
    (['a.txt', 'matlora_output.json'], True)
    >>> _ = (out / "notes.txt").write_text("mine")
    >>> why_not_replaceable(out)
    'it holds files lightning_matlora did not write (notes.txt)'
    """
    out = Path(out)
    check_output_dir(out, overwrite, protected)

    def marked(tmp: Path) -> None:
        write(tmp)
        doc = {"written_by": "lightning_matlora", "library_version": __version__, "kind": kind, "files": _files(tmp)}
        (tmp / MARK).write_text(json.dumps(doc, indent=2) + "\n")

    atomic_directory(out, marked, replace=overwrite)
    return out
