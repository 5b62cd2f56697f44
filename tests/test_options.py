"""Every option lives in one place (the fields of MatLoRAConfig and CallbackSettings); what is derived from it
cannot drift: the callback's signature and docs, the adapter format's schema, the fields that define an adapter,
the legacy values of later fields."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lightning_matlora as lm
from lightning_matlora import adapter_format
from lightning_matlora.config import (ROLES, STORED_TYPES, CallbackSettings, MatLoRAConfig, fields_with_role,
                                      legacy_values, rule_fields)

ROOT = Path(__file__).resolve().parents[1]
CONFIG_FIELDS = [f.name for f in dataclasses.fields(MatLoRAConfig)]
SETTINGS_FIELDS = [f.name for f in dataclasses.fields(CallbackSettings)]


def test_the_callback_signature_is_the_fields_with_their_defaults():
    params = inspect.signature(lm.MatryoshkaLoRA).parameters
    assert list(params) == CONFIG_FIELDS + SETTINGS_FIELDS
    for cls in (MatLoRAConfig, CallbackSettings):
        for f in dataclasses.fields(cls):
            assert params[f.name].default == f.default, f.name
            assert params[f.name].annotation is not inspect.Parameter.empty, f.name
    # the adapter fields adapter files had from the start stay positional; later ones and the settings keyword-only
    kinds = {n: p.kind for n, p in params.items()}
    assert [n for n, k in kinds.items() if k is inspect.Parameter.POSITIONAL_OR_KEYWORD] == \
        [n for n in CONFIG_FIELDS if n not in legacy_values()]
    cb = lm.MatryoshkaLoRA(8, [1, 8], verbose=False, save_adapter=False)
    assert (cb.config.r_max, cb.config.ranks, cb.verbose, cb.save_adapter) == (8, [1, 8], False, False)
    with pytest.raises(TypeError, match="unexpected keyword argument 'rmax'"):
        lm.MatryoshkaLoRA(rmax=8)


def test_every_field_is_documented_once_and_the_docs_are_derived():
    for cls in (MatLoRAConfig, CallbackSettings):
        for f in dataclasses.fields(cls):
            assert len(f.metadata["doc"]) > 20, f.name
            assert f"    {f.name}: {f.metadata['doc'][:40]}" in " ".join(lm.MatryoshkaLoRA.__doc__.split("\n")) \
                or f"{f.name}: " in lm.MatryoshkaLoRA.__doc__, f.name
    for name in CONFIG_FIELDS:
        assert f"\n        {name}: " in MatLoRAConfig.__doc__, name


def test_the_adapter_format_schema_and_legacy_values_come_from_the_fields():
    assert list(adapter_format.CONFIG_FIELDS) == CONFIG_FIELDS
    for f in dataclasses.fields(MatLoRAConfig):
        assert f.metadata["stored"] in STORED_TYPES, f.name
        assert f.metadata["role"] in (None, *ROLES), f.name
    assert adapter_format.LEGACY_CONFIG_VALUES == legacy_values()
    assert set(adapter_format.OPTIONAL_CONFIG_FIELDS) == set(legacy_values())
    # the values the format reads a file without the field with are the ones a resumed checkpoint assumes
    assert legacy_values() == {"rank_weights": "uniform", "max_pass": False, "distill": 0.0, "distill_module": None,
                               "init": "shared", "layer_draws": "none"}
    # each stored type accepts the value a default config stores
    doc = MatLoRAConfig(r_max=8).to_dict()
    for name, t in adapter_format.CONFIG_FIELDS.items():
        assert t.ok(doc[name]), name


@pytest.mark.parametrize("field", fields_with_role("adapter"))
def test_a_checkpoint_whose_adapter_differs_in_an_adapter_field_cannot_resume(field):
    cb = lm.MatryoshkaLoRA(r_max=8, verbose=False)
    saved = cb.config.to_dict()
    saved[field] = {"r_max": 4, "target_modules": ["q"], "exclude_modules": None, "modules_to_save": ["head"]}[field]
    with pytest.raises(ValueError, match=field):
        cb._check_config(saved)


@pytest.mark.parametrize("field", fields_with_role("objective"))
def test_resuming_with_another_objective_field_warns_naming_it(field):
    cb = lm.MatryoshkaLoRA(r_max=8, mode="matryoshka", verbose=False)
    saved = dict(cb.config.to_dict())
    other = {"ranks": [1, 8], "scaling": "rank", "alpha": 2.0, "mode": "lora", "p": [1.0] * 8,
             "rank_weights": [1, 2, 3, 4], "max_pass": True, "distill": 1.0, "distill_module": "head",
             "layer_draws": "type"}
    saved[field] = other[field]
    with pytest.warns(UserWarning, match=f"different training objective .*{field}"):
        cb._check_config(saved)


def test_a_checkpoint_without_a_later_field_is_read_with_its_legacy_value():
    cb = lm.MatryoshkaLoRA(r_max=8, mode="rowwise", max_pass=False, rank_weights="uniform", verbose=False)
    old = {k: v for k, v in cb.config.to_dict().items() if k not in legacy_values()}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb._check_config(old)  # trained with uniform rows, one pass: the same objective
    half = lm.MatryoshkaLoRA(r_max=8, mode="rowwise", max_pass=False, rank_weights="half_max", verbose=False)
    with pytest.warns(UserWarning, match="rank_weights"):
        half._check_config(old)


# ---------------------------------------------------------------------------------------- max_pass default
def test_max_pass_defaults_to_one_pass_in_every_mode():
    assert lm.MatryoshkaLoRA(r_max=8, verbose=False).config.max_pass is False
    assert lm.MatryoshkaLoRA(r_max=8, max_pass=None, verbose=False).config.max_pass is False
    assert lm.MatryoshkaLoRA(r_max=8, rank_weights="half_max", verbose=False).config.max_pass is False
    for mode in ("lora", "matryoshka", "dylora"):
        assert lm.MatryoshkaLoRA(r_max=8, mode=mode, verbose=False).config.max_pass is False


@pytest.mark.parametrize("mode", ["lora", "matryoshka", "dylora"])
def test_an_explicit_max_pass_with_another_mode_is_refused_in_one_line_naming_the_fix(mode):
    with pytest.raises(ValueError) as err:
        lm.MatryoshkaLoRA(r_max=8, mode=mode, max_pass=True)
    text = str(err.value)
    assert "\n" not in text and f"not mode='{mode}'" in text and "max_pass=None" in text


@pytest.mark.slow
def test_the_default_recipe_config_trains_plain_lora_by_switching_the_mode(tmp_path):
    """recipes/configs/default.yaml leaves max_pass to auto, so switching the mode needs no other change."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "instruct.py"), "fit",
                          "--trainer.callbacks.init_args.mode", "lora", "--trainer.callbacks.init_args.ranks", "null",
                          "--trainer.fast_dev_run", "1", "--model.num_generate", "0",
                          "--trainer.default_root_dir", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


