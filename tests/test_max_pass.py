"""``max_pass``: every rowwise training step runs twice on the same batch, once with every row at r_max and once
with the rows dealt over the train ranks below r_max; the step optimises (L_max + L_low) / 2."""

from __future__ import annotations

import math
import warnings

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import tiny_llama
from lit_helpers import CausalLM, token_loader, trainer
from lightning_matlora import (MatLoRAConfig, MatryoshkaLoRA, adapted_layers, at_rank, begin_step, load_adapter,
                               paired_loss, read_adapter, save_adapter, set_rank)
from lightning_matlora.adapted_model import controller_of
from lightning_matlora.rank import RankController
from lightning_matlora.summary import format_summary


# --------------------------------------------------------------------------------------------------- config
def test_max_pass_defaults_off_and_rank_weights_to_half_max():
    """The default trains one pass (docs/results.md: on the real model one pass with init="per_rank" kept
    r_max within a point of plain LoRA at the same training time); paired passes are opted into."""
    assert MatLoRAConfig(r_max=8).max_pass is False and MatLoRAConfig(r_max=8).rank_weights == "half_max"
    assert MatLoRAConfig(r_max=8, max_pass=None).max_pass is False  # None (the old "auto") reads as the default
    assert MatLoRAConfig(r_max=8, rank_weights="half_max").max_pass is False
    assert MatLoRAConfig(r_max=8, max_pass=False).rank_weights == "half_max"
    assert MatLoRAConfig(r_max=8).row_cycle == [1, 2, 4, 8, 8, 8]  # half of the rows at r_max
    for kw in (dict(mode="lora"), dict(mode="matryoshka"), dict(mode="dylora"), dict(ranks=[8])):
        assert MatLoRAConfig(r_max=8, **kw).max_pass is False
    cfg = MatLoRAConfig(r_max=8)
    assert MatLoRAConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["max_pass"] is False
    cfg = MatLoRAConfig(r_max=8, max_pass=True)
    assert cfg.rank_weights == "uniform"  # the default of the low pass
    assert cfg.low_ranks == [1, 2, 4]
    assert cfg.row_cycle == [1, 2, 4]  # the low pass deals only the ranks below r_max
    assert MatLoRAConfig(r_max=8, max_pass=True, rank_weights=[3, 1, 2]).row_cycle == [1, 1, 1, 2, 4, 4]
    # r_max need not be a train rank: then every train rank is below it
    assert MatLoRAConfig(r_max=8, ranks=[1, 4], max_pass=True).row_cycle == [1, 4]
    assert MatryoshkaLoRA(r_max=8, max_pass=True, verbose=False).config.max_pass is True


@pytest.mark.parametrize("kw, match", [
    (dict(max_pass="yes"), "max_pass must be True or False"),
    (dict(max_pass=1), "max_pass must be True or False"),
    (dict(max_pass=True, mode="matryoshka"), "use mode='rowwise'"),
    (dict(max_pass=True, mode="dylora"), "use mode='rowwise'"),
    (dict(max_pass=True, ranks=[8]), "at least one train rank below r_max"),
    (dict(max_pass=True, rank_weights="half_max"), "use 'uniform'"),
    (dict(max_pass=True, rank_weights=[1, 1, 1, 1]), "one positive integer per train rank below r_max"),
    (dict(max_pass=True, rank_weights=[1, 0, 1]), "one positive integer per train rank below r_max"),
])
def test_bad_max_pass_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        MatLoRAConfig(r_max=8, **kw)
    with pytest.raises(ValueError, match=match):
        MatryoshkaLoRA(r_max=8, verbose=False, **kw)


def test_max_pass_round_trips_and_old_configs_read_without_it():
    cfg = MatLoRAConfig(r_max=8, max_pass=True, rank_weights=[1, 2, 1])
    back = MatLoRAConfig.from_dict(cfg.to_dict())
    assert back == cfg and back.max_pass is True and back.row_cycle == [1, 2, 2, 4]
    uniform = MatLoRAConfig.from_dict(MatLoRAConfig(r_max=8, max_pass=True).to_dict())
    assert uniform.rank_weights == "uniform" and uniform.max_pass is True
    old = MatLoRAConfig(r_max=8, max_pass=False, rank_weights="half_max").to_dict()
    del old["max_pass"]  # written before max_pass existed: its explicit rank_weights keeps the one-pass rule
    read = MatLoRAConfig.from_dict(old)
    assert read.max_pass is False and read.rank_weights == "half_max"


