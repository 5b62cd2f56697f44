"""Rank plans on disk: a rank per layer in a JSON file (what ``matlora allocate`` writes and ``matlora export
--rank-pattern`` reads), and the parameter count of a plan.

The file is ``{"format": "matlora-rank-plan", "version": 1, "r_max": R, "parameters": N, "ranks": {name: k}}``,
with optional ``"budget"`` and ``"metric"`` entries; a plain ``{name or pattern: k}`` object is read too (keys as
:func:`lightning_matlora.set_rank` takes them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .adapter_format import SavedAdapter
from .layer_ranks import layer_parameters

PLAN_FORMAT = "matlora-rank-plan"


def adapter_dims(adapter: SavedAdapter) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every layer of a saved adapter, by name."""
    return {n: (i.in_features, i.out_features) for n, i in adapter.layers.items()}


def plan_document(ranks: Mapping[str, int], r_max: int, parameters: int, **extra: Any) -> dict[str, Any]:
    """The JSON document of a plan (``extra``: e.g. ``budget``, ``metric``)."""
    return {"format": PLAN_FORMAT, "version": 1, "r_max": int(r_max), "parameters": int(parameters), **extra,
            "ranks": {n: int(k) for n, k in ranks.items()}}


def write_plan(path: str | os.PathLike, document: Mapping[str, Any]) -> Path:
    """Write a plan document atomically (a complete file or none)."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def read_plan(path: str | os.PathLike) -> dict[str, int]:
    """The ``{name or pattern: k}`` mapping of a plan file; ``ValueError`` naming the file and the fix otherwise."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: no such rank plan file (write one with `matlora allocate ... --out {p}`).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{p}: not a JSON rank plan ({e}).") from None
    if isinstance(doc, dict) and doc.get("format") == PLAN_FORMAT:
        doc = doc.get("ranks")
    if not isinstance(doc, dict) or not doc or not all(isinstance(k, str) for k in doc) \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in doc.values()):
        raise ValueError(f"{p}: a rank plan is a JSON object of layer names or patterns to integer ranks (or the "
                         f"file `matlora allocate` writes), e.g. {{\"q_proj\": 8, \"*\": 2}}.")
    return dict(doc)


def plan_parameters(adapter: SavedAdapter, ranks: Mapping[str, int] | int) -> int:
    """The adapter parameter count (Σ k·(in + out)) of ``adapter`` cut to ``ranks`` (resolved per layer, or one
    rank for all)."""
    return layer_parameters(adapter_dims(adapter), ranks)
