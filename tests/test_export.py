"""export_peft checked against the real `peft` package, and merge_to_base against a plain transformers reload."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import adapted_layers, at_rank, export_peft, merge_to_base, save_adapter
from lightning_matlora.curve import RankCurve
from test_adapter_io import X, Wrapped, logits, trained

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def peft_logits(arch: str, out_dir) -> torch.Tensor:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(BUILD[arch](), str(out_dir)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize("arch,rank_scale,scaling,alpha,fold", [
    ("llama", "rank", "sqrt", 1.0, False),   # lora_alpha=1, use_rslora
    ("llama", "rank", "rank", 2.0, False),   # lora_alpha=α
    ("llama", "rank", "none", 0.5, False),   # lora_alpha=α·k
    ("llama", "rank", "sqrt", 1.0, True),    # scale folded into lora_B
    ("llama", "trained", "sqrt", 1.0, False),  # diag(p_1…p_k) folded into lora_B
    ("gpt2", "rank", "sqrt", 1.0, False),    # Conv1D: fan_in_fan_out
    ("gpt2", "trained", "rank", 1.0, False),
])
def test_peft_logits_equal_ours_at_rank_k(tmp_path, arch, rank_scale, scaling, alpha, fold):
    model = trained(BUILD[arch](), r_max=8, rank_scale=rank_scale, scaling=scaling, alpha=alpha)
    save_adapter(model, tmp_path / "ad")
    with torch.no_grad():
        base = BUILD[arch]()(X).logits
    for k in (1, 3, 8):  # 3 is not a train rank
        out = export_peft(tmp_path / "ad", tmp_path / f"peft{k}", rank=k, fold_scale=fold)
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == k and cfg["task_type"] == "CAUSAL_LM"
        assert cfg["fan_in_fan_out"] is (arch == "gpt2")
        if rank_scale == "rank" and not fold:
            assert cfg["use_rslora"] is (scaling == "sqrt")
            assert cfg["lora_alpha"] == pytest.approx(alpha * k if scaling == "none" else alpha)
        else:
            assert cfg["lora_alpha"] == k and cfg["use_rslora"] is False
        tensors = load_file(str(out / "adapter_model.safetensors"))
        assert all(key.startswith("base_model.model.") and key.endswith((".lora_A.weight", ".lora_B.weight"))
                   for key in tensors)
        ours = logits(model, k)
        assert (ours - base).abs().max() > 1e-2  # the adapter matters, so equality below is a real check
        torch.testing.assert_close(peft_logits(arch, out), ours, rtol=1e-5, atol=1e-5)


def test_peft_config_fields_and_model_source(tmp_path):
    model = trained(tiny_gpt2(), r_max=4)
    export_peft(model, tmp_path / "from_model", rank=2)
    save_adapter(model, tmp_path / "ad")
    export_peft(tmp_path / "ad", tmp_path / "from_dir", rank=2)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "from_model" / name).read_bytes() == (tmp_path / "from_dir" / name).read_bytes()
    cfg = json.loads((tmp_path / "from_dir" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"] and cfg["bias"] == "none"
    tensors = load_file(str(tmp_path / "from_dir" / "adapter_model.safetensors"))
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 32)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (96, 2)
    torch.testing.assert_close(tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"],
                               adapted_layers(model)["transformer.h.1.mlp.c_fc"].lora_A[:2].detach())


def test_partial_targets_and_modules_to_save_in_peft(tmp_path):
    # only layer 0's q_proj: suffixes would select layer 1 too, so full names are written
    model = trained(Wrapped(tiny_llama()), r_max=4, target_modules=r".*layers\.0\.self_attn\.q_proj",
                    modules_to_save=["lm_head"])
    with torch.no_grad():
        model.model.lm_head.weight.mul_(1.5)
    out = export_peft(model, tmp_path / "p", rank=3)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.0.self_attn.q_proj"] and cfg["modules_to_save"] == ["lm_head"]
    with torch.no_grad(), at_rank(model, 3):
        ours = model(X).logits
    torch.testing.assert_close(peft_logits("llama", out), ours, rtol=1e-5, atol=1e-5)


def test_export_all_writes_one_adapter_per_train_rank_with_cards(tmp_path):
    model = trained(tiny_llama(), r_max=4)
    save_adapter(model, tmp_path / "ad", curves=RankCurve((1, 2, 4), (0.5, 0.625, 0.75), metric="accuracy"))
    out = export_peft(tmp_path / "ad", tmp_path / "all", rank="all")
    assert sorted(p.name for p in out.iterdir()) == ["matlora_output.json", "rank_1", "rank_2", "rank_4"]
    card = (out / "rank_2" / "README.md").read_text()
    # AURAC on the log2 axis: ((0.5 + 0.625) / 2 + (0.625 + 0.75) / 2) / 2 = 0.625
    assert "measured accuracy at rank 2: 0.625" in card and "AURAC of the full nested adapter: 0.625" in card
    assert json.loads((out / "rank_4" / "adapter_config.json").read_text())["r"] == 4
    torch.testing.assert_close(peft_logits("llama", out / "rank_2"), logits(model, 2), rtol=1e-5, atol=1e-5)


def test_export_bad_rank_and_existing_output(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=4), tmp_path / "ad")
    for bad in (0, 5, -1, 2.5, "x"):
        with pytest.raises(ValueError, match=r"rank must be an integer in 1…r_max=4"):
            export_peft(tmp_path / "ad", tmp_path / "out", rank=bad)
    assert not (tmp_path / "out").exists()
    export_peft(tmp_path / "ad", tmp_path / "out", rank=2)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_peft(tmp_path / "ad", tmp_path / "out", rank=3)
    export_peft(tmp_path / "ad", tmp_path / "out", rank=3, overwrite=True)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 3
    with pytest.raises(ValueError, match="Refusing to write"):
        export_peft(tmp_path / "ad", tmp_path, rank=2, overwrite=True)
    assert (tmp_path / "ad" / "matlora_config.json").exists()


# -------------------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("arch,rank_scale", [("llama", "rank"), ("gpt2", "trained")])
def test_merge_from_directory_reloads_without_this_package(tmp_path, arch, rank_scale):
    BUILD[arch]().save_pretrained(tmp_path / "base")
    model = trained(BUILD[arch](), r_max=8, rank_scale=rank_scale)
    save_adapter(model, tmp_path / "ad")
    merge_to_base(tmp_path / "ad", tmp_path / "merged", rank=3, base=str(tmp_path / "base"))
    files = load_file(str(next((tmp_path / "merged").glob("*.safetensors"))))
    assert not any("lora" in key or "base_layer" in key for key in files)
    assert "matlora" not in (tmp_path / "merged" / "config.json").read_text()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, logits(model, 3), rtol=1e-5, atol=1e-5)


def test_merge_into_base_object_does_not_mutate_it(tmp_path):
    model = trained(tiny_llama(), r_max=4, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.25)
    save_adapter(model, tmp_path / "ad")
    base = tiny_llama()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merge_to_base(tmp_path / "ad", tmp_path / "merged", rank=4, base=base)
    after = base.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, logits(model, 4), rtol=1e-5, atol=1e-5)


def test_merge_from_adapted_model_leaves_it_adapted(tmp_path):
    module = trained(Wrapped(tiny_gpt2()), r_max=4)
    with torch.no_grad(), at_rank(module, 2):
        ours = module(X).logits
    state = {k: v.clone() for k, v in module.state_dict().items()}
    merge_to_base(module, tmp_path / "merged", rank=2)
    assert len(adapted_layers(module)) == 8
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(X).logits, ours, rtol=1e-5, atol=1e-5)


def test_merge_bad_input(tmp_path):
    model = trained(tiny_llama(), r_max=4)
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="rank must be an integer in 1…r_max=4"):
        merge_to_base(tmp_path / "ad", tmp_path / "m", rank=0, base=tiny_llama())
    with pytest.raises(ValueError, match="does not record its base model: pass base="):
        merge_to_base(tmp_path / "ad", tmp_path / "m", rank=2)
    with pytest.raises(ValueError, match="Shape mismatch"):
        merge_to_base(tmp_path / "ad", tmp_path / "m", rank=2, base=tiny_llama(hidden_size=48))
    with pytest.raises(ValueError, match="pass base=None"):
        merge_to_base(model, tmp_path / "m", rank=2, base=tiny_llama())
    (tmp_path / "m").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        merge_to_base(model, tmp_path / "m", rank=2)
