"""target_modules / exclude_modules / modules_to_save forms, as PEFT users expect them."""

from __future__ import annotations

import os

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import MatryoshkaLinear, MatryoshkaLoRA, adapted_layers
from lit_helpers import CausalLM, token_loader, trainer

LLAMA_PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"]


def _llama_names(layers=(0, 1), projs=LLAMA_PROJ):
    return sorted(f"model.layers.{i}.{p}" for i in layers for p in projs)


@pytest.mark.parametrize("exclude", [("lm_head",), None, []])
def test_all_linear_llama_excludes_the_head(exclude):
    model = tiny_llama()
    names = MatryoshkaLoRA(r_max=4, exclude_modules=exclude, verbose=False).apply(model)
    assert sorted(names) == _llama_names()
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, MatryoshkaLinear)


@pytest.mark.parametrize("exclude", [("lm_head",), None])
def test_all_linear_gpt2_excludes_the_tied_head(exclude):
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    names = MatryoshkaLoRA(r_max=4, exclude_modules=exclude, verbose=False).apply(model)
    expected = sorted(f"transformer.h.{i}.{p}" for i in (0, 1)
                      for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert sorted(names) == expected
    assert all(m.is_conv1d for m in adapted_layers(model).values())
    assert not isinstance(model.lm_head, MatryoshkaLinear)
    assert model.lm_head.weight is model.transformer.wte.weight and not model.lm_head.weight.requires_grad


def test_all_linear_in_a_lightning_module_excludes_the_inner_models_head():
    module = CausalLM(tiny_llama())
    names = MatryoshkaLoRA(r_max=4, exclude_modules=None, verbose=False).apply(module)
    assert sorted(names) == sorted("model." + n for n in _llama_names())


@pytest.mark.parametrize("targets, expected", [
    (["q_proj", "v_proj"], _llama_names(projs=["self_attn.q_proj", "self_attn.v_proj"])),
    (["self_attn.o_proj", "up_proj"], _llama_names(projs=["self_attn.o_proj", "mlp.up_proj"])),
    (("down_proj",), _llama_names(projs=["mlp.down_proj"])),
    (["model.layers.1.mlp.gate_proj"], ["model.layers.1.mlp.gate_proj"]),
    (r"model\.layers\.0\..*_proj", _llama_names(layers=(0,))),
    (r".*\.(q|k)_proj", _llama_names(projs=["self_attn.q_proj", "self_attn.k_proj"])),
    (["lm_head"], ["lm_head"]),  # named explicitly (and not excluded): adapted, as in PEFT
])
def test_suffix_lists_and_regex(targets, expected):
    names = MatryoshkaLoRA(r_max=4, target_modules=targets, exclude_modules=None, verbose=False).apply(tiny_llama())
    assert sorted(names) == sorted(expected)


def test_suffix_does_not_match_partial_names():
    # "proj" is not a suffix component of "q_proj": list entries match whole dotted components
    with pytest.raises(ValueError, match="matches no adaptable layer"):
        MatryoshkaLoRA(r_max=4, target_modules=["proj"]).apply(tiny_llama())


@pytest.mark.parametrize("exclude, expected", [
    (["down_proj", "lm_head"], _llama_names(projs=LLAMA_PROJ[:-1])),
    (r"(.*\.layers\.1\..*|lm_head)", _llama_names(layers=(0,))),
    (["model.layers.0.self_attn.q_proj"], [n for n in _llama_names() if n != "model.layers.0.self_attn.q_proj"]),
])
def test_exclude_modules(exclude, expected):
    names = MatryoshkaLoRA(r_max=4, exclude_modules=exclude, verbose=False).apply(tiny_llama())
    assert sorted(names) == sorted(expected)


def test_modules_to_save_stays_trainable_and_is_not_adapted():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0))
    cb = MatryoshkaLoRA(r_max=4, modules_to_save=["score"], verbose=False)
    names = cb.apply(model)
    assert "score" not in names and sorted(names) == _llama_names()
    assert type(model.score) is torch.nn.Linear and model.score.weight.requires_grad
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(["score.weight"] + [f"{n}.lora_{ab}" for n in names for ab in "AB"])