def test_the_summary_shows_max_pass_when_on():
    model = nn.Sequential(nn.Linear(8, 8))
    cb = MatryoshkaLoRA(r_max=4, max_pass=True, verbose=False)
    cb.apply(model)
    assert "max_pass=True" in format_summary(model, cb.config, cb.adapted)
    plain = nn.Sequential(nn.Linear(8, 8))
    cb2 = MatryoshkaLoRA(r_max=4, max_pass=False, verbose=False)
    cb2.apply(plain)
    assert "max_pass" not in format_summary(plain, cb2.config, cb2.adapted)


def test_resuming_with_another_max_pass_warns_and_an_old_checkpoint_counts_as_false():
    cb = MatryoshkaLoRA(r_max=8, max_pass=True, verbose=False)
    saved = MatLoRAConfig(r_max=8, max_pass=False).to_dict()
    with pytest.warns(UserWarning, match="max_pass"):
        cb._check_config(saved)
    plain = MatryoshkaLoRA(r_max=8, max_pass=False, verbose=False)
    old = dict(saved)
    del old["max_pass"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain._check_config(old)  # a checkpoint from before max_pass trained with max_pass=False
    with pytest.warns(UserWarning, match="max_pass"):  # the paired passes are asked for: the objective changes
        MatryoshkaLoRA(r_max=8, max_pass=True, verbose=False)._check_config(old)


def test_adapter_save_and_load_keep_max_pass(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    MatryoshkaLoRA(r_max=4, max_pass=True, rank_weights=[2, 1], verbose=False).apply(model)
    with torch.no_grad():
        for m in adapted_layers(model).values():
            m.lora_B.normal_()
    path = save_adapter(model, tmp_path / "a")
    saved = read_adapter(path)
    assert saved.config.max_pass is True and saved.config.rank_weights == [2, 1]
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 4))
    load_adapter(fresh, path)
    assert controller_of(fresh).config.max_pass is True
    x = torch.randn(3, 8)
    with at_rank(model, 2), at_rank(fresh, 2):
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------- float64 reference of one step
R, D_IN, D_HID, D_OUT, ROWS = 8, 9, 10, 8, 7  # train ranks 1, 2, 4, 8; the low pass deals 1, 2, 4 over 7 rows


def _two_layers(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT)).double()


def _adapt(model: nn.Module, **kw) -> MatryoshkaLoRA:
    cb = MatryoshkaLoRA(r_max=R, max_pass=True, scaling="sqrt", verbose=False, **kw)
    cb.apply(model)
    with torch.no_grad():  # B ≠ 0, so that every pass involves both factors
        g = torch.Generator().manual_seed(7)
        for m in adapted_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g, dtype=torch.float64) * 0.5)
    return cb


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (torch.randn(ROWS, D_IN, generator=g, dtype=torch.float64),
            torch.randn(ROWS, D_OUT, generator=g, dtype=torch.float64))


