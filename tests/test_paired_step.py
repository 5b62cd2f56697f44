"""What a paired (max_pass) step's training_step may rely on, and paired_loss's refusals.

The callback runs ``training_step`` twice per step (max pass, low pass). Its ``self.log`` calls count once (the
max pass's), and so do the updates of the torchmetrics metrics on the module: the low pass updates stand-ins whose
updates are discarded. Checked with real torchmetrics metrics through a real Trainer.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric, MetricCollection, SumMetric

import lightning_matlora as lm
from lightning_matlora.adapted_model import controller_of

ROWS, BATCH = 24, 4


class Counting(L.LightningModule):
    """Counts the rows it trains on with torchmetrics metrics (by update, by forward, inside a collection and a
    ModuleDict), and the calls of training_step with a plain counter (which is not isolated)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
        self.rows = SumMetric()
        self.by_forward = nn.ModuleDict({"rows": SumMetric()})
        self.collection = MetricCollection({"sum": SumMetric(), "mean": MeanMetric()})
        self.val_rows = SumMetric()
        self.calls = 0
        self.passes: list[str | None] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.calls += 1
        self.passes.append(controller_of(self).active_pass)
        n = torch.tensor(float(x.shape[0]))
        self.rows.update(n)
        self.by_forward["rows"](n)
        self.collection.update(n)
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.val_rows.update(torch.tensor(float(x.shape[0])))
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(ROWS, 8, generator=g), torch.randn(ROWS, 1, generator=g)
    return DataLoader(list(zip(x, y)), batch_size=BATCH)


def test_metrics_updated_in_training_step_count_each_row_once_with_paired_passes(tmp_path):
    module = Counting()
    cb = lm.MatryoshkaLoRA(r_max=4, verbose=False, save_adapter=False, max_pass=True)
    assert cb.config.max_pass
    originals = (module.rows, module.by_forward["rows"], module.collection["sum"])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, callbacks=[cb])
    trainer.fit(module, _loader(), _loader())
    steps = ROWS // BATCH
    assert module.calls == 2 * steps and module.passes == ["max", "low"] * steps  # training_step ran twice
    # ... but every metric counted each row once, and the module holds its own metrics again
    assert float(module.rows.compute()) == ROWS
    assert float(module.by_forward["rows"].compute()) == ROWS
    assert float(module.collection["sum"].compute()) == ROWS
    assert float(module.collection["mean"].compute()) == BATCH
    assert all(a is b for a, b in zip((module.rows, module.by_forward["rows"], module.collection["sum"]), originals))
    # the per-rank validation calls validation_step once per eval rank more: a metric there counts once too
    assert float(module.val_rows.compute()) == ROWS


def test_isolated_puts_back_the_metrics_and_logging_after_an_exception():
    from lightning_matlora.isolation import isolated

    module = Counting()
    before = module.rows
    with pytest.raises(RuntimeError, match="boom"):
        with isolated(module):
            assert module.rows is not before
            module.rows.update(torch.tensor(5.0))
            assert module.log("x", 1.0) is None
            raise RuntimeError("boom")
    assert module.rows is before and float(before.compute()) == 0.0 and "log" not in module.__dict__


# ------------------------------------------------------------------------------------------------ paired_loss
def _model() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 8))
    lm.MatryoshkaLoRA(r_max=4, max_pass=True, verbose=False).apply(model)
    return model


def test_paired_loss_refuses_a_compute_without_a_loss_with_a_clear_message():
    model = _model()
    with pytest.raises(TypeError, match=r"its max pass returned NoneType: return the loss tensor"):
        lm.paired_loss(model, lambda: None)
    with pytest.raises(TypeError, match=r"returned a dict without a loss tensor under 'loss'"):
        lm.paired_loss(model, lambda: {"logits": model(torch.ones(2, 8))})
    assert controller_of(model).active_pass is None


def test_paired_loss_inside_its_own_compute_is_refused():
    model = _model()
    x = torch.randn(4, 8)

    def compute():
        return lm.paired_loss(model, lambda: model(x).pow(2).mean())

    with pytest.raises(RuntimeError, match="inside a paired step"):
        lm.paired_loss(model, compute)
    assert controller_of(model).active_pass is None
    loss = lm.paired_loss(model, lambda: model(x).pow(2).mean())  # still usable afterwards
    assert loss.requires_grad
