"""Bad input fails early (construction, apply or setup) with a message that names the fix."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_gpt2, tiny_llama
from dense_ref import adapt_single, make_base
from lightning_matlora import MatryoshkaLoRA, merge, set_rank
from lit_helpers import BuildsInConfigureModel, CausalLM, token_loader, trainer


@pytest.mark.parametrize("r_max", [0, -3, 2.5, True, "8"])
def test_r_max_must_be_a_positive_int(r_max):
    with pytest.raises(ValueError, match=r"r_max must be an integer ≥ 1"):
        MatryoshkaLoRA(r_max=r_max)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(r_max=8, ranks=[2, 9]), r"\[9\] outside 1…r_max=8.*raise r_max or drop those ranks"),
    (dict(r_max=8, ranks=[0, 4]), r"\[0\] outside 1…r_max=8"),
    (dict(r_max=8, eval_ranks=[1, 16]), r"eval_ranks \[16\] outside 1…r_max=8"),
    (dict(r_max=8, ranks=[]), r"ranks is empty: give at least one rank in 1…8"),
    (dict(r_max=8, ranks=[2, 4, 2]), r"duplicates \[2\]: list each rank once"),
    (dict(r_max=8, ranks=[1.5, 4]), r"must be integers"),
    (dict(scaling="log"), r"Unknown scaling 'log': use one of \('none', 'rank', 'sqrt'\)"),
    (dict(mode="matryoshka_lora"), r"Unknown mode 'matryoshka_lora': use one of \('matryoshka', 'lora'"),
    (dict(rank_scale="prefix"), r"Unknown rank_scale 'prefix': use 'rank'.*or 'trained'"),
    (dict(r_max=4, p=[1.0, 1.0, 1.0], mode="matryoshka"), r"p has length 3 but r_max is 4: give one diagonal entry per adapter"),
    (dict(r_max=4, p=[1.0, math.nan, 1.0, 1.0], mode="matryoshka"), r"p has NaN or infinite entries: every entry .* must be finite"),
    (dict(r_max=4, p=[1.0, math.inf, 1.0, 1.0], mode="matryoshka"), r"must be finite"),
    (dict(r_max=4, p=[1.0, -0.5, 1.0, 1.0], mode="matryoshka"), r"p has negative entries: the training diagonal must be non-negative"),
    (dict(r_max=4, p=[1.0] * 4, mode="dylora"), r"only applies to mode='matryoshka'.*drop p or switch mode"),
    (dict(r_max=4, p=[1.0] * 4), r"only applies to mode='matryoshka'.*drop p or switch mode"),
    (dict(r_max=4, mode="lora", ranks=[2, 4]), r"mode='lora' trains plain LoRA at r_max.*drop `ranks`"),
    (dict(alpha=0.0), r"alpha must be a finite number > 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(adapter_dtype="float8"), r"adapter_dtype 'float8' is not supported: use None .* or one of"),
    (dict(target_modules=""), r"target_modules is an empty string: give 'all-linear'"),
    (dict(target_modules=["q_proj", 3]), r"target_modules must be 'all-linear', a regex string or a list"),
    (dict(target_modules="model.*q_proj["), r"target_modules='model\.\*q_proj\[' is not a valid regular expression"
                                             r".*escape it, or give a list of module-name suffixes"),
    (dict(exclude_modules="(lm_head"), r"exclude_modules='\(lm_head' is not a valid regular expression"),
    (dict(r_max=10**9), r"r_max=1000000000 is larger than the limit 65536.*at most that width"),
])
def test_bad_settings_fail_at_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MatryoshkaLoRA(**kwargs)


def test_largest_r_max_builds_quickly():
    cb = MatryoshkaLoRA(r_max=65536)
    assert cb.p.shape == (65536,) and cb.config.ranks[-1] == 65536


def test_r_max_above_a_layer_width_warns_once_naming_the_layers():
    model = tiny_llama()  # hidden 32, intermediate 64, k/v projections 16 wide
    with pytest.warns(UserWarning, match=r"r_max=20 exceeds min\(in_features, out_features\) of 4 adapted layers "
                                         r"\(model\.layers\.0\.self_attn\.k_proj, .*the narrowest is 16 wide"):
        MatryoshkaLoRA(r_max=20, verbose=False).apply(model)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MatryoshkaLoRA(r_max=16, verbose=False).apply(tiny_llama())


def test_p_accepts_a_tensor_and_validates_it():
    cb = MatryoshkaLoRA(r_max=3, p=torch.tensor([3.0, 2.0, 0.0]), mode="matryoshka")
    assert cb.p.tolist() == [3.0, 2.0, 0.0]
    with pytest.raises(ValueError, match="finite"):
        MatryoshkaLoRA(r_max=3, p=torch.tensor([3.0, float("nan"), 0.0]), mode="matryoshka")


# ------------------------------------------------------------------------------------------------ target layers
def test_pattern_matching_nothing_lists_existing_layers_apply():
    with pytest.raises(ValueError) as err:
        MatryoshkaLoRA(r_max=4, target_modules=["query", "value"]).apply(tiny_llama())
    msg = str(err.value)
    assert "matches no adaptable layer" in msg
    assert "model.layers.0.self_attn.q_proj" in msg and "'q_proj'" in msg and "'down_proj'" in msg


def test_plain_string_is_a_full_name_regex_and_the_error_says_so():
    with pytest.raises(ValueError, match=r"target_modules='q_proj'.*matches no adaptable layer.*regex on full names"):
        MatryoshkaLoRA(r_max=4, target_modules="q_proj").apply(tiny_llama())


def test_pattern_matching_nothing_fails_at_trainer_setup():
    t = trainer([MatryoshkaLoRA(r_max=4, target_modules=["nope"])], max_steps=1)
    with pytest.raises(ValueError, match=r"matches no adaptable layer.*transformer\.h\.0\.attn\.c_attn"):
        t.fit(CausalLM(tiny_gpt2()), token_loader())


def test_pattern_matching_nothing_after_configure_model_fails():
    module = BuildsInConfigureModel(builder=lambda: tiny_llama())
    t = trainer([MatryoshkaLoRA(r_max=4, target_modules=["nope"])], max_steps=1)
    with pytest.raises(ValueError, match=r"matches no adaptable layer.*q_proj"):
        t.fit(module, token_loader())


@pytest.mark.parametrize("targets, name, kind", [
    (["embed_tokens"], "model.embed_tokens", "Embedding"),
    (["input_layernorm"], "model.layers.0.input_layernorm", "LlamaRMSNorm"),
    (r"model\.layers\.0\.mlp", "model.layers.0.mlp", "LlamaMLP"),
])
def test_unsupported_layer_type(targets, name, kind):
    with pytest.raises(TypeError) as err:
        MatryoshkaLoRA(r_max=4, target_modules=targets).apply(tiny_llama())
    msg = str(err.value)
    assert repr(name) in msg and kind in msg
    assert "only nn.Linear and transformers' Conv1D can be adapted" in msg and "narrow target_modules" in msg


def test_unsupported_layer_type_fails_at_trainer_setup():
    t = trainer([MatryoshkaLoRA(r_max=4, target_modules=["ln_f"])], max_steps=1)
    with pytest.raises(TypeError, match=r"'model\.transformer\.ln_f', a LayerNorm.*narrow target_modules"):
        t.fit(CausalLM(tiny_gpt2()), token_loader())


def test_model_already_adapted_by_another_callback():
    model = tiny_llama()
    MatryoshkaLoRA(r_max=4, verbose=False).apply(model)
    with pytest.raises(RuntimeError, match=r"already adapted .*by another MatryoshkaLoRA: adapt a fresh base model"):
        MatryoshkaLoRA(r_max=4).apply(model)
    t = trainer([MatryoshkaLoRA(r_max=8)], max_steps=1)
    with pytest.raises(RuntimeError, match="already adapted"):
        t.fit(CausalLM(model), token_loader())


def test_applying_the_same_callback_twice_is_harmless():
    model = tiny_llama()
    cb = MatryoshkaLoRA(r_max=4, verbose=False)
    names = cb.apply(model)
    assert cb.apply(model) == [] and sorted(cb.adapted) == sorted(names)


# --------------------------------------------------------------------------------------------------- rank control
@pytest.mark.parametrize("k", [0, 9, -1])
def test_set_rank_outside_range(k):
    model, _, _ = adapt_single(make_base("linear", 4, 4), r_max=8)
    with pytest.raises(ValueError, match=rf"rank {k} is outside 1…r_max=8: choose a rank the adapter has"):
        set_rank(model, k)


@pytest.mark.parametrize("rank, pattern", [
    (2.0, r"rank must be an int in 1…8, a 1-D integer tensor of per-row ranks, or None"),
    (torch.tensor([1, 9]), r"Per-row ranks must lie in 1…r_max=8, got values in 1…9"),
    (torch.tensor([0, 2]), r"Per-row ranks must lie in 1…r_max=8"),
    (torch.tensor([1.0, 2.0]), r"1-D and of an integer dtype"),
    (torch.tensor([[1, 2]]), r"1-D and of an integer dtype"),
    (torch.tensor([], dtype=torch.long), r"empty: give one rank per row"),
])
def test_set_rank_bad_settings(rank, pattern):
    model, _, _ = adapt_single(make_base("linear", 4, 4), r_max=8)
    with pytest.raises(ValueError, match=pattern):
        set_rank(model, rank)


def test_merge_bad_rank_and_unadapted_model():
    model, _, _ = adapt_single(make_base("linear", 4, 4), r_max=8)
    with pytest.raises(ValueError, match=r"merge needs an int rank in 1…r_max=8"):
        merge(model, 0)
    with pytest.raises(ValueError, match=r"no MatryoshkaLoRA layers: adapt it first"):
        set_rank(torch.nn.Linear(3, 3), 1)


def test_model_built_in_setup_gets_a_hint_to_use_configure_model():
    class BuildsInSetup(CausalLM):
        def setup(self, stage):
            if self.model is None:
                self.model = tiny_llama()

    with pytest.raises(ValueError, match="configure_model"):
        trainer([MatryoshkaLoRA(r_max=4)]).fit(BuildsInSetup(), token_loader())


def test_fit_on_a_merged_model_is_refused():
    module = CausalLM(tiny_llama())
    cb = MatryoshkaLoRA(r_max=4)
    cb.apply(module)
    merge(module, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        trainer([cb]).fit(module, token_loader())


def test_set_rank_accepts_int_like_scalars_and_equals_the_int():
    import numpy as np

    model = tiny_llama()
    MatryoshkaLoRA(r_max=8).apply(model)
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B)
    ids = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        set_rank(model, 3)
        ref = model(ids).logits
        for k in (np.int64(3), torch.tensor(3)):
            set_rank(model, k)
            assert torch.equal(model(ids).logits, ref)
    with pytest.raises(ValueError, match="1…r_max"):
        set_rank(model, np.int64(9))