def _mse(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((y - t) ** 2).sum(-1).mean()


def _snapshot(model: nn.Module) -> dict:
    """Copies of each adapted layer's (lora_A, lora_B, W, bias), PEFT's orientation (A: R × in, B: out × R)."""
    return {n: tuple(v.detach().clone() for v in (m.lora_A, m.lora_B, m.base_layer.weight, m.base_layer.bias))
            for n, m in adapted_layers(model).items()}


def _reference_grads(snapshot: dict, x: torch.Tensor, t: torch.Tensor, low_rows: list[int]) -> dict:
    """d/d(factors) of (L_max + L_low)/2 from a dense float64 computation written from the spec: per row i,
    y = W·x + s(k_i)·B[:, :k_i]·A[:k_i]·x with s(k) = 1/√k, in each layer (k_i = r_max in the max pass, the
    dealt rank in the low pass); L = mean over rows of the squared error."""
    assert sorted(snapshot) == ["0", "2"]
    A = {n: snapshot[n][0].clone().requires_grad_(True) for n in snapshot}
    B = {n: snapshot[n][1].clone().requires_grad_(True) for n in snapshot}

    def layer(n, h, k):
        W, b = snapshot[n][2], snapshot[n][3]
        return W @ h + b + (1.0 / math.sqrt(k)) * (B[n][:, :k] @ (A[n][:k] @ h))

    def loss(ks):
        total = 0.0
        for i, k in enumerate(ks):
            y = layer("2", torch.tanh(layer("0", x[i], k)), k)
            total = total + ((y - t[i]) ** 2).sum()
        return total / len(ks)

    ((loss([R] * ROWS) + loss(low_rows)) / 2).backward()
    return {n: (A[n].grad, B[n].grad) for n in snapshot}


def _expected_low_rows(offset: int, cycle: list[int]) -> list[int]:
    """The low pass's deal, written out: row i trains cycle[(offset + i) mod len(cycle)]."""
    return [cycle[(offset + i) % len(cycle)] for i in range(ROWS)]


def _assert_grads(grads: dict, ref: dict) -> None:
    """``grads``: name → (grad of lora_A, grad of lora_B)."""
    assert sorted(grads) == sorted(ref)
    for n, (gA, gB) in ref.items():
        torch.testing.assert_close(grads[n][0], gA, rtol=0, atol=1e-12)
        torch.testing.assert_close(grads[n][1], gB, rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights, cycle", [(None, [1, 2, 4]), ([1, 2, 3], [1, 2, 2, 4, 4, 4])])
def test_paired_loss_gradients_equal_the_dense_float64_reference(weights, cycle):
    model = _two_layers()
    kw = {} if weights is None else {"rank_weights": weights}
    cb = _adapt(model, **kw)
    assert cb.config.row_cycle == cycle
    x, t = _data()
    begin_step(model, 5)
    offset = cb.controller._row_offset
    low_rows = _expected_low_rows(offset, cycle)
    with cb.controller.in_pass("low"):
        assert cb.controller.rowwise_ranks(ROWS).tolist() == low_rows
    ref = _reference_grads(_snapshot(model), x, t, low_rows)
    model.train()
    loss = paired_loss(model, lambda: _mse(model(x), t))
    loss.backward()
    _assert_grads({n: (m.lora_A.grad, m.lora_B.grad) for n, m in adapted_layers(model).items()}, ref)
    assert controller_of(model).active_pass is None


def test_paired_loss_is_the_mean_of_the_rank_r_max_loss_and_the_low_pass_loss():
    model = _two_layers()
    cb = _adapt(model)
    x, t = _data()
    begin_step(model, 2)
    low = torch.tensor(_expected_low_rows(cb.controller._row_offset, cb.config.row_cycle))
    seen = []
    loss = paired_loss(model, lambda: seen.append(_mse(model(x), t)) or seen[-1])
    with torch.no_grad(), at_rank(model, R):
        l_max = _mse(model(x), t)
    with torch.no_grad(), at_rank(model, low):
        l_low = _mse(model(x), t)
    torch.testing.assert_close(seen[0].detach(), l_max, rtol=0, atol=1e-14)
    torch.testing.assert_close(seen[1].detach(), l_low, rtol=0, atol=1e-14)
    torch.testing.assert_close(loss.detach(), (l_max + l_low) / 2, rtol=0, atol=1e-14)
    assert abs(float(l_max - l_low)) > 1e-3  # the two passes really differ


def test_automatic_draws_advance_once_per_paired_step():
    """Without begin_step, a paired step's low-pass forward draws the next step; the max pass draws nothing (and
    does not warn that no step was drawn)."""
    model = _two_layers()
    cb = _adapt(model)
    x, t = _data()
    ctrl = cb.controller
    other = RankController(cb.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(4):
            paired_loss(model, lambda: _mse(model(x), t))
            other.begin_step(step)
            assert ctrl._auto_step == step + 1
            assert ctrl._row_offset == other._row_offset


def test_a_training_forward_outside_a_paired_step_warns_and_trains_half_of_the_rows_at_r_max():
    model = _two_layers()
    _adapt(model)
    x, _ = _data()
    begin_step(model, 0)
    with pytest.warns(UserWarning, match="outside a paired step"):
        model(x)
    ctrl = controller_of(model)
    low = ctrl.config.row_cycle
    ranks = ctrl.rowwise_ranks(2 * len(low))  # one whole cycle: every low rank once, then r_max as often
    assert sorted(ranks.tolist()) == sorted(low + [R] * len(low))
    with ctrl.in_pass("low"):
        assert R not in ctrl.rowwise_ranks(2 * len(low)).tolist()


def test_paired_loss_needs_max_pass_and_the_training_setting_and_restores_the_pass():
    plain = nn.Sequential(nn.Linear(4, 4))
    MatryoshkaLoRA(r_max=4, max_pass=False, verbose=False).apply(plain)
    with pytest.raises(ValueError, match=r"max_pass=False.*max_pass=True"):
        paired_loss(plain, lambda: plain(torch.ones(2, 4)).sum())

    model = _two_layers()
    cb = _adapt(model)
    x, t = _data()
    set_rank(model, 2)
    with pytest.raises(ValueError, match=r"set_rank\(model, None\)"):
        paired_loss(model, lambda: _mse(model(x), t))
    set_rank(model, None)

    def failing():
        if cb.controller.active_pass == "low":
            raise RuntimeError("boom")
        return _mse(model(x), t)

    with pytest.raises(RuntimeError, match="boom"):
        paired_loss(model, failing)
    assert cb.controller.active_pass is None
    with pytest.raises(ValueError, match="Unknown pass"):
        with cb.controller.in_pass("mid"):
            pass


# -------------------------------------------------------------------------------------------------- Trainer
class TwoLayers(L.LightningModule):
    def __init__(self, model: nn.Module, returns: str = "tensor") -> None:
        super().__init__()
        self.model, self.returns = model, returns
        self.ctrl_passes: list[str | None] = []

    def training_step(self, batch, batch_idx):
        x, t = batch
        loss = _mse(self.model(x), t)
        self.ctrl_passes.append(controller_of(self.model).active_pass)
        if self.returns == "none_low" and self.ctrl_passes[-1] == "low":
            return None
        if self.returns == "dict":
            return {"loss": loss, "pass": self.ctrl_passes[-1]}
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GradRecorder(L.Callback):
    def __init__(self, cb: MatryoshkaLoRA) -> None:
        self.cb, self.grads, self.offsets, self.outputs = cb, [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.offsets.append(self.cb.controller._row_offset)
        self.grads.append({n: (None if m.lora_A.grad is None else m.lora_A.grad.clone(),
                               None if m.lora_B.grad is None else m.lora_B.grad.clone())
                           for n, m in adapted_layers(pl_module).items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.outputs.append(outputs)


def _loader() -> DataLoader:
    x, t = _data()
    return DataLoader(TensorDataset(x, t), batch_size=ROWS)


def test_callback_step_gradients_equal_the_dense_float64_reference():
    module = TwoLayers(_two_layers())
    cb = _adapt(module)
    initial = _snapshot(module)
    rec = GradRecorder(cb)
    trainer([cb, rec], max_steps=1).fit(module, _loader())
    assert module.ctrl_passes == ["max", "low"]  # the user's step ran twice, in the max pass first
    x, t = _data()
    ref = _reference_grads({k.removeprefix("model."): v for k, v in initial.items()}, x, t,
                           _expected_low_rows(rec.offsets[0], cb.config.row_cycle))
    _assert_grads({k.removeprefix("model."): v for k, v in rec.grads[0].items()}, ref)
    # the step's loss (the Trainer's outputs) is the mean of both passes
    assert set(rec.outputs[0]) == {"loss"}


def test_callback_combines_dict_outputs_and_skips_a_step_when_a_pass_returns_none():
    module = TwoLayers(_two_layers(), returns="dict")
    cb = _adapt(module)
    rec = GradRecorder(cb)
    trainer([cb, rec], max_steps=2).fit(module, _loader())
    assert [o["pass"] for o in rec.outputs] == ["max", "max"]  # the r_max pass's dict ...
    assert all(torch.isfinite(o["loss"]) for o in rec.outputs)  # ... with the mean loss (the value: next test)

    module = TwoLayers(_two_layers(), returns="none_low")
    cb = _adapt(module)
    start = _snapshot(module)
    rec = GradRecorder(cb)
    trainer([cb, rec], max_steps=2).fit(module, _loader())
    assert module.ctrl_passes == ["max", "low"] * 2
    assert all(g == (None, None) for step in rec.grads for g in step.values())  # no backward
    for n, m in adapted_layers(module).items():
        assert torch.equal(m.lora_B, start[n][1]) and torch.equal(m.lora_A, start[n][0])


class LoggingLM(CausalLM):
    """Logs its loss like a user's module does; returns a tensor or a dict."""

    def __init__(self, model: nn.Module, returns: str = "tensor") -> None:
        super().__init__(model)
        self.returns = returns

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/pass_is_max": float(controller_of(self).active_pass == "max")})
        return {"loss": loss, "rows": batch.shape[0]} if self.returns == "dict" else loss


class PassProbe(L.Callback):
    """Per step: the losses of both passes measured independently before the step (r_max through ``at_rank``,
    the low pass through per-row ranks dealt from the step's offset), then what the step logged and returned."""

    def __init__(self, cb: MatryoshkaLoRA) -> None:
        self.cb, self.expected, self.seen = cb, [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after MatryoshkaLoRA's draw
        cycle = self.cb.config.row_cycle
        rows = torch.tensor([cycle[(self.cb.controller._row_offset + i) % len(cycle)] for i in range(len(batch))])
        model = pl_module.model
        with torch.no_grad():
            with at_rank(model, self.cb.config.r_max):
                l_max = float(model(input_ids=batch, labels=batch).loss)
            with at_rank(model, rows):
                l_low = float(model(input_ids=batch, labels=batch).loss)
        self.expected.append((l_max, l_low))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.seen.append(dict(out=float(outputs["loss"]), extra=outputs.get("rows"), logged=float(m["train/loss"]),
                              low=float(m["train/loss_low_ranks"]), marker=float(m["train/pass_is_max"])))


@pytest.mark.parametrize("returns", ["tensor", "dict"])
def test_a_trainer_fit_with_max_pass_on_a_transformers_model(returns):
    module = LoggingLM(tiny_llama(), returns=returns)
    cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj", "v_proj", "down_proj"], max_pass=True, seed=2,
                        save_adapter=False, rank_eval=None, verbose=False)
    probe = PassProbe(cb)
    t = trainer([cb, probe], max_steps=4)
    t.fit(module, token_loader(n=16, batch_size=4))
    assert cb.config.row_cycle == [1, 2]
    assert len(probe.seen) == 4
    for (l_max, l_low), seen in zip(probe.expected, probe.seen):
        assert seen["logged"] == pytest.approx(l_max, abs=1e-5)  # the user's train log: the r_max pass
        assert seen["low"] == pytest.approx(l_low, abs=1e-5)  # logged by the callback
        assert seen["out"] == pytest.approx((l_max + l_low) / 2, abs=1e-5)  # what Lightning optimised
        assert seen["marker"] == 1.0  # the low pass's log calls were dropped
        assert seen["extra"] == (4 if returns == "dict" else None)
    assert any(abs(a - b) > 1e-3 for a, b in probe.expected[1:])  # the passes differ once B trained
    layers = adapted_layers(module)
    assert layers and all(torch.count_nonzero(m.lora_B) > 0 for m in layers.values())
    # a second fit on the same module wraps training_step once, not twice
    t2 = trainer([cb], max_steps=1)
    t2.fit(module, token_loader(n=4, batch_size=4))
    assert "training_step" in module.__dict__["_matlora_wrapped_hooks"]


def test_manual_optimization_computes_the_paired_loss_in_its_own_training_step():
    """Lightning does not run a manual-optimization step twice: the step calls paired_loss itself and gets the
    paired objective; a step that does not gets the one-pass approximation and a warning naming paired_loss."""
    seen = {}

    class Manual(CausalLM):
        def __init__(self, model, paired: bool):
            super().__init__(model)
            self.automatic_optimization = False
            self.paired = paired

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            if self.paired:
                loss = paired_loss(self, lambda: self.model(input_ids=batch, labels=batch).loss)
                seen["steps"] = seen.get("steps", 0) + 1
            else:
                loss = self.model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    for paired in (True, False):
        cb = MatryoshkaLoRA(r_max=4, target_modules=["q_proj"], max_pass=True, verbose=False, save_adapter=False,
                            rank_eval=None)
        module = Manual(tiny_llama().train(), paired)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer([cb], max_steps=2).fit(module, token_loader(n=8))
        outside = [w for w in caught if "outside a paired step" in str(w.message)]
        assert bool(outside) is (not paired)
        assert "training_step" not in module.__dict__.get("_matlora_wrapped_hooks", set())
    assert seen["steps"] == 2
