"""Every public name has a docstring example, and every docstring example in the package runs (doctest).

``python -m pytest`` runs this file, so CI runs the examples; they are small, CPU-only and deterministic.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib
import io
import pkgutil

import pytest
import torch

import lightning_matlora as lm

MODULES = ["lightning_matlora"] + sorted(
    m.name for m in pkgutil.iter_modules(lm.__path__, "lightning_matlora.") if m.name != "lightning_matlora.__main__")
PUBLIC = [n for n in lm.__all__ if n != "__version__"]

with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints its accelerator choice to stdout on first import,
    try:                                          # which save_pretrained triggers inside an example
        import deepspeed  # noqa: F401
    except Exception:
        pass


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring_example(name):
    assert ">>>" in (getattr(lm, name).__doc__ or ""), f"lightning_matlora.{name} has no docstring example"


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    torch.manual_seed(0)
    mod = importlib.import_module(module)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module} failed (output above)"