def test_modules_to_save_in_fit_is_optimised_and_checkpointed(tmp_path):
    module = CausalLM(tiny_llama(), optimizer="sgd", lr=0.1)
    head_before = module.model.lm_head.weight.detach().clone()
    embed_before = module.model.model.embed_tokens.weight.detach().clone()
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    t = trainer([cb, ModelCheckpoint(dirpath=tmp_path)], max_epochs=1, max_steps=-1, enable_checkpointing=True)
    t.fit(module, token_loader(n=8))
    opt_ids = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert id(module.model.lm_head.weight) in opt_ids and len(opt_ids) == 1 + 4
    assert not torch.equal(module.model.lm_head.weight, head_before)
    assert torch.equal(module.model.model.embed_tokens.weight, embed_before)
    (ckpt,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path) if f.endswith(".ckpt")]
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert sorted(state) == sorted(["model.lm_head.weight"] + [f"model.model.layers.{i}.self_attn.q_proj.lora_{ab}"
                                                               for i in (0, 1) for ab in "AB"])


def test_modules_to_save_on_a_tied_head_is_trainable_and_saved():
    # GPT-2's lm_head shares its weight with wte; named_parameters() lists it only as transformer.wte.weight
    from lightning_matlora import full_adapter_state_dict
    from lightning_matlora.adapted_model import model_state_of

    model = tiny_gpt2()
    cb = MatryoshkaLoRA(r_max=2, modules_to_save=["lm_head"], verbose=False)
    cb.apply(model)
    assert model.lm_head.weight.requires_grad
    owned = [n for n, _ in model_state_of(model).owned_tensors(model)]
    assert "lm_head.weight" in owned and "transformer.wte.weight" not in owned
    # one definition: freezing, checkpoint keys and the saved adapter all hold the tied head under its own name
    assert set(owned) <= set(model.state_dict())
    assert set(full_adapter_state_dict(model)) == set(owned)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert "transformer.h.0.attn.c_attn.base_layer.weight" in frozen


def test_models_that_read_layer_weights_directly_still_run():
    """transformers' T5 reads ``self.wo.weight.dtype`` in its MLP: an adapted layer must expose its base weight."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                                num_heads=2, decoder_start_token_id=0)).eval()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids, labels=ids).logits
    names = MatryoshkaLoRA(r_max=2, verbose=False).apply(model)
    assert any(n.endswith(".wo") for n in names)
    wo = model.get_submodule(next(n for n in names if n.endswith(".wo")))
    assert wo.weight is wo.base_layer.weight and wo.bias is None
    out = model(input_ids=ids, labels=ids)
    assert torch.equal(out.logits, before)
    out.loss.backward()
    assert wo.lora_B.grad is not None and torch.count_nonzero(wo.lora_B.grad) > 0


def test_multihead_attention_out_proj_is_not_adapted():
    """nn.MultiheadAttention reads out_proj.weight directly (never calls it), so an adapter there would be
    silently bypassed: "all-linear" skips it and naming it explicitly is an error."""
    torch.manual_seed(0)
    model = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
                                        1, enable_nested_tensor=False)
    names = MatryoshkaLoRA(r_max=2, verbose=False).apply(model)
    assert sorted(names) == ["layers.0.linear1", "layers.0.linear2"]
    model(torch.randn(2, 5, 16)).sum().backward()
    with pytest.raises(TypeError, match=r"'layers\.0\.self_attn\.out_proj'.*MultiheadAttention"):
        MatryoshkaLoRA(r_max=2, target_modules=["out_proj"], verbose=False).apply(
            torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), 1,
                                        enable_nested_tensor=False))
