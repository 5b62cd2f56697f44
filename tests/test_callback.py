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


class _AdapterSnapshot(L.Callback):
    """The adapter's values when training starts (after the callback injected it)."""

    def on_train_start(self, trainer, pl_module):
        self.initial = {n: p.detach().clone() for n, p in pl_module.named_parameters() if _is_adapter(n)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                                  (torch.bfloat16, "float32")])
def test_fit_trains_only_the_adapter(family, dtype, adapter_dtype):
    model = (tiny_llama if family == "llama" else tiny_gpt2)(seed=0, dtype=dtype)
    module = CausalLM(model)
    before = {id(p): (n, p.detach().clone()) for n, p in module.named_parameters()}
    cb = MatryoshkaLoRA(r_max=8, adapter_dtype=adapter_dtype)
    snap = _AdapterSnapshot()
    t = trainer([cb, snap], max_steps=3)
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
    # adapter weights changed (compared with their values when training started)
    assert snap.initial.keys() == adapter.keys()
    for n, p in adapter.items():
        assert p.requires_grad
        assert not torch.equal(p, snap.initial[n]), f"{n} did not train"
        if n.endswith("lora_B"):
            assert torch.count_nonzero(snap.initial[n]) == 0 and torch.count_nonzero(p) > 0, n
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


def test_summary_printed_once_when_configure_model_adds_nothing(lightning_log):
    module = BuildsInConfigureModel(model=tiny_llama())  # built before setup; configure_model is a no-op
    trainer([MatryoshkaLoRA(r_max=4)], max_steps=1).fit(module, token_loader())
    assert sum("MatryoshkaLoRA: adapted" in m for m in lightning_log.messages) == 1


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
    def run(max_epochs, seed, ckpt_path=None, ckpt_dir=None, r_max=4, target_modules="all-linear"):
        L.seed_everything(seed, verbose=False)
        module = CausalLM(tiny_llama(seed=0), lr=5e-3)
        cb = MatryoshkaLoRA(r_max=r_max, mode=mode, seed=3, target_modules=target_modules)
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
    with pytest.raises(ValueError, match=r"target_modules=.*resume with the same target_modules"):
        run(2, seed=1, ckpt_path=ckpt, target_modules=["q_proj"])


@pytest.mark.parametrize("adapter_dtype, expected", [("float32", torch.float32), (None, torch.bfloat16)])
def test_bf16_true_precision_keeps_the_requested_adapter_dtype(adapter_dtype, expected):
    # Lightning's "bf16-true" converts the whole module with .to(bfloat16) after setup; an explicit
    # adapter_dtype must survive that (else float32 adapters silently train in bfloat16).
    module = CausalLM(tiny_llama())
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj"], adapter_dtype=adapter_dtype)
    t = trainer([cb], max_steps=2, precision="bf16-true")
    t.fit(module, token_loader())
    layers = adapted_layers(module).values()
    assert all(m.base_layer.weight.dtype == torch.bfloat16 for m in layers)
    assert all(m.lora_A.dtype == expected and m.lora_B.dtype == expected for m in layers)
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in layers)
    opt_params = [p for g in t.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == 8 and all(p.dtype == expected for p in opt_params)


def test_apply_then_fit_with_the_same_callback_resumes(tmp_path):
    """A notebook flow: cb.apply(module) first, then Trainer(callbacks=[cb]); resuming must still load the
    adapter-only checkpoint (the callback must not skip its loading setup for a module it already adapted)."""
    def run(max_epochs, ckpt_path=None, ckpt_dir=None):
        L.seed_everything(0, verbose=False)
        module = CausalLM(tiny_llama(seed=0), lr=5e-3)
        cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj"], verbose=False)
        cb.apply(module)
        callbacks = [cb] + ([ModelCheckpoint(dirpath=ckpt_dir)] if ckpt_dir else [])
        t = trainer(callbacks, max_epochs=max_epochs, max_steps=-1, enable_checkpointing=bool(ckpt_dir))
        t.fit(module, token_loader(n=8), ckpt_path=ckpt_path)
        return module

    full = run(2)
    run(1, ckpt_dir=tmp_path)
    (ckpt,) = _ckpt_files(tmp_path)
    resumed = run(2, ckpt_path=ckpt)
    ref, got = _adapter_state(full), _adapter_state(resumed)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-6, atol=1e-7)


class _RankRecorder(L.Callback):
    def __init__(self, cb: MatryoshkaLoRA) -> None:
        self.cb, self.records = cb, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # runs after the MatryoshkaLoRA hook
        ctrl = self.cb.controller
        rows = ctrl.rowwise_ranks(batch.shape[0]).tolist() if self.cb.config.mode == "rowwise" else None
        self.records.append((trainer.global_step, ctrl.step_rank, rows))


@pytest.mark.parametrize("mode", ["dylora", "rowwise", "lora"])
def test_modes_in_fit_with_gradient_accumulation(mode):
    module = CausalLM(tiny_llama())
    cb = MatryoshkaLoRA(r_max=4, mode=mode, target_modules=["q_proj", "down_proj"], seed=5)
    rec = _RankRecorder(cb)
    t = trainer([cb, rec], max_steps=4, accumulate_grad_batches=2)
    t.fit(module, token_loader(n=32, batch_size=4))
    assert [r[0] for r in rec.records] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert all(torch.count_nonzero(m.lora_B) > 0 for m in adapted_layers(module).values())
    if mode == "dylora":  # one rank per optimizer step, shared by its micro-batches, drawn from (seed, step)
        from lightning_matlora.rank import RankController
        ref = RankController(cb.config)
        for step, b, _ in rec.records:
            ref.begin_step(step)
            assert b == ref.step_rank
        assert all(rec.records[i][1] == rec.records[i + 1][1] for i in range(0, 8, 2))
    if mode == "rowwise":  # every train rank in every micro-batch (4 rows ≥ |S| = 3)
        assert all(set(rows) == {1, 2, 4} for _, _, rows in rec.records)


def test_public_api_names_and_defaults():
    import inspect

    import lightning_matlora as lm

    for name in ("MatryoshkaLoRA", "MatryoshkaLinear", "build_p", "set_rank", "at_rank", "merge", "unmerge",
                 "default_ranks", "adapted_layers", "begin_step", "MatLoRAConfig"):
        assert name in lm.__all__ and hasattr(lm, name), name
    assert issubclass(MatryoshkaLoRA, L.Callback)
    params = inspect.signature(MatryoshkaLoRA).parameters
    expected = dict(r_max=64, ranks=None, target_modules="all-linear", exclude_modules=("lm_head",),
                    modules_to_save=None, scaling="sqrt", alpha=1.0, dropout=0.0, mode="rowwise",
                    rank_scale="rank", p=None, eval_ranks=None, adapter_dtype=None)
    assert list(params)[:len(expected)] == list(expected)
    assert {k: params[k].default for k in expected} == expected
    assert inspect.signature(lm.build_p).parameters["scaling"].default == "sqrt"
    cb = MatryoshkaLoRA(r_max=64)
    assert cb.config.ranks == [1, 2, 4, 8, 16, 32, 64] and cb.config.eval_ranks == cb.config.ranks
    # the default mode is "rowwise" (issue 7's accuracy study, docs/results.md); the paper's configuration is one
    # argument away and trains with Algorithm 1's P
    paper = MatryoshkaLoRA(r_max=64, mode="matryoshka")
    assert paper.config.rank_scale == "rank" and torch.equal(paper.p, lm.build_p(paper.config.ranks, 64, "sqrt"))
