"""Atomic directory writes: build beside the target, swap into place, recover an interrupted swap, clean up.

A directory ``D`` is written by building it in a hidden sibling ``.D.tmp-<pid>-<random>``, flushing it to disk,
then renaming it to ``D``. When ``D`` already exists the swap takes two renames::

    D → .D.old-<pid>-<random>        (1)
    .D.tmp-… → D                     (2)
    remove .D.old-…                  (3)

A process killed between (1) and (2) leaves no ``D``, but a complete previous directory in ``.D.old-…``:
:func:`interrupted_previous` finds it, so readers can still use the previous version. The next successful write
to ``D`` removes every stale ``.D.tmp-…``/``.D.old-…`` sibling whose writing process is gone (the process id in
the name tells which), so killed saves leave nothing behind for long.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

_TMP, _OLD = "tmp", "old"


def _sibling_prefix(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-"


def _pid_of(name: str, prefix: str) -> int | None:
    head = name[len(prefix):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int | None) -> bool:
    """Whether another process with id ``pid`` still runs (``None``, our own id or a dead process: no)."""
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: the process exists but belongs to someone else
        return True
    return True


def _siblings(path: Path, kind: str) -> list[Path]:
    prefix = _sibling_prefix(path, kind)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return [p for p in entries if p.name.startswith(prefix)]


def stale_siblings(path: str | os.PathLike) -> list[Path]:
    """The ``.D.tmp-…`` and ``.D.old-…`` siblings of ``path`` left by writes whose process is gone."""
    path = Path(path)
    out = []
    for kind in (_TMP, _OLD):
        prefix = _sibling_prefix(path, kind)
        out += [p for p in _siblings(path, kind) if not _alive(_pid_of(p.name, prefix))]
    return sorted(out)


def interrupted_previous(path: str | os.PathLike, complete: Callable[[Path], bool]) -> Path | None:
    """The previous version of ``path`` kept by a swap that was interrupted between its two renames.

    Returns the newest ``.D.old-…`` sibling for which ``complete(dir)`` is true, or ``None`` when ``path`` exists
    (nothing was interrupted) or no such sibling exists.
    """
    path = Path(path)
    if path.exists():
        return None
    candidates = [p for p in _siblings(path, _OLD) if p.is_dir()]
    candidates.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for p in candidates:
        if complete(p):
            return p
    return None


def atomic_directory(path: str | os.PathLike, write: Callable[[Path], None], replace: bool) -> None:
    """Build a directory with ``write(tmp)`` in a hidden temporary directory beside ``path``, then rename it to
    ``path``.

    With ``replace``, an existing ``path`` is swapped out only after the new one is complete (see the module
    docstring for what an interrupted swap leaves and how it is recovered); without it an existing ``path`` is
    refused with ``FileExistsError``. On any failure the temporary directory is removed and ``path`` is left as it
    was. After a successful write, stale temporaries of earlier, killed writes to ``path`` are removed.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists: choose another output directory or pass overwrite=True "
                              f"(--overwrite on the command line).")
    tmp = Path(tempfile.mkdtemp(prefix=f"{_sibling_prefix(path, _TMP)}{os.getpid()}-", dir=parent))
    try:
        write(tmp)
        fsync_path(tmp)
        if path.exists():
            old = parent / f"{_sibling_prefix(path, _OLD)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in stale_siblings(path):
        shutil.rmtree(stale, ignore_errors=True)


def fsync_path(p: Path) -> None:
    """Flush a file or directory to disk (best effort: some filesystems refuse opening directories)."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