# --------------------------------------------------------------------------------- the fields of the rank rule
#: A valid other value for each field of MatLoRAConfig (a new field needs one here: then mark it ``rule=True``
#: in config.py if and only if the test below finds that it changes the function served at a rank).
OTHER_VALUE = {"r_max": 16, "ranks": [1, 8], "target_modules": ["q_proj"], "exclude_modules": None,
               "modules_to_save": ["lm_head"], "scaling": "rank", "alpha": 2.0, "dropout": 0.1, "mode": "dylora",
               "rank_scale": "trained", "p": [1.0] * 8, "eval_ranks": [8], "adapter_dtype": "float64", "seed": 5,
               "rank_weights": "uniform", "max_pass": False, "distill": 1.0, "distill_module": "lm_head",
               "init": "shared", "layer_draws": "type"}
BASES = [dict(r_max=8, ranks=[1, 2, 4, 8], mode="matryoshka", rank_scale=rule) for rule in ("rank", "trained")] + \
        [dict(r_max=8, ranks=[1, 2, 4, 8], mode="rowwise", rank_scale=rule, max_pass=paired)
         for rule in ("rank", "trained") for paired in (False, True)]  # distill needs the paired passes


def _served(cfg: MatLoRAConfig) -> tuple:
    """What the adapter serves at each rank besides its factors: r_max and the coefficients of every rank k."""
    from lightning_matlora.rank import RankController

    ctrl = RankController(cfg)
    return cfg.r_max, tuple(tuple(ctrl.rank_coefficients(k).tolist()) for k in range(1, cfg.r_max + 1))


