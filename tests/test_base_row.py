"""The base model's scores are an option of the library's rank-curve report: a ``base`` row of the table and a
dashed line on each plot (so a recipe prints one table)."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import lightning_matlora as lm
from lightning_matlora.curve import RankCurve, format_curves_table, plot_rank_curves

from lit_helpers import ListHandler


def test_the_table_has_a_base_row_with_each_metrics_base_score():
    curves = [RankCurve((1, 2, 4), (3.0, 2.5, 2.0), "loss", False), RankCurve((1, 2, 4), (50.0, 60.0, 70.0), "acc", True)]
    table = format_curves_table(curves, base={"loss": 3.25, "acc": 41.5})
    rows = {ln.split()[0]: ln.split()[1:] for ln in table.splitlines()[2:] if not ln.strip().startswith("Advice")}
    assert rows["base"] == ["3.25", "41.5"] and rows["1"] == ["3", "50"]
    assert list(rows)[:2] == ["base", "1"]  # above the ranks
    assert format_curves_table(curves, base={"acc": 41.5}).splitlines()[2].split() == ["base", "—", "41.5"]
    assert "base" not in format_curves_table(curves)


def test_the_plot_draws_the_base_score_as_a_labelled_line():
    pytest.importorskip("matplotlib")
    fig, ax = plot_rank_curves({1: 0.4, 4: 0.5}, base=0.3)
    base = [ln for ln in ax.get_lines() if ln.get_label() == "base model"]
    assert len(base) == 1 and list(base[0].get_ydata()) == [0.3, 0.3]


class Regression(L.LightningModule):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x, self.y = x, y  # the validation data
        self.net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def on_fit_start(self) -> None:  # measure the base (the adapter starts at zero) and hand it to the callback
        cb = next(c for c in self.trainer.callbacks if isinstance(c, lm.MatryoshkaLoRA))
        with torch.no_grad():
            cb.base_scores = {"loss": float(nn.functional.mse_loss(self.net(self.x), self.y))}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_base_scores_set_during_fit_reach_the_end_of_fit_table_and_the_plot(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
    data = list(zip(x, y))
    cb = lm.MatryoshkaLoRA(r_max=2, save_adapter=False)
    assert cb.base_scores is None
    logged = ListHandler()
    logging.getLogger("lightning.pytorch").addHandler(logged)
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            default_root_dir=tmp_path, callbacks=[cb])
        module = Regression(x, y)
        trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(logged)
    base = cb.base_scores["loss"]
    assert cb.rank_eval.base_scores == {"loss": base}
    tables = [m for m in logged.messages if m.startswith("MatryoshkaLoRA rank curves")]
    assert len(tables) == 1
    row = next(ln for ln in tables[0].splitlines() if ln.split()[:1] == ["base"])
    assert float(row.split()[1]) == pytest.approx(base, rel=1e-4)
    assert (tmp_path / "rank_curve_loss.png").is_file()


def test_base_scores_is_an_option_of_the_callback():
    cb = lm.MatryoshkaLoRA(r_max=2, base_scores={"loss": 1.5}, verbose=False)
    assert cb.base_scores == {"loss": 1.5} and cb.rank_eval.base_scores == {"loss": 1.5}
