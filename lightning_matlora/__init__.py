"""lightning_matlora: nested (MatryoshkaLoRA) adapters for PyTorch Lightning.

One fine-tuning run trains a nested adapter; any prefix rank k ≤ r_max of it is a usable LoRA adapter.

>>> import torch
>>> from torch import nn
>>> import lightning_matlora as lm
>>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
>>> lm.MatryoshkaLoRA(r_max=8, verbose=False).apply(model)
['0', '2']
>>> with lm.at_rank(model, 2):
...     y = model(torch.ones(1, 16))
>>> tuple(y.shape)
(1, 4)

The names below are the public API; internals (the rank controller, the per-rank validation loop) stay
importable from their modules (``lightning_matlora.rank``, ``lightning_matlora.adapted_model``, ...).

Lightning is imported only by the names that need a Trainer (``MatryoshkaLoRA``, ``prepare_for_sharding``,
``AdapterCheckpoint``), when they are first used: a serving box without Lightning can import the package, load an
adapter into a transformers model, run it at a rank, merge it and export it (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from .adapter_format import AdapterFormatError, SavedAdapter, read_adapter
from .adapter_load import load_adapter
from .adapter_save import save_adapter
from .config import MatLoRAConfig
from .adapted_model import at_rank, begin_step, get_rank, merge, paired_loss, set_rank, set_rank_scale, unmerge
from .curve import RankCurve, aurac, describe_rank_choice, plot_rank_curves, select_rank
from .adapter_state import full_adapter_state_dict
from .export import export_peft, merge_to_base
from .inject import adapted_layers
from .layer import MatryoshkaLinear
from .metric import RankCurveMetric
from .nest_peft import NestResult, nest_adapter
from .nesting import NestReport, nest_by_svd
from .rank_allocation import allocate_ranks
from .scaling import build_p, default_ranks, scale_of_rank

from .version import __version__

__all__ = [
    # train
    "MatryoshkaLoRA", "MatLoRAConfig", "MatryoshkaLinear", "adapted_layers", "prepare_for_sharding",
    # run at a rank
    "set_rank", "get_rank", "at_rank", "set_rank_scale", "merge", "unmerge", "begin_step",
    "paired_loss", "allocate_ranks",
    # the method's quantities
    "build_p", "default_ranks", "scale_of_rank",
    # rank curves
    "RankCurve", "RankCurveMetric", "aurac", "select_rank", "describe_rank_choice", "plot_rank_curves",
    # adapters on disk
    "AdapterCheckpoint", "AdapterFormatError", "SavedAdapter", "save_adapter", "load_adapter", "read_adapter",
    "export_peft", "merge_to_base", "full_adapter_state_dict",
    # nesting a trained adapter
    "NestReport", "NestResult", "nest_adapter", "nest_by_svd",
    "__version__",
]

# The Lightning integration, imported on first use (the package imports without Lightning).
_LIGHTNING = {
    "MatryoshkaLoRA": "lightning_matlora.callback",
    "prepare_for_sharding": "lightning_matlora.callback",
    "AdapterCheckpoint": "lightning_matlora.adapter_checkpoint",
}

# Names that left the top level (still importable from their modules); the old spelling warns once per use.
_MOVED = {
    "RankController": ("lightning_matlora.rank", "RankController"),
    "RankPlan": ("lightning_matlora.rank", "RankPlan"),
    "controller_of": ("lightning_matlora.adapted_model", "controller_of"),
    "RankCurveValidation": ("lightning_matlora.rank_validation", "RankCurveValidation"),
    "format_curve_table": ("lightning_matlora.curve", "format_curve_table"),
    "rank_scale": ("lightning_matlora.scaling", "scale_of_rank"),
}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING:
        value = getattr(importlib.import_module(_LIGHTNING[name]), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if name in _MOVED:
        module, attr = _MOVED[name]
        warnings.warn(f"lightning_matlora.{name} is no longer public API: import {attr} from {module}.",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lightning_matlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING))