def test_the_rule_fields_are_exactly_the_fields_that_change_what_a_rank_serves():
    import warnings

    assert set(OTHER_VALUE) == set(CONFIG_FIELDS), "give each new MatLoRAConfig field a valid other value here"
    changes_serving, tried = set(), set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rule its mode never trained warns; it is still a valid config
        for base in BASES:
            ref = _served(MatLoRAConfig(**base))
            for name, value in OTHER_VALUE.items():
                try:
                    other = MatLoRAConfig(**{**base, name: value})
                except ValueError:  # not valid with this base (e.g. p outside "matryoshka")
                    continue
                tried.add(name)
                if _served(other) != ref:
                    changes_serving.add(name)
    assert tried == set(CONFIG_FIELDS)
    assert set(rule_fields()) == changes_serving
    assert list(rule_fields()) == [n for n in CONFIG_FIELDS if n in changes_serving]  # declaration order


@pytest.mark.parametrize("field", [f for f in rule_fields() if f != "r_max"])
def test_loading_into_a_model_adapted_with_another_rule_field_is_refused_naming_it(field, tmp_path):
    import warnings

    from conftest import tiny_llama

    base = dict(r_max=8, mode="matryoshka", verbose=False, save_adapter=False)
    model = tiny_llama(num_hidden_layers=1)
    lm.MatryoshkaLoRA(**base).apply(model)
    path = lm.save_adapter(model, tmp_path / "ad")
    other = tiny_llama(num_hidden_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lm.MatryoshkaLoRA(**base, **{field: OTHER_VALUE[field]}).apply(other)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=f"rank rule differs .*{field}: adapter"):
        lm.load_adapter(other, path)
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # untouched


# ----------------------------------------------------------------------------------- the pages that list them
def _table_rows(page: str, after: str) -> list[tuple[list[str], str]]:
    """(the backticked names of the first cell, the rest of the row) of the first table after ``after`` in a page."""
    import re

    text = (ROOT / page).read_text()
    rows = []
    for line in text[text.index(after):].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("| `"):
            first, rest = line[1:].split("|", 1)
            rows.append((re.findall(r"`(\w+)`", first), rest))
    return rows


def test_the_api_page_documents_every_option_once():
    names = [n for cells, _ in _table_rows("docs/api.md", "| argument | meaning |") for n in cells]
    assert sorted(names) == sorted(CONFIG_FIELDS + SETTINGS_FIELDS)


def test_the_adapter_file_page_lists_every_config_field_and_the_legacy_values():
    rows = _table_rows("docs/adapters.md", "`config` (every `MatLoRAConfig` field")
    assert sorted(n for cells, _ in rows for n in cells) == sorted(CONFIG_FIELDS)
    legacy = legacy_values()
    for cells, rest in rows:
        for name in cells:
            assert ("optional" in rest) == (name in legacy), name
            if name in legacy:
                value = legacy[name]
                shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else \
                    f'"{value}"' if isinstance(value, str) else f"{value:g}"
                assert f"reads as {shown}" in rest, (name, rest)
