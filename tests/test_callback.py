"""The MatryoshkaLoRA callback in real `Trainer.fit` runs: freezing, optimizer contents, configure_model, summary,
small checkpoints and exact resume."""

from __future__ import annotations

import logging
import os
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import tiny_gpt2, tiny_llama
from lightning_matlora import MatryoshkaLoRA, adapted_layers
from lit_helpers import BuildsInConfigureModel, CausalLM, ListHandler, token_loader, trainer


def _is_adapter(name: str) -> bool:
    return name.endswith(".lora_A") or name.endswith(".lora_B")


@pytest.fixture
def lightning_log():
    """Collect what lightning_matlora reports through Lightning's rank-zero logger."""
    handler = ListHandler()
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                  (torch.bfloat16, "float32")])
def test_fit_trains_only_the_adapter(family, dtype, adapter_dtype):
    model = (tiny_llama if family == "llama" else tiny_gpt2)(seed=0, dtype=dtype)
    module = CausalLM(model)
    before = {id(p): (n, p.detach().clone()) for n, p in module.named_parameters()}
    cb = MatryoshkaLoRA(r_max=8, adapter_dtype=adapter_dtype)
    t = trainer([cb], max_steps=3)
    t.fit(module, token_loader())
    assert t.global_step == 3

    layers = adapted_layers(module)
    assert len(layers) == len(cb.adapted) > 0
    for name, layer in layers.items():
        assert layer.lora_A.dtype == (torch.float32 if adapter_dtype else dtype)
        assert layer.base_layer.weight.dtype == dtype
    params = dict(module.named_parameters())
    adapter = {n: p for n, p in params.items() if _is_adapter(n)}
    assert len(adapter) == 2 * len(layers)
    # base weights bitwise unchanged (the same tensor objects, now under .base_layer)
    for n, p in params.items():
        if n in adapter:
            continue
        assert not p.requires_grad, n
        old_name, old = before[id(p)]
        assert torch.equal(p, old), f"{old_name} changed during fit"
    # adapter weights changed
    for n, p in adapter.items():
        assert p.requires_grad
        assert not torch.equal(p, before[id(p)][1]) if id(p) in before else torch.count_nonzero(p) > 0
        if n.endswith("lora_B"):
            assert torch.count_nonzero(p) > 0, n
    # the optimizer holds exactly the adapter parameters, although configure_optimizers passed self.parameters()
    opt_params = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == len({id(p) for p in opt_params})
    assert {id(p) for p in opt_params} == {id(p) for p in adapter.values()}


def test_module_building_its_model_in_configure_model_is_adapted_before_optimizers():
    module = BuildsInConfigureModel(builder=lambda: tiny_llama(seed=1))
    assert module.model is None
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj"])
    t = trainer([cb], max_steps=2)
    t.fit(module, token_loader())
    seen = module.seen_at_configure_optimizers
    assert seen["adapted"] == 4  # 2 layers × (q, v), already adapted when configure_optimizers ran
    assert seen["trainable"] and all(_is_adapter(n) for n in seen["trainable"])
    assert len(seen["trainable"]) == 8
    opt_ids = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert opt_ids == {id(p) for n, p in module.named_parameters() if _is_adapter(n)}
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in adapted_layers(module).values())


def test_summary_at_setup(lightning_log):
    module = CausalLM(tiny_llama())
    cb = MatryoshkaLoRA(r_max=8, ranks=[2, 8], target_modules=["q_proj", "o_proj", "up_proj"], scaling="rank")
    trainer([cb], max_steps=1).fit(module, token_loader())
    text = "\n".join(m for m in lightning_log.messages if "MatryoshkaLoRA" in m)
    assert text, lightning_log.messages
    adapter = sum(p.numel() for n, p in module.named_parameters() if _is_adapter(n))
    total = sum(p.numel() for p in module.parameters())
    # q: 8·32 + 32·8, o: same, up: 8·32 + 64·8, in each of 2 layers
    assert adapter == 2 * (512 + 512 + 768)
    assert "adapted 6 layers" in text
    assert f"{adapter:,}" in text and f"{total:,}" in text
    assert f"{100 * adapter / total:.2f}%" in text
    assert "r_max=8" in text and "[2, 8]" in text and "scaling=rank" in text


def test_apply_prints_summary_too(lightning_log):
    names = MatryoshkaLoRA(r_max=2).apply(tiny_gpt2())
    assert any(f"adapted {len(names)} layers" in m for m in lightning_log.messages)


# --------------------------------------------------------------------------------------------------- checkpoints
def _ckpt_files(path) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".ckpt"))


def test_checkpoint_holds_adapter_and_config_not_the_base(tmp_path):
    # a model whose frozen base dominates: 2 × (3000 × 32) embedding and head parameters
    model = tiny_llama(vocab_size=3000)
    module = CausalLM(model, optimizer="sgd", lr=0.1)  # plain SGD keeps no optimizer state
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj"], modules_to_save=None)
    t = trainer([cb, ModelCheckpoint(dirpath=tmp_path)], max_epochs=1, max_steps=-1, enable_checkpointing=True)
    t.fit(module, token_loader(n=8, vocab=3000))
    (path,) = _ckpt_files(tmp_path)
    size = os.path.getsize(path)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in module.named_parameters() if _is_adapter(n))
    model_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert adapter_bytes == 4 * 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert model_bytes > 50 * adapter_bytes
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert set(ckpt["state_dict"]) == {n for n in module.state_dict() if _is_adapter(n)}
    assert sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values()) == adapter_bytes
    (cb_state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("MatryoshkaLoRA")]
    assert cb_state["config"]["r_max"] == 4 and cb_state["config"]["target_modules"] == ["q_proj", "v_proj"]
    assert adapter_bytes <= size <= adapter_bytes + 20_000, (size, adapter_bytes)
    assert size < model_bytes / 20


def _adapter_state(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if _is_adapter(n)}


@pytest.mark.parametrize("mode", ["matryoshka", "dylora"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, mode):
    def run(max_epochs, seed, ckpt_path=None, ckpt_dir=None, r_max=4):
        L.seed_everything(seed, verbose=False)
        module = CausalLM(tiny_llama(seed=0), lr=5e-3)
        cb = MatryoshkaLoRA(r_max=r_max, mode=mode, seed=3)
        callbacks = [cb] + ([ModelCheckpoint(dirpath=ckpt_dir)] if ckpt_dir else [])
        t = trainer(callbacks, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=bool(ckpt_dir))
        t.fit(module, token_loader(n=12), ckpt_path=ckpt_path)  # 3 steps per epoch
        return module, t

    full, t_full = run(2, seed=1)
    assert t_full.global_step == 6
    half, _ = run(1, seed=1, ckpt_dir=tmp_path)
    (ckpt,) = _ckpt_files(tmp_path)
    assert not all(torch.equal(a, b) for a, b in zip(_adapter_state(half).values(), _adapter_state(full).values()))
    resumed, t_res = run(2, seed=99, ckpt_path=ckpt)  # different seed: the adapter must come from the checkpoint
    assert t_res.global_step == 6
    ref, got = _adapter_state(full), _adapter_state(resumed)
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
    base = tiny_llama(seed=0).state_dict()
    for n, v in resumed.model.state_dict().items():
        if not _is_adapter(n):
            assert torch.equal(v, base[n.replace(".base_layer", "")]), n

    with pytest.raises(ValueError, match=re.escape("r_max=4")) as err:
        run(2, seed=1, ckpt_path=ckpt, r_max=8)
    assert "resume with MatryoshkaLoRA(r_max=4" in str(err.value)
