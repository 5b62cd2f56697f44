"""``distill``: in a ``max_pass`` step the low pass's logits are also matched to the detached r_max logits of the
same batch; the step optimises (L_max + L_low + distill·KL(p_max ‖ p_low)) / 2."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from conftest import tiny_gpt2, tiny_llama
from lit_helpers import CausalLM, token_loader, trainer
from lightning_matlora import (MatLoRAConfig, MatryoshkaLoRA, adapted_layers, at_rank, begin_step, load_adapter,
                               paired_loss, read_adapter, save_adapter)
from lightning_matlora.adapted_model import controller_of, model_state_of
from lightning_matlora.model_state import ModelState
from lightning_matlora.summary import format_summary

R, D_IN, D_HID, C, ROWS, T = 8, 9, 10, 8, 7, 3  # train ranks 1, 2, 4, 8; the low pass deals 1, 2, 4 over 7 rows


class Tiny(nn.Module):
    """x (rows, T, D_IN) → logits (rows, T, C) through ``body`` and the output Linear ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D_IN, D_HID)
        self.head = nn.Linear(D_HID, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float64) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().to(dtype)


def _adapt(model: nn.Module, **kw) -> MatryoshkaLoRA:
    args = dict(r_max=R, max_pass=True, scaling="sqrt", distill_module="head", verbose=False)
    args.update(kw)
    cb = MatryoshkaLoRA(**args)
    cb.apply(model)
    with torch.no_grad():  # B ≠ 0, so that the passes (and the two softmaxes) differ
        g = torch.Generator().manual_seed(7)
        for m in adapted_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64).to(m.lora_B.dtype) * 0.5)
    return cb


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(ROWS, T, D_IN, generator=g, dtype=torch.float64),
            torch.randint(0, C, (ROWS, T), generator=g))


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


