"""save_adapter / load_adapter: the on-disk format, round trips, atomic writes and every bad input."""

from __future__ import annotations

import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file

import lightning_matlora.adapter_format as adapter_format
from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import (AdapterFormatError, MatryoshkaLinear, MatryoshkaLoRA, adapted_layers, at_rank,
                               load_adapter, read_adapter, save_adapter)
from lightning_matlora.curve import RankCurve

X = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def trained(model, seed: int = 3, **kw):
    """Adapt ``model`` and give it non-zero factors (B starts at 0), as after training."""
    kw.setdefault("verbose", False)
    MatryoshkaLoRA(**kw).apply(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapted_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
    return model


def logits(model, k):
    with torch.no_grad(), at_rank(model, k):
        return model(X).logits


class Wrapped(pl.LightningModule):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_round_trip_files_keys_and_logits(tmp_path):
    model = trained(tiny_llama(), r_max=8)
    path = save_adapter(model, tmp_path / "ad", curves=RankCurve.from_mapping({1: 0.2, 8: 0.6, 2: 0.4}),
                        metadata={"step": 7})
    assert sorted(os.listdir(path)) == ["adapter_model.safetensors", "matlora_config.json"]
    doc = json.loads((path / "matlora_config.json").read_text())
    assert doc["format_version"] == 2 and doc["config"]["r_max"] == 8 and doc["config"]["ranks"] == [1, 2, 4, 8]
    assert doc["base_model_class"] == "LlamaForCausalLM" and doc["task_type"] == "CAUSAL_LM"
    assert doc["rank_curves"] == [{"metric": "score", "higher_is_better": True, "ranks": [1, 2, 8],
                                   "scores": [0.2, 0.4, 0.6]}]
    assert doc["metadata"] == {"step": 7} and doc["library_version"] == "0.1.0"
    assert doc["peft_target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    tensors = load_file(str(path / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 14 and all(k.endswith((".lora_A", ".lora_B")) for k in tensors)  # no base weights
    assert tensors["model.layers.0.self_attn.q_proj.lora_A"].shape == (8, 32)
    assert tensors["model.layers.1.mlp.down_proj.lora_B"].shape == (32, 8)

    fresh = tiny_llama()
    rng = torch.get_rng_state()
    load_adapter(fresh, path)
    assert torch.equal(rng, torch.get_rng_state())  # loading does not move the user's RNG
    assert sorted(adapted_layers(fresh)) == sorted(adapted_layers(model))
    trainable = sorted(n for n, p in fresh.named_parameters() if p.requires_grad)
    assert trainable == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    for k in (1, 3, 8, None):
        torch.testing.assert_close(logits(fresh, k), logits(model, k), rtol=0, atol=0)
    assert fresh.model.layers[0].self_attn.q_proj.controller.config.to_dict() == \
        model.model.layers[0].self_attn.q_proj.controller.config.to_dict()


def test_lightning_prefix_is_stripped_and_loads_into_bare_and_wrapped(tmp_path):
    module = Wrapped(tiny_gpt2())
    trained(module, r_max=4, rank_scale="trained")
    save_adapter(module, tmp_path / "ad")
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "transformer.h.0.attn.c_attn.lora_A" in keys and not any(k.startswith("model.") for k in keys)
    bare = load_adapter(tiny_gpt2(), tmp_path / "ad")
    again = load_adapter(Wrapped(tiny_gpt2()), tmp_path / "ad")
    for k in (2, 3):
        with torch.no_grad(), at_rank(module, k):
            ref = module(X).logits
        torch.testing.assert_close(logits(bare, k), ref, rtol=0, atol=0)
        torch.testing.assert_close(logits(again.model, k), ref, rtol=0, atol=0)


def test_modules_to_save_round_trip(tmp_path):
    model = trained(tiny_llama(), r_max=4, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.lm_head.weight.add_(0.5)
    save_adapter(model, tmp_path / "ad")
    a = read_adapter(tmp_path / "ad")
    assert a.saved_keys == ["lm_head.weight"] and a.saved_modules == ["lm_head"]
    fresh = load_adapter(tiny_llama(), tmp_path / "ad")
    assert fresh.lm_head.weight.requires_grad and not fresh.model.embed_tokens.weight.requires_grad
    torch.testing.assert_close(fresh.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(logits(fresh, 3), logits(model, 3), rtol=0, atol=0)


def test_load_into_model_adapted_by_the_callback_overwrites_its_adapter(tmp_path):
    model = trained(tiny_llama(), r_max=8)
    save_adapter(model, tmp_path / "ad")
    other = trained(tiny_llama(), seed=9, r_max=8)
    load_adapter(other, tmp_path / "ad")
    torch.testing.assert_close(logits(other, 5), logits(model, 5), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- atomic writes
def _partial_then_fail(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
        f.write(b"\x00" * 100)  # half a file, then the disk is full
    raise OSError(28, "No space left on device")


def test_failed_save_keeps_previous_adapter(tmp_path, monkeypatch):
    model = trained(tiny_llama(), r_max=4)
    path = save_adapter(model, tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    trained(model.__class__(model.config), r_max=4)  # unrelated model, just to be sure nothing is shared
    with torch.no_grad():
        adapted_layers(model)["model.layers.0.self_attn.q_proj"].lora_B.add_(1.0)
    monkeypatch.setattr(adapter_format, "save_file", _partial_then_fail)
    with pytest.raises(OSError, match="No space"):
        save_adapter(model, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["ad"]  # no temporary directory left behind
    read_adapter(path)  # still a valid adapter


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    model = trained(tiny_llama(), r_max=4)
    monkeypatch.setattr(adapter_format, "save_file", _partial_then_fail)
    with pytest.raises(OSError):
        save_adapter(model, tmp_path / "ad")
    assert os.listdir(tmp_path) == []


def test_save_replaces_an_adapter_but_refuses_other_directories(tmp_path):
    model = trained(tiny_llama(), r_max=4)
    save_adapter(model, tmp_path / "ad")
    with torch.no_grad():
        adapted_layers(model)["model.layers.0.self_attn.q_proj"].lora_B.add_(1.0)
    save_adapter(model, tmp_path / "ad")  # replaced in place
    torch.testing.assert_close(logits(load_adapter(tiny_llama(), tmp_path / "ad"), 4), logits(model, 4))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a MatryoshkaLoRA adapter"):
        save_adapter(model, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_save_refuses_merged_model(tmp_path):
    from lightning_matlora import merge

    model = trained(tiny_llama(), r_max=4)
    merge(model, 2)
    with pytest.raises(RuntimeError, match="unmerge"):
        save_adapter(model, tmp_path / "ad")


# ------------------------------------------------------------------------------------------------ bad input
def _untouched(model) -> bool:
    return not any(isinstance(m, MatryoshkaLinear) for m in model.modules())


def test_wrong_base_shape_mismatch_names_layer_and_shapes(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=4), tmp_path / "ad")
    other = tiny_llama(intermediate_size=48)
    with pytest.raises(ValueError, match=r"Shape mismatch at layer 'model\.layers\.0\.mlp\.down_proj'.*48 → 32.*"
                                         r"\(4, 64\).*\(32, 4\).*64 → 32"):
        load_adapter(other, tmp_path / "ad")
    assert _untouched(other)


def test_wrong_architecture_missing_layer(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=4), tmp_path / "ad")
    gpt2 = tiny_gpt2()
    with pytest.raises(ValueError, match=r"no layer 'model\.layers\.0\..*different base model.*LlamaForCausalLM"):
        load_adapter(gpt2, tmp_path / "ad")
    assert _untouched(gpt2)
    fewer = tiny_llama(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"no layer 'model\.layers\.1\..*7 of the adapter's 14"):
        load_adapter(fewer, tmp_path / "ad")
    assert _untouched(fewer)


def test_different_r_max_and_rule(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=8), tmp_path / "ad")
    with pytest.raises(ValueError, match="r_max=8 but the model is adapted with r_max=4"):
        load_adapter(trained(tiny_llama(), r_max=4), tmp_path / "ad")
    with pytest.raises(ValueError, match="rank_scale: adapter 'rank', model 'trained'"):
        load_adapter(trained(tiny_llama(), r_max=8, rank_scale="trained"), tmp_path / "ad")


def test_truncated_weights_clear_error_and_model_untouched(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=4), tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    model = tiny_llama()
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_adapter(model, tmp_path / "ad")
    assert _untouched(model)
    # the checksum is required: deleting it does not switch the check off
    cfg = tmp_path / "ad" / "matlora_config.json"
    doc = json.loads(cfg.read_text())
    del doc["weights_sha256"]
    cfg.write_text(json.dumps(doc))
    with pytest.raises(AdapterFormatError, match="missing field 'weights_sha256'"):
        load_adapter(model, tmp_path / "ad")
    assert _untouched(model)


def test_flipped_byte_is_detected(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=4), tmp_path / "ad")
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        read_adapter(tmp_path / "ad")


def test_newer_format_version_asks_to_upgrade(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=4), tmp_path / "ad")
    cfg = tmp_path / "ad" / "matlora_config.json"
    doc = json.loads(cfg.read_text())
    doc["format_version"] = 3
    cfg.write_text(json.dumps(doc))
    with pytest.raises(AdapterFormatError, match="format version 3, newer.*upgrade lightning_matlora"):
        load_adapter(tiny_llama(), tmp_path / "ad")


def test_not_an_adapter_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="No adapter directory"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="PEFT adapter.*PeftModel.from_pretrained"):
        read_adapter(tmp_path / "peft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no matlora_config.json"):
        read_adapter(tmp_path / "empty")


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_adapter(trained(tiny_llama(), r_max=2), tmp_path / "ad", metadata={"extra": object()})


def test_diverged_curve_is_stored_as_null(tmp_path):
    save_adapter(trained(tiny_llama(), r_max=2), tmp_path / "ad",
                 curves=RankCurve.from_mapping({2: float("nan"), 1: 0.5}, metric="acc"))
    doc = json.loads((tmp_path / "ad" / "matlora_config.json").read_text())  # strict JSON: no NaN tokens
    assert doc["rank_curves"][0]["scores"] == [0.5, None]
    [curve] = read_adapter(tmp_path / "ad").curves
    assert curve.score_at(1) == 0.5 and math.isnan(curve.score_at(2))