def _reference_grads(model: Tiny, x: torch.Tensor, y: torch.Tensor, low_rows: list[int], w: float,
                     detach_teacher: bool = True) -> dict:
    """d/d(factors) of (L_max + L_low + w·KL)/2 from a dense float64 computation written from the spec: per row i,
    each layer computes h·Wᵀ + b + s(k_i)·(h·A[:k_i]ᵀ)·B[:, :k_i]ᵀ with s(k) = 1/√k (k_i = r_max in the max
    pass, the dealt rank in the low pass); L = mean cross-entropy over every position; KL = mean over positions of
    Σ_c p_c·(log p_c − log q_c), p = softmax(z_max) (detached), q = softmax(z_low)."""
    layers = adapted_layers(model)
    assert sorted(layers) == ["body", "head"]
    A = {n: m.lora_A.detach().clone().requires_grad_(True) for n, m in layers.items()}
    B = {n: m.lora_B.detach().clone().requires_grad_(True) for n, m in layers.items()}

    def layer(n, h, k):
        base = layers[n].base_layer
        return h @ base.weight.T + base.bias + (1.0 / math.sqrt(k)) * ((h @ A[n][:k].T) @ B[n][:, :k].T)

    def logits(ks):
        return torch.stack([layer("head", torch.tanh(layer("body", x[i], k)), k) for i, k in enumerate(ks)])

    z_max, z_low = logits([R] * ROWS), logits(low_rows)
    p = torch.softmax(z_max, -1)
    p = p.detach() if detach_teacher else p
    q = torch.softmax(z_low, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    ((_ce(z_max, y) + _ce(z_low, y) + w * kl) / 2).backward()
    return {n: (A[n].grad, B[n].grad) for n in layers}


def _low_rows(cb: MatryoshkaLoRA) -> list[int]:
    cycle = cb.config.row_cycle
    return [cycle[(cb.controller._row_offset + i) % len(cycle)] for i in range(ROWS)]


def _grads(model: nn.Module) -> dict:
    return {n: (m.lora_A.grad, m.lora_B.grad) for n, m in adapted_layers(model).items()}


def _assert_grads(grads: dict, ref: dict) -> None:
    assert sorted(grads) == sorted(ref)
    for n, (gA, gB) in ref.items():
        torch.testing.assert_close(grads[n][0], gA, rtol=0, atol=1e-12)
        torch.testing.assert_close(grads[n][1], gB, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- float64 reference of one step
@pytest.mark.parametrize("w", [0.7, 3.0])
def test_paired_loss_gradients_equal_the_dense_float64_reference(w):
    model = _tiny()
    cb = _adapt(model, distill=w)
    assert ModelState.of_controller(cb.controller).distiller.name == "head"
    x, y = _data()
    begin_step(model, 4)
    low_rows = _low_rows(cb)
    assert len(set(low_rows)) == 3
    ref = _reference_grads(model, x, y, low_rows, w)
    model.train()
    paired_loss(model, lambda: _ce(model(x), y)).backward()
    _assert_grads(_grads(model), ref)
    # the teacher gets no gradient: a reference that lets p_max carry one differs
    leaky = _reference_grads(model, x, y, low_rows, w, detach_teacher=False)
    assert max(float((leaky[n][1] - ref[n][1]).abs().max()) for n in ref) > 1e-6


def test_paired_loss_adds_the_kl_of_the_logits_measured_at_the_passes_ranks():
    model = _tiny()
    cb = _adapt(model, distill=2.5)
    x, y = _data()
    begin_step(model, 1)
    low = torch.tensor(_low_rows(cb))
    loss = paired_loss(model, lambda: _ce(model(x), y))
    with torch.no_grad():
        with at_rank(model, R):
            z_max = model(x)
        with at_rank(model, low):
            z_low = model(x)
    p, q = torch.softmax(z_max, -1), torch.softmax(z_low, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()
    assert float(kl) > 1e-3
    torch.testing.assert_close(loss.detach(), (_ce(z_max, y) + _ce(z_low, y) + 2.5 * kl) / 2, rtol=0, atol=1e-13)


def test_distill_zero_gives_exactly_the_max_pass_step():
    x, y = _data()
    results = []
    for kw in ({}, {"distill": 0.0}, {"distill": 0, "distill_module": "head"}):
        model = _tiny()
        cb = _adapt(model, **kw)
        assert ModelState.of_controller(cb.controller).distiller is None
        begin_step(model, 3)
        loss = paired_loss(model, lambda: _ce(model(x), y))
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    for loss, grads in results[1:]:
        assert torch.equal(loss, results[0][0])
        for n, (gA, gB) in grads.items():
            assert torch.equal(gA, results[0][1][n][0]) and torch.equal(gB, results[0][1][n][1])


def test_the_teacher_is_kept_in_float32_or_wider_and_released_after_each_step():
    model = _tiny(dtype=torch.bfloat16)
    cb = _adapt(model, distill=1.0)
    distiller = ModelState.of_controller(cb.controller).distiller
    x, y = _data()
    seen = []

    def compute():
        if cb.controller.active_pass == "low":
            seen.append([t.dtype for t in distiller._teachers])
        return _ce(model(x.bfloat16()), y)

    loss = paired_loss(model, compute)
    assert seen == [[torch.float32]]
    assert torch.isfinite(loss)
    assert distiller._teachers == [] and distiller._kl_sum is None  # nothing kept between steps
    # outside a paired step the hook records nothing
    with at_rank(model, 2):
        model(x.bfloat16())
    assert distiller._teachers == []


# -------------------------------------------------------------------------------------------- errors in a step
def test_a_distilled_module_missing_from_the_low_pass_or_changing_shape_is_an_error():
    model = _tiny()
    cb = _adapt(model, distill=1.0)
    x, y = _data()
    begin_step(model, 0)

    def skips_head_in_low():
        if cb.controller.active_pass == "low":
            return model.body(x).sum()
        return _ce(model(x), y)

    with pytest.raises(RuntimeError, match=r"'head' \(distill_module\) ran 1 time\(s\) in the max pass but 0"):
        paired_loss(model, skips_head_in_low)

    def other_batch_in_low():
        return _ce(model(x[:3] if cb.controller.active_pass == "low" else x), y[:3] if cb.controller.active_pass
                   == "low" else y)

    with pytest.raises(RuntimeError, match=r"shape \(3, 3, 8\) in the low pass but \(7, 3, 8\) in the max pass"):
        paired_loss(model, other_batch_in_low)

    with pytest.raises(RuntimeError, match="did not run in the max pass"):
        paired_loss(model, lambda: model.body(x).sum())
    assert cb.controller.active_pass is None
    assert ModelState.of_controller(cb.controller).distiller._teachers == []  # released after a failed step too
    # and the next step works
    paired_loss(model, lambda: _ce(model(x), y)).backward()


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw, match", [
    (dict(distill=-0.5), "distill must be a finite number ≥ 0"),
    (dict(distill=float("nan")), "distill must be a finite number ≥ 0"),
    (dict(distill=float("inf")), "distill must be a finite number ≥ 0"),
    (dict(distill=True), "distill must be a finite number ≥ 0"),
    (dict(distill="1"), "distill must be a finite number ≥ 0"),
    (dict(distill=0.5, max_pass=False), r"needs max_pass=True: use MatryoshkaLoRA\(.*max_pass=True, distill=0.5\)"),
    (dict(distill=0.5, max_pass=False, mode="matryoshka"), "needs max_pass=True"),
    (dict(distill=1.0, distill_module=3), "distill_module must be None"),
    (dict(distill=1.0, distill_module=""), "distill_module must be None"),
])
def test_bad_distill_settings_are_refused_at_construction(kw, match):
    args = dict(max_pass=True)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        MatLoRAConfig(r_max=8, **args)
    with pytest.raises(ValueError, match=match):
        MatryoshkaLoRA(r_max=8, verbose=False, **args)


def test_a_missing_distill_module_is_refused_at_apply_before_the_model_changes():
    model = _tiny()
    with pytest.raises(ValueError, match=r"distill_module='neck' is not a submodule"):
        MatryoshkaLoRA(r_max=4, max_pass=True, distill=1.0, distill_module="neck", verbose=False).apply(model)
    assert not adapted_layers(model)
    with pytest.raises(ValueError, match=r"get_output_embeddings.*distill_module="):
        MatryoshkaLoRA(r_max=4, max_pass=True, distill=1.0, verbose=False).apply(model)  # automatic: no LM head
    assert not adapted_layers(model)
    # distill=0 never looks for the module
    MatryoshkaLoRA(r_max=4, max_pass=True, distill_module="neck", verbose=False).apply(model)


# ------------------------------------------------------------------------------------- transformers models
def test_the_automatic_module_is_the_output_embedding_of_a_transformers_model():
    llama = tiny_llama()
    MatryoshkaLoRA(r_max=4, max_pass=True, distill=1.0, verbose=False).apply(llama)
    assert model_state_of(llama).distiller.name == "lm_head"
    assert model_state_of(llama).distiller.module is llama.lm_head
    gpt2 = tiny_gpt2()  # tied output embedding
    MatryoshkaLoRA(r_max=4, max_pass=True, distill=1.0, verbose=False).apply(gpt2)
    assert model_state_of(gpt2).distiller.name == "lm_head"
    wrapped = CausalLM(tiny_llama())  # a LightningModule holding the model
    MatryoshkaLoRA(r_max=4, max_pass=True, distill=1.0, verbose=False).apply(wrapped)
    assert model_state_of(wrapped).distiller.name == "model.lm_head"


def test_paired_loss_on_a_transformers_model_adds_the_kl_of_its_logits():
    model = tiny_llama(dtype=torch.float64).train()
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj", "down_proj"], max_pass=True, distill=0.8,
                        verbose=False)
    cb.apply(model)
    with torch.no_grad():
        for m in adapted_layers(model).values():
            m.lora_B.normal_(std=0.3)
    ids = torch.randint(0, 97, (5, 7), generator=torch.Generator().manual_seed(1))
    begin_step(model, 2)
    cycle = cb.config.row_cycle
    low = torch.tensor([cycle[(cb.controller._row_offset + i) % len(cycle)] for i in range(5)])
    loss = paired_loss(model, lambda: model(input_ids=ids, labels=ids).loss)
    with torch.no_grad():
        with at_rank(model, 4):
            hi = model(input_ids=ids, labels=ids)
        with at_rank(model, low):
            lo = model(input_ids=ids, labels=ids)
    p, q = torch.softmax(hi.logits, -1), torch.softmax(lo.logits, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean()  # every position, the last one (no label) included
    assert float(kl) > 1e-4
    torch.testing.assert_close(loss.detach(), (hi.loss + lo.loss + 0.8 * kl) / 2, rtol=0, atol=1e-12)


class KLProbe(CausalLM):
    """Before each step, the step's KL measured independently (r_max and the dealt per-row ranks through
    ``at_rank``); after it, what the callback logged and returned."""

    def __init__(self, model: nn.Module, cb: MatryoshkaLoRA) -> None:
        super().__init__(model)
        self.cb, self.expected, self.seen = cb, [], []

    def on_train_batch_start(self, batch, batch_idx):  # runs after the callback's draw
        cycle = self.cb.config.row_cycle
        rows = torch.tensor([cycle[(self.cb.controller._row_offset + i) % len(cycle)] for i in range(len(batch))])
        with torch.no_grad():
            with at_rank(self.model, self.cb.config.r_max):
                hi = self.model(input_ids=batch, labels=batch)
            with at_rank(self.model, rows):
                lo = self.model(input_ids=batch, labels=batch)
        p, q = torch.softmax(hi.logits.double(), -1), torch.softmax(lo.logits.double(), -1)
        kl = float((p * (p.log() - q.log())).sum(-1).mean())
        self.expected.append((kl, float(hi.loss), float(lo.loss)))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        m = self.trainer.callback_metrics
        self.seen.append((float(m["train/distill_kl"]), float(outputs["loss"])))


def test_a_trainer_fit_with_distill_logs_the_kl_and_optimises_the_sum():
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj"], max_pass=True, distill=1.5, seed=1,
                        save_adapter=False, rank_eval=None, verbose=False)
    module = KLProbe(tiny_llama(dtype=torch.float64), cb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's data-loader hints
        trainer([cb], max_steps=3, precision="64-true").fit(module, token_loader(n=12, batch_size=4))
    assert len(module.seen) == 3
    for (kl, l_max, l_low), (logged, out) in zip(module.expected, module.seen):
        assert logged == pytest.approx(kl, rel=1e-9, abs=1e-15)
        assert out == pytest.approx((l_max + l_low + 1.5 * kl) / 2, abs=1e-6)  # transformers' loss is float32
    assert module.expected[0][0] == 0.0  # B = 0 at the start: both passes are the base model
    assert module.expected[-1][0] > 1e-6  # the passes differ once B trained
    assert ModelState.of_controller(cb.controller).distiller._teachers == []


# --------------------------------------------------------------------------------------- config and files
def test_distill_round_trips_through_config_and_adapter_files(tmp_path):
    cfg = MatLoRAConfig(r_max=8, max_pass=True, distill=2, distill_module="head")
    assert cfg.distill == 2.0 and isinstance(cfg.distill, float)
    assert MatLoRAConfig.from_dict(cfg.to_dict()) == cfg
    old = MatLoRAConfig(r_max=8, max_pass=True).to_dict()
    del old["distill"], old["distill_module"]  # written before either field existed
    read = MatLoRAConfig.from_dict(old)
    assert read.distill == 0.0 and read.distill_module is None

    model = _tiny()
    _adapt(model, distill=0.3)
    path = save_adapter(model, tmp_path / "a")
    saved = read_adapter(path)
    assert saved.config.distill == 0.3 and saved.config.distill_module == "head"
    fresh = load_adapter(_tiny(), path)
    ctrl, state = controller_of(fresh), model_state_of(fresh)
    assert ctrl.config.distill == 0.3 and state.distiller is not None and state.distiller.module is fresh.head
    x, _ = _data()
    with at_rank(model, 2), at_rank(fresh, 2):
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_the_summary_shows_distill_and_resuming_with_another_distill_warns():
    model = _tiny()
    cb = _adapt(model, distill=0.5)
    assert "distill=0.5 (head)" in format_summary(model, cb.config, cb.adapted)
    plain = _tiny()
    cb0 = _adapt(plain)
    assert "distill" not in format_summary(plain, cb0.config, cb0.adapted)
    with pytest.warns(UserWarning, match="distill"):
        cb._check_config(MatLoRAConfig(r_max=R, max_pass=True).to_dict())
    old = cb0.config.to_dict()
    del old["distill"], old["distill_module"]
    cb_auto = MatryoshkaLoRA(r_max=R, max_pass=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb_auto._check_config(old)  # a checkpoint from before distill trained without it


def test_layers_built_by_hand_without_the_hook_refuse_to_distill():
    from lightning_matlora import MatryoshkaLinear
    from lightning_matlora.rank import RankController

    cfg = MatLoRAConfig(r_max=4, max_pass=True, distill=1.0)
    model = nn.Sequential(MatryoshkaLinear(nn.Linear(4, 4), RankController(cfg)))
    with pytest.raises(RuntimeError, match="no distillation hook is registered"):
        paired_loss(model, lambda: model(torch.ones(3, 4)).sum())


def test_the_kl_keeps_two_logits_sized_tensors_for_the_backward():
    """docs/method.md's memory cost: beyond the max_pass step, the KL's backward keeps the low pass's log-softmax
    and p_max (the teacher itself is released in the low pass)."""
    x, y = _data()
    saved_bytes = []
    for w in (0.0, 1.0):
        model = _tiny()
        _adapt(model, distill=w)
        begin_step(model, 0)
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            paired_loss(model, lambda: _ce(model(x), y))
        saved_bytes.append(sum(sizes))
    assert saved_bytes[1] - saved_bytes[0] == 2 * ROWS * T * C * 8  # float64 logits


def test_an_adapter_trained_with_distill_loads_for_serving_into_a_model_without_its_distilled_module(tmp_path):
    class WithOut(Tiny):  # a training-time wrapper module on the logits, distilled by name
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(super().forward(x))

    torch.manual_seed(0)
    model = WithOut().to(torch.float64)
    _adapt(model, distill=0.5, distill_module="out")
    path = save_adapter(model, tmp_path / "a")
    fresh = load_adapter(_tiny(), path)  # the serving model has no "out": serving needs no distillation hook
    ctrl = controller_of(fresh)
    assert ctrl.config.distill == 0.5 and model_state_of(fresh).distiller is None
    x, _ = _data()
    with at_rank(model, 4), at_rank(fresh, 4):
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    fresh.train()
    with pytest.raises(RuntimeError, match="resume the run's checkpoint"):
        paired_loss(fresh, lambda: fresh(x).sum())
